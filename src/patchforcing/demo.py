"""``patchforcing demo``: train a small PFT on the built-in data, then compare the samplers.

Writes a folder a person wants to open::

    OUT/
      summary.md                    what was trained, each sampler's steps / NFE / seconds / quality,
                                    and what a run this short can and cannot show
      samplers.png                  the three samplers side by side at equal NFE
      samples_<sampler>.png         one grid per sampler
      uncertainty_and_time.png      where the model is unsure and how fast each patch is denoised
      trajectory_look_ahead.png     one image's look-ahead trajectory, call by call
      data.png                      real training examples, one class per row
      classifier.pt                 the feature classifier (trained here on the training images)
      run/                          the training run (config, checkpoints, metrics.csv, sample grids)

The quality figure is the study's (:mod:`patchforcing.study`): ``FD_classifier`` against the
held-out images the trainer never saw, in the feature space of a small classifier trained inside
the demo on the training images, with a bootstrap interval, next to the real-vs-real floor (real
training images scored the same way), and each sampler's paired difference to ``euler_pf`` (the
samples share noise and labels).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .analysis.stats import Interval, centered_interval
from .checkpoints import load_model
from .evaluation import ClassifierFeatures, train_classifier
from .evaluation.classifier import load_classifier
from .sampling import make_sampler, sample, steps_for_nfe
from .sampling.generate import sample_noise
from .sampling.guidance import GuidedModel
from .study.data import data_identity, real_sets
from .study.evaluate import bootstrap_fd, fd, image_features
from .training.config import load_config
from .training.trainer import build_data, train
from .utils.images import to_uint8
from .viz import sampler_comparison, save_grid, trajectory_sheet, uncertainty_time_figure

__all__ = ["run_demo", "DEMO_SAMPLERS", "check_demo_options"]

#: the samplers compared, with their options (paper defaults)
DEMO_SAMPLERS: dict[str, dict] = {
    "euler_pf": {},
    "dual_loop": {"quantile": 0.4, "n_inner": 4},
    "look_ahead": {"quantile": 0.4, "context_ratio": 1.4},
}
#: bootstrap replicates of the demo's intervals
DEMO_BOOTSTRAP = 500


@dataclass
class SamplerRow:
    sampler: str
    steps: int
    nfe: int
    calls: int
    seconds: float
    images_per_sec: float
    fd: float = float("nan")
    fd_low: float = float("nan")
    fd_high: float = float("nan")
    diff: Interval | None = None  # FD minus euler_pf's, paired bootstrap


def check_demo_options(nfe: int, num_eval: int) -> None:
    """Reject options the demo cannot run with, naming the option (before any training).

    Raises:
        ValueError: ``--nfe`` below 1 or too small for one of :data:`DEMO_SAMPLERS`, or
            ``--num-eval`` below 2 (a Fréchet distance needs at least two samples).
    """
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"--nfe must be an integer >= 1, got {nfe!r}")
    if isinstance(num_eval, bool) or not isinstance(num_eval, int) or num_eval < 2:
        raise ValueError(
            f"--num-eval must be an integer >= 2 (the quality figure compares sample statistics), got {num_eval!r}"
        )
    for name, opts in DEMO_SAMPLERS.items():
        try:
            steps_for_nfe(make_sampler(name, **opts), nfe, GuidedModel(None, None))  # no guidance: 1 NFE a call
        except ValueError as e:
            raise ValueError(f"--nfe {nfe} is too small for the {name} sampler: {e}") from None


def run_demo(
    out: str | Path = "demo-out",
    overrides: Sequence[str] = (),
    nfe: int = 24,
    num_eval: int = 512,
    seed: int = 0,
    progress: bool = True,
    classifier_steps: int = 150,
) -> Path:
    """Train (or reuse) the demo run in ``out/run`` and write the pictures and ``summary.md``.

    Args:
        out: output folder.
        overrides: dotted config overrides for the ``demo`` preset (e.g. ``train.max_steps=300``).
        nfe: the NFE budget every sampler gets (equal compute).
        num_eval: samples per sampler for the quality figure.
        seed: the seed of the samples' shared noise (sample ``i``'s noise depends on ``(seed, i)``).
        classifier_steps: optimiser steps of the feature classifier (about a minute on a CPU).
    Raises:
        ValueError: invalid ``nfe`` / ``num_eval`` (see :func:`check_demo_options`), before training.
    """
    check_demo_options(nfe, num_eval)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config("demo", overrides)
    run_dir = out / "run"
    resume = (run_dir / "checkpoints" / "last.pt").exists()
    print(
        f"[1/4] training {cfg.model.name} on the built-in synthetic data "
        f"({cfg.train.max_steps} steps, batch {cfg.optim.batch_size}) -> {run_dir}" + (" (resuming)" if resume else "")
    )
    t0 = time.perf_counter()
    result = train(cfg, run_dir, resume=resume)
    train_seconds = time.perf_counter() - t0
    if result.interrupted:
        print(f"training interrupted at step {result.step}; run the demo again to continue")
        return out

    model = load_model(run_dir)
    data = build_data(cfg)
    save_grid(torch.stack([data[i][0] for i in range(64)]), out / "data.png", nrow=8)
    real = real_sets(cfg, num_eval, seed)  # held-out reference, floor images, the samples' labels

    print(f"[2/4] training the feature classifier on {len(real.classifier_data)} training images")
    t1 = time.perf_counter()
    clf_path = out / "classifier.pt"
    want = {"data": data_identity(cfg), "split": "train", "val_size": cfg.data.val_size}
    info = load_classifier(clf_path)[1] if clf_path.is_file() else {}
    if (info.get("train") or {}).get("data") != want or (info.get("train") or {}).get("steps") != classifier_steps:
        train_classifier(
            real.classifier_data, clf_path, epochs=1000, max_steps=classifier_steps, data_spec=want, log=None
        )
        info = load_classifier(clf_path)[1]
    extractor = ClassifierFeatures(clf_path)
    ref_f = image_features(real.reference, extractor)
    floor_f = image_features(real.floor, extractor)
    classifier_seconds = time.perf_counter() - t1

    print(f"[3/4] sampling {num_eval} images with each sampler at {nfe} NFE")
    noise = sample_noise(seed, range(num_eval), (model.in_channels, *model.image_size))
    labels = torch.tensor([real.classes[i % len(real.classes)] for i in range(num_eval)], dtype=torch.long)
    rows: list[SamplerRow] = []
    grids, feats = {}, {}
    for name, opts in DEMO_SAMPLERS.items():
        res = sample(model, noise, name, nfe=nfe, y=labels, progress=progress, **opts)
        feats[name] = image_features(to_uint8(res.x).permute(0, 2, 3, 1).numpy(), extractor)
        rows.append(SamplerRow(name, res.steps, res.nfe, res.calls, res.seconds, num_eval / res.seconds))
        grids[name] = res.x[:64]
        save_grid(res.x[:64], out / f"samples_{name}.png", nrow=8)
    reps = bootstrap_fd({**feats, "floor": floor_f}, ref_f, DEMO_BOOTSTRAP, seed=seed)
    base = "euler_pf"
    for r in rows:
        r.fd = fd(feats[r.sampler], ref_f)
        iv = centered_interval(r.fd, reps[r.sampler])
        r.fd_low, r.fd_high = max(0.0, iv.low), iv.high  # an FD is never below 0
        if r.sampler != base:
            d = r.fd - fd(feats[base], ref_f)
            r.diff = centered_interval(d, reps[r.sampler] - reps[base])
    floor_fd = fd(floor_f, ref_f)
    floor = centered_interval(floor_fd, reps["floor"])
    floor = Interval(floor.estimate, max(0.0, floor.low), floor.high)
    sampler_comparison(
        grids,
        out / "samplers.png",
        labels={r.sampler: f"{r.sampler} · {r.steps} steps · {r.nfe} NFE" for r in rows},
        nrow=8,
    )

    print("[4/4] drawing uncertainty and per-patch time maps")
    res = sample(model, noise[:8], "look_ahead", nfe=nfe, y=labels[:8], record=True, **DEMO_SAMPLERS["look_ahead"])
    uncertainty_time_figure(
        res.record, model.patch_size, out / "uncertainty_and_time.png", num_images=4, num_steps=6, final=res.x
    )
    trajectory_sheet(
        res.record,
        image_index=0,
        every=max(1, len(res.record) // 8),
        patch_size=model.patch_size,
        path=out / "trajectory_look_ahead.png",
    )
    res_dl = sample(model, noise[:8], "dual_loop", nfe=nfe, y=labels[:8], record=True, **DEMO_SAMPLERS["dual_loop"])
    trajectory_sheet(
        res_dl.record,
        image_index=0,
        every=max(1, len(res_dl.record) // 8),
        patch_size=model.patch_size,
        path=out / "trajectory_dual_loop.png",
    )

    quality = {
        "metric": "FD_classifier",
        "reference_images": int(len(real.reference)),
        "floor": {"fd": floor_fd, "low": floor.low, "high": floor.high, "n": int(len(real.floor))},
        "classifier": {
            "held_out_accuracy": info.get("accuracy"),
            "steps": classifier_steps,
            "seconds": classifier_seconds,
        },
        "bootstrap": DEMO_BOOTSTRAP,
    }
    _write_summary(out, cfg, result, train_seconds, resume, rows, nfe, num_eval, quality)
    print(f"done: open {out / 'summary.md'} and the PNGs beside it")
    return out


def _fmt(v: float) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.3g}"


def _write_summary(
    out: Path,
    cfg,
    result,
    train_seconds: float,
    resumed: bool,
    rows: list[SamplerRow],
    nfe: int,
    num_eval: int,
    quality: dict,
) -> None:
    m = result.metrics
    fl = quality["floor"]
    acc = quality["classifier"]["held_out_accuracy"]
    best = min(rows, key=lambda r: r.fd)
    ratio = best.fd / fl["fd"] if fl["fd"] > 0 else float("inf")
    sig = [r for r in rows if r.diff is not None and r.diff.excludes_zero]
    lines = [
        "# Patch Forcing demo",
        "",
        f"Model **{cfg.model.name}** trained on the built-in synthetic shapes "
        f"({cfg.data.resolution}x{cfg.data.resolution}, {cfg.data.num_classes or 8} classes) for "
        f"**{result.step} steps** (batch {cfg.optim.batch_size}, {train_seconds / 60:.1f} min on this machine"
        f"{'; continued from an earlier run' if resumed else ''}).",
        f"Final training loss {m.get('loss', float('nan')):.4f} (flow matching {m.get('fm', float('nan')):.4f}); "
        f"EMA validation loss {m.get('val_loss', float('nan')):.4f}.",
        "",
        f"## Samplers at equal compute ({nfe} NFE per image, no guidance)",
        "",
        "| sampler | steps | NFE | network calls | seconds | images/s | FD_classifier [95 % interval] | x floor "
        "| vs euler_pf [95 % interval] |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        diff = "-" if r.diff is None else f"{r.diff.estimate:+.3g} [{_fmt(r.diff.low)}, {_fmt(r.diff.high)}]"
        if r.diff is not None and r.diff.excludes_zero:
            diff += " †"
        lines.append(
            f"| {r.sampler} | {r.steps} | {r.nfe} | {r.calls} | {r.seconds:.1f} | {r.images_per_sec:.1f} | "
            f"{_fmt(r.fd)} [{_fmt(r.fd_low)}, {_fmt(r.fd_high)}] | {r.fd / fl['fd']:.1f} | {diff} |"
        )
    lines += [
        f"| *real images (floor)* | | | | | | {_fmt(fl['fd'])} [{_fmt(fl['low'])}, {_fmt(fl['high'])}] | 1.0 | |",
        "",
        f"*FD_classifier*: Fréchet distance between {num_eval} samples and {quality['reference_images']} held-out "
        "real images the model never saw, in the feature space of a small classifier trained here on the "
        f"training images (held-out accuracy {_fmt(acc)}; {quality['classifier']['steps']} steps, "
        f"{quality['classifier']['seconds']:.0f} s). It is **not** FID and is comparable only with numbers from the "
        f"same classifier. *Floor*: {fl['n']} real training images scored the same way, the FD of a perfect "
        "generator at this sample count. Intervals: bootstrap over the samples and the reference "
        f"({quality['bootstrap']} replicates); vs euler_pf: paired bootstrap (same noise and labels), † = the "
        "interval excludes 0.",
        "",
        "## What this run can and cannot show",
        "",
        f"- It shows the whole pipeline working on this machine, and how far a {train_seconds / 60:.0f}-minute CPU "
        f"run gets: the best sampler is at **{ratio:.1f}x the real-vs-real floor**"
        + (
            " - far from the data; at this quality sampler differences need not carry over to a well-trained model."
            if ratio > 5
            else "."
        ),
        f"- Sampler differences larger than the sampling noise of {num_eval} samples: "
        + (
            ", ".join(f"{r.sampler} ({r.diff.estimate:+.3g})" for r in sig) + " (†)."
            if sig
            else "none here: the samplers are not distinguishable at this training length and sample count."
        ),
        "- It cannot show whether Patch Forcing beats SiT: no SiT is trained here, and one training seed says "
        "nothing about the spread between runs. `patchforcing study` trains both (same backbone, data order, "
        "steps) over several seeds and tests the differences.",
        "- It says nothing about FID on ImageNet: other data, a small classifier's feature space, a tiny model.",
        "",
        "## Pictures",
        "",
        "- `samplers.png`: the three samplers side by side (same noise and labels).",
        "- `uncertainty_and_time.png`: predicted uncertainty (exp(logvar) per patch) and per-patch time",
        "  during look-ahead sampling; bright time = further along (cleaner).",
        "- `trajectory_look_ahead.png`, `trajectory_dual_loop.png`: one image call by call: state, clean",
        "  estimate, time map, uncertainty, certain/uncertain mask.",
        "- `data.png`: real training examples. `run/samples/`: EMA grids during training.",
        "",
        "Reproduce: `patchforcing demo --out " + str(out) + "`; the run is in `run/` "
        "(`patchforcing export run --out model.safetensors`).",
    ]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(
        json.dumps(
            {
                "model": cfg.model.name,
                "steps": result.step,
                "train_seconds": train_seconds,
                "metrics": m,
                "nfe": nfe,
                "quality": quality,
                "samplers": [
                    {k: v for k, v in r.__dict__.items() if k != "diff"}
                    | {"vs_euler_pf": None if r.diff is None else r.diff.to_dict()}
                    for r in rows
                ],
            },
            indent=2,
            default=float,
        )
    )
