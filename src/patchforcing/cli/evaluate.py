"""``patchforcing eval SAMPLES --ref REF``: FID, sFID, IS, precision/recall; with ``--clip MODEL`` /
``--prompts FILE`` also (or only) the CLIP score of text-to-image samples against their prompts."""

from __future__ import annotations

import argparse
import sys

from ..evaluation import EvaluationError, evaluate, format_results
from ..evaluation.clip_score import DEFAULT_CLIP, clip_score
from ..utils import write_json_atomic
from .common import check_output_file, positive_int

NAME = "eval"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        NAME,
        help="FID, sFID, IS, precision/recall of a sample .npz against a reference",
        description="Score SAMPLES (an .npz with uint8 NHWC arr_0, as ADM writes them; an .npy; or an image "
        "folder) against REF: an ADM reference batch (its stored mu/sigma, mu_s/sigma_s are used for "
        "FID/sFID, its images for precision/recall), an .npz of images (arr_0 or images) or an image "
        "folder (any layout; centre-cropped to the samples' resolution). Definitions follow the ADM "
        "evaluator: Inception-v3 pool3 FID, mixed_6/conv sFID, IS over splits of 5000, k=3 "
        "precision/recall. --features classifier:CKPT computes the same statistics in a small "
        "classifier's feature space (see train-classifier), reported as FD_classifier etc., not FID. "
        "--clip MODEL and/or --prompts FILE add the CLIP score (mean over pairs of 100 * max(cos, 0) of "
        "CLIP image and text embeddings; needs transformers) of image i against prompt i: the prompts come "
        "from FILE (one per line) or from the captions array that `patchforcing sample` stores for a text "
        "model; --ref is then optional.",
    )
    p.add_argument("samples", help="samples .npz / .npy / image folder")
    p.add_argument("--ref", help="reference: ADM .npz, .npz of images, or image folder (FID & co.)")
    p.add_argument(
        "--clip",
        metavar="MODEL",
        help=f"CLIP score with this CLIPModel (hub id or local directory; default with --prompts: {DEFAULT_CLIP})",
    )
    p.add_argument(
        "--prompts",
        metavar="FILE",
        help="CLIP score prompts, one per line, line i for image i (default: the samples' stored captions)",
    )
    p.add_argument(
        "--metrics",
        default="fid,sfid,is,precision,recall",
        help="comma list of fid, sfid, is, precision, recall (default: all)",
    )
    p.add_argument("--features", default="inception", help="inception (needs torch-fidelity) or classifier:CKPT")
    p.add_argument(
        "--inception-weights",
        metavar="FILE",
        help="local torch-fidelity Inception weights (weights-inception-2015-12-05-6726825d.pth); "
        "default: torch-fidelity downloads them",
    )
    p.add_argument("--batch-size", type=positive_int, default=100)
    p.add_argument("--k", type=positive_int, default=3, help="neighbourhood size of precision/recall (default 3)")
    p.add_argument(
        "--is-split-size", type=positive_int, default=5000, help="samples per Inception Score split (ADM: 5000)"
    )
    p.add_argument("--is-splits", type=positive_int, help="instead: this many equal Inception Score splits")
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache", metavar="NPZ", help="cache file for the reference's features (off by default)")
    p.add_argument(
        "--recompute-reference-stats",
        action="store_true",
        help="ignore an ADM reference batch's stored statistics and compute them from its images",
    )
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    p.set_defaults(func=run)
    return p


def _clip_lines(clip: dict) -> list[str]:
    d = clip["details"]
    lines = [
        f"CLIP score: {d['num_pairs']} pairs, std {d['clip_score_std']:.4f}, model {clip['clip']['model']}, "
        f"prompts from {clip['prompts']}"
    ]
    if d["truncated_prompts"]:
        lines.append(f"note: {d['truncated_prompts']} prompt(s) cut to CLIP's {clip['clip']['max_tokens']} tokens")
    return lines


def run(args: argparse.Namespace) -> int:
    if args.out:
        check_output_file(args.out)
    want_clip = args.clip is not None or args.prompts is not None
    if args.ref is None and not want_clip:
        raise EvaluationError(
            "nothing to compute: give --ref REF (FID, sFID, IS, precision/recall) and/or "
            "--clip MODEL / --prompts FILE (CLIP score of text-to-image samples)"
        )
    progress = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    clip = None
    if want_clip:
        clip = clip_score(
            args.samples,
            args.prompts,
            args.clip or DEFAULT_CLIP,
            batch_size=args.batch_size,
            device=args.device,
            progress=progress,
        )
    if args.ref is None:
        result = clip
        print("\n".join([f"clip_score  {clip['metrics']['clip_score']:.4f}", *_clip_lines(clip)]))
        if args.out:
            print(f"wrote {write_json_atomic(args.out, result)}")
        return 0
    result = evaluate(
        args.samples,
        args.ref,
        metrics=args.metrics,
        features=args.features,
        batch_size=args.batch_size,
        k=args.k,
        is_split_size=args.is_split_size,
        is_splits=args.is_splits,
        device=args.device,
        inception_weights=args.inception_weights,
        cache=args.cache,
        use_reference_stats=not args.recompute_reference_stats,
        progress=progress,
    )
    if clip is not None:
        result["metrics"]["clip_score"] = clip["metrics"]["clip_score"]
        result["details"].update(clip["details"])
        result["clip"], result["prompts"] = clip["clip"], clip["prompts"]
    print(format_results(result))
    if clip is not None:
        print("\n".join(_clip_lines(clip)))
    if args.out:
        print(f"wrote {write_json_atomic(args.out, result)}")
    return 0
