"""Sampling in bf16 vs fp32 on a trained model: speed and FD, paired, in one run.

Takes a finished ``patchforcing study`` folder (its classifier and cached reference features) and
one of its runs, samples the same indices (same noise and labels) with the network in fp32 and
under bf16 autocast (``pf.sample(..., precision="bf16")``), and reports per sampler: images/s of
both (interleaved batches, so a busy machine slows both alike), the pixel difference, FD_classifier
of both against the study's held-out reference and their paired-bootstrap difference (same sample
indices and reference draws in every replicate).

    python benchmarks/sample_precision.py studies/recipe/base --run pft-s0 --samplers euler_pf,look_ahead \\
        --nfe 20 --num-samples 512
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from _common import markdown_header
from inference_step import machine_info
from patchforcing.analysis.stats import centered_interval
from patchforcing.checkpoints import load_model
from patchforcing.sampling.generate import GenerationSpec, sample_indices
from patchforcing.study.evaluate import bootstrap_fd, fd, image_features, make_extractor
from patchforcing.utils.images import to_uint8_images

PRECISIONS = ("fp32", "bf16")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("study", type=Path, help="a finished study folder (classifier.pt, eval/reference.npz)")
    ap.add_argument("--run", default="pft-s0", help="run id under STUDY/runs (default pft-s0)")
    ap.add_argument("--samplers", default="euler_pf,look_ahead")
    ap.add_argument("--nfe", type=int, default=20)
    ap.add_argument("--num-samples", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--bootstrap", type=int, default=500)
    args = ap.parse_args(argv)
    model = load_model(args.study / "runs" / args.run, map_location="cpu").eval()
    extractor = make_extractor("classifier", args.study / "classifier.pt", None, "cpu")
    with np.load(args.study / "eval" / "reference.npz", allow_pickle=False) as z:
        reference = z["features"]
    rows = []
    for sampler in args.samplers.split(","):
        specs = {
            p: GenerationSpec(
                num_samples=args.num_samples, sampler=sampler, nfe=args.nfe, labels="balanced", precision=p
            )
            for p in PRECISIONS
        }
        images = {p: [] for p in PRECISIONS}
        seconds = dict.fromkeys(PRECISIONS, 0.0)
        for start in range(0, args.num_samples, args.batch_size):
            idx = list(range(start, min(start + args.batch_size, args.num_samples)))
            for p in PRECISIONS:  # interleaved: both precisions see the same machine load
                t0 = time.perf_counter()
                x, _, _ = sample_indices(model, specs[p], idx)
                seconds[p] += time.perf_counter() - t0
                images[p].append(x)
        x = {p: torch.cat(images[p]) for p in PRECISIONS}
        # (n, H, W, 3) uint8, the conversion of the study's sample files
        feats = {p: image_features(to_uint8_images(x[p]), extractor) for p in PRECISIONS}
        reps = bootstrap_fd(feats, reference, args.bootstrap)
        fds = {p: fd(feats[p], reference) for p in PRECISIONS}
        diff = centered_interval(fds["bf16"] - fds["fp32"], reps["bf16"] - reps["fp32"])
        rel = float((x["bf16"] - x["fp32"]).norm() / x["fp32"].norm())
        rows.append((sampler, seconds, fds, diff, rel))
        print(
            f"{sampler}: fp32 {args.num_samples / seconds['fp32']:.1f} img/s, bf16 "
            f"{args.num_samples / seconds['bf16']:.1f} img/s; FD {fds['fp32']:.3f} vs {fds['bf16']:.3f}",
            flush=True,
        )
    cmd = "python benchmarks/sample_precision.py " + " ".join(sys.argv[1:] if argv is None else argv)
    md = markdown_header("Sampling in bf16 vs fp32", cmd, machine_info(torch.device("cpu")))
    md += [
        f"Model `{args.run}` of `{args.study}`, {args.num_samples} samples per cell (balanced labels, the same noise "
        f"for both precisions), NFE {args.nfe}, batch {args.batch_size}; FD_classifier against the study's held-out "
        f"reference; difference: paired bootstrap ({args.bootstrap} replicates, 95 %).",
        "",
        "| sampler | fp32 images/s | bf16 images/s | speed-up | rel. pixel difference | FD fp32 | FD bf16 | "
        "bf16 - fp32 [95 %] |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for sampler, sec, fds, diff, rel in rows:
        n = args.num_samples
        md.append(
            f"| {sampler} | {n / sec['fp32']:.1f} | {n / sec['bf16']:.1f} | {sec['fp32'] / sec['bf16']:.2f}x | "
            f"{rel:.4f} | {fds['fp32']:.3f} | {fds['bf16']:.3f} | {diff.estimate:+.3f} [{diff.low:+.3f}, "
            f"{diff.high:+.3f}] |"
        )
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
