"""``render_trajectory``: sample with ``record=True`` and draw the run (``patchforcing viz``).

The pictures themselves are :func:`patchforcing.viz.trajectory_sheet` (PNG contact sheet, one
row per recorded network call), :func:`patchforcing.viz.trajectory_gif` (one frame per call) and
:func:`patchforcing.viz.uncertainty_time_figure` (several images x several steps). This module
only prepares the run: sample ``i`` gets the noise and label that ``patchforcing sample`` gives
sample ``i`` (:func:`~patchforcing.sampling.generate.sample_noise`,
:func:`~patchforcing.sampling.generate.sample_labels`) and, since a sample does not depend on its
batch-mates, the picture of sample ``i`` shows exactly how that sample was made.

Latent models: the state and the clean estimate are decoded through the autoencoder (``decode``)
for display; the per-patch time, uncertainty and mask stay on the latent patch grid, which is
what the model predicts (the titles say so).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .sampling import sample
from .sampling.generate import GenerationSpec, sample_labels, sample_noise

__all__ = ["TrajectoryResult", "render_trajectory"]

_SAMPLER_NAMES = {"euler": "Euler", "euler_pf": "Euler (PF)", "dual_loop": "Dual-loop", "look_ahead": "Look-ahead"}


@dataclass
class TrajectoryResult:
    """What :func:`render_trajectory` drew.

    Attributes:
        path: the written file; kind: ``"sheet"``, ``"gif"`` or ``"overview"``.
        indices: the sample indices shown; labels: their class labels (``None``: unconditional).
        sampler, steps, nfe, calls: the run (NFE per image); every: the call stride of the picture;
        shown: number of rows / frames / step columns drawn.
    """

    path: Path
    kind: str
    indices: list[int]
    labels: list[int] | None
    sampler: str
    steps: int
    nfe: int
    calls: int
    every: int
    shown: int
    options: dict[str, Any] = field(default_factory=dict)


def _device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def render_trajectory(
    model: nn.Module,
    out: str | os.PathLike,
    *,
    sampler: str = "look_ahead",
    steps: int | None = None,
    nfe: int | None = None,
    cfg_scale: float = 1.0,
    guidance_interval: tuple[float, float] | None = None,
    labels: str = "uniform",
    classes: list[int] | None = None,
    seed: int = 0,
    index: int = 0,
    every: int | None = None,
    overview: bool = False,
    num_images: int = 4,
    num_steps: int = 6,
    decode: Callable[[Tensor], Tensor] | None = None,
    options: dict[str, Any] | None = None,
    progress: bool = False,
) -> TrajectoryResult:
    """Sample sample ``index`` (overview: ``index .. index + num_images - 1``) and draw its run.

    Args:
        model: the network in eval mode, on its device.
        out: ``.png`` (contact sheet, or the overview with ``overview``) or ``.gif`` (animation).
        sampler, steps, nfe, cfg_scale, guidance_interval, options: as in :func:`patchforcing.sample`
            (``steps`` defaults to 16 when neither is given, to keep the picture short).
        labels, classes, seed: as in ``patchforcing sample`` (``GenerationSpec``): sample ``i``'s
            noise and label depend only on ``(seed, i)``.
        index: which sample.
        every: draw every ``every``-th network call (the last one always); default: at most
            16 rows for a sheet, every call for a GIF.
        overview: draw :func:`~patchforcing.viz.uncertainty_time_figure` of ``num_images``
            samples at ``num_steps`` steps instead (PNG only).
        decode: latent models: scaled latents ``(B, c, h, w)`` -> images in ``[-1, 1]``.
    """
    from . import viz

    out = Path(out)
    ext = out.suffix.lower()
    if ext not in (".png", ".gif"):
        raise ValueError(f"--out must end in .png or .gif, got {out}")
    if overview and ext != ".png":
        raise ValueError("the overview is a still picture: use a .png output")
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    if every is not None and every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    if steps is not None and nfe is not None:
        raise ValueError("give steps or nfe, not both")
    if steps is None and nfe is None:
        steps = 16
    spec = GenerationSpec(num_samples=1, seed=seed, sampler=sampler, steps=steps, nfe=nfe, cfg_scale=cfg_scale,
                          guidance_interval=guidance_interval, labels=labels, classes=classes,
                          options=dict(options or {}))
    n = max(1, int(num_images)) if overview else 1
    indices = list(range(index, index + n))
    device = _device_of(model)
    noise = sample_noise(seed, indices, (model.in_channels, *model.image_size)).to(device)
    y = sample_labels(spec, indices, model.num_classes)
    res = sample(model, noise, sampler, steps, nfe=nfe, y=None if y is None else y.to(device), cfg_scale=cfg_scale,
                 guidance_interval=guidance_interval, record=True, progress=progress, **spec.options)
    rec = res.record
    p = int(model.patch_size)
    gh, gw = model.image_size[0] // p, model.image_size[1] // p
    name = _SAMPLER_NAMES.get(res.sampler, res.sampler)
    run = f"{name}, {res.steps} steps, {res.nfe} NFE" + (f", CFG {cfg_scale:g}" if cfg_scale != 1.0 else "")
    lab = [int(v) for v in y.tolist()] if y is not None else None
    cls = "" if lab is None else f" (class {lab[0]})"
    latent = decode is not None
    grid_note = (f"Images decoded by the VAE; time, uncertainty and mask are per latent patch ({gh}x{gw} grid "
                 f"of {p}x{p} latent cells), what the model predicts." if latent else None)

    if overview:
        title = f"Sampling of samples {indices[0]}-{indices[-1]}: {run}" if n > 1 else f"Sampling of sample {index}: {run}"
        if latent:
            title += f" (uncertainty and time on the {gh}x{gw} latent patch grid)"
        rows = [f"sample {i}" + ("" if lab is None else f" (class {c})") for i, c in zip(indices, lab or indices)]
        viz.uncertainty_time_figure(rec, p, out, num_images=n, num_steps=num_steps, final=res.x, decode=decode,
                                    title=title, row_labels=rows)
        shown = len({int(r.step) for r in rec})
        return TrajectoryResult(out, "overview", indices, lab, res.sampler, res.steps, res.nfe, res.calls,
                                1, min(num_steps, shown), res.options)

    if every is None:
        every = max(1, math.ceil(len(rec) / 16)) if ext == ".png" else 1
    title = f"Sample {index}{cls}: {run}"
    if ext == ".png":
        viz.trajectory_sheet(rec, image_index=0, every=every, patch_size=p, decode=decode, path=out, title=title,
                             note=grid_note)
        kind = "sheet"
    else:
        viz.trajectory_gif(rec, out, image_index=0, every=every, patch_size=p, decode=decode,
                           title=f"Sample {index}{cls}", note=f"{run}.\n{grid_note}" if grid_note else run)
        kind = "gif"
    shown = len(range(0, len(rec), every)) + (1 if (len(rec) - 1) % every else 0)
    return TrajectoryResult(out, kind, indices, lab, res.sampler, res.steps, res.nfe, res.calls, every, shown,
                            res.options)
