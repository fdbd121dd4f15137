"""``patchforcing demo``: train a small PFT on the built-in data, then compare the samplers.

Writes a folder a person wants to open::

    OUT/
      summary.md                    what was trained, each sampler's steps / NFE / seconds / quality
      samplers.png                  the three samplers side by side at equal NFE
      samples_<sampler>.png         one grid per sampler
      uncertainty_and_time.png      where the model is unsure and how fast each patch is denoised
      trajectory_look_ahead.png     one image's look-ahead trajectory, call by call
      data.png                      real training examples, one class per row
      run/                          the training run (config, checkpoints, metrics.csv, sample grids)
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoints import load_model
from .data import SyntheticShapes
from .evaluation import frechet_distance_from_features
from .sampling import make_sampler, sample, steps_for_nfe
from .sampling.guidance import GuidedModel
from .training.config import load_config
from .training.trainer import build_data, split_train_val, train
from .viz import sampler_comparison, save_grid, trajectory_sheet, uncertainty_time_figure

__all__ = ["run_demo", "DEMO_SAMPLERS", "check_demo_options"]

#: the samplers compared, with their options (paper defaults)
DEMO_SAMPLERS: dict[str, dict] = {
    "euler_pf": {},
    "dual_loop": {"quantile": 0.4, "n_inner": 4},
    "look_ahead": {"quantile": 0.4, "context_ratio": 1.4},
}


@dataclass
class SamplerRow:
    sampler: str
    steps: int
    nfe: int
    calls: int
    seconds: float
    images_per_sec: float
    pixel_fd: float


def _pixel_features(x: torch.Tensor, size: int = 8) -> torch.Tensor:
    """``(B, C, H, W)`` in [-1, 1] -> ``(B, C * size * size)`` area-downsampled pixels."""
    return F.adaptive_avg_pool2d(x.float().clamp(-1, 1), size).flatten(1)


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
) -> Path:
    """Train (or reuse) the demo run in ``out/run`` and write the pictures and ``summary.md``.

    Args:
        out: output folder.
        overrides: dotted config overrides for the ``demo`` preset (e.g. ``train.max_steps=300``).
        nfe: the NFE budget every sampler gets (equal compute).
        num_eval: samples per sampler for the quality figure.
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
        f"[1/3] training {cfg.model.name} on the built-in synthetic data "
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
    if isinstance(data, SyntheticShapes):  # unseen images: the same generator with another seed
        real = SyntheticShapes(data.size, data.num_classes, length=num_eval, seed=cfg.data.seed + 1).batch(
            range(num_eval)
        )[0]
    else:  # the held-out split the trainer used for its validation loss
        _, val = split_train_val(data, max(cfg.data.val_size, 2))
        real = torch.stack([val[i][0] for i in range(len(val))])
    save_grid(torch.stack([data[i][0] for i in range(64)]), out / "data.png", nrow=8)

    print(f"[2/3] sampling {num_eval} images with each sampler at {nfe} NFE")
    K = model.num_classes
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(num_eval, model.in_channels, *model.image_size, generator=g)
    labels = torch.arange(num_eval) % K
    rows: list[SamplerRow] = []
    grids = {}
    real_feats = _pixel_features(real)
    for name, opts in DEMO_SAMPLERS.items():
        res = sample(model, noise, name, nfe=nfe, y=labels, progress=progress, **opts)
        fd = frechet_distance_from_features(_pixel_features(res.x), real_feats)
        rows.append(SamplerRow(name, res.steps, res.nfe, res.calls, res.seconds, num_eval / res.seconds, fd))
        grids[name] = res.x[:64]
        save_grid(res.x[:64], out / f"samples_{name}.png", nrow=8)
    sampler_comparison(
        grids,
        out / "samplers.png",
        labels={r.sampler: f"{r.sampler} · {r.steps} steps · {r.nfe} NFE" for r in rows},
        nrow=8,
    )

    print("[3/3] drawing uncertainty and per-patch time maps")
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

    _write_summary(out, cfg, result, train_seconds, resume, rows, nfe, num_eval, len(real))
    print(f"done: open {out / 'summary.md'} and the PNGs beside it")
    return out


def _write_summary(
    out: Path,
    cfg,
    result,
    train_seconds: float,
    resumed: bool,
    rows: list[SamplerRow],
    nfe: int,
    num_eval: int,
    num_real: int,
) -> None:
    m = result.metrics
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
        "| sampler | steps | NFE | network calls | seconds | images/s | pixel-FD (lower is better) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.sampler} | {r.steps} | {r.nfe} | {r.calls} | {r.seconds:.1f} | {r.images_per_sec:.1f} | {r.pixel_fd:.4f} |"
        )
    lines += [
        "",
        f"*pixel-FD*: Fréchet distance between {num_eval} samples and {num_real} unseen real images, both "
        "area-downsampled to 8x8 pixels (a cheap, dataset-specific quality figure; it is **not** FID).",
        "",
        "## Pictures",
        "",
        "- `samplers.png`: the three samplers side by side (same noise and labels; each column is one class).",
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
                "samplers": [r.__dict__ for r in rows],
            },
            indent=2,
        )
    )
