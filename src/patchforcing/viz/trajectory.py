"""One image's sampling run, call by call: contact sheet (PNG), animation (GIF), ``render_trajectory``.

Columns of a row: the call's input state ``x``, its clean estimate ``x1_hat``, the per-patch
time ``t`` (fixed scale ``[0, 1]``), the per-patch uncertainty (``exp(logvar)`` averaged per
patch, log colour scale shared by all rows; "n/a" without a log-variance) and the certain /
uncertain patch mask ("n/a" where the call had none).

:func:`render_trajectory` prepares the run for ``patchforcing viz``: sample ``i`` gets the noise
and label that ``patchforcing sample`` gives sample ``i``
(:func:`~patchforcing.sampling.generate.sample_noise`, :func:`~patchforcing.sampling.generate.sample_labels`)
and, since a sample does not depend on its batch-mates, the picture of sample ``i`` shows exactly
how that sample was made. Latent models: the state and the clean estimate are decoded through the
autoencoder (``decode``) for display; time, uncertainty and mask stay on the latent patch grid,
which is what the model predicts (the titles say so).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from PIL import Image
from torch import nn

from ..sampling import sample
from ..sampling.cache import TokenCache
from ..sampling.generate import GenerationSpec, sample_labels, sample_noise
from ..utils.devices import module_device
from ..utils.io import atomic_write
from .grid import auto_scale
from .maps import TIME, bare, mask_legend, norm_of, scale, tile, uncertainty_time_figure
from .records import Decode, image_tiles, log_limits, patch_geometry, patch_times, patch_variance, records, select
from .style import PathLike, Style, render, resolve, save

__all__ = ["TrajectoryResult", "render_trajectory", "trajectory_gif", "trajectory_sheet"]

HEADERS = ("current state x", "predicted clean image", "per-patch time t", "uncertainty", "certain patches")
#: the last column of a token-cached run: which tokens a call recomputed (False tiles) or kept (True)
CACHE_HEADER, CACHE_LEGEND = "tokens recomputed", ("kept (cached)", "recomputed", "n/a")
_SAMPLER_NAMES = {"euler": "Euler", "euler_pf": "Euler (PF)", "dual_loop": "Dual-loop", "look_ahead": "Look-ahead"}
LABEL_PX, ROW_GAP = 130, 12  # the row label column; extra figure height per row beyond the tile


@dataclass
class _Run:
    """What the rows of one image's trajectory show (one entry per kept call)."""

    labels: list[str]
    states: np.ndarray  # (n, H, W, 3) uint8
    cleans: np.ndarray
    times: list[np.ndarray]  # (h, w)
    variances: list[np.ndarray | None]
    masks: list[np.ndarray | None]  # (h, w) bool
    limits: tuple[float, float] | None
    tile: tuple[int, int]  # (width, height) px
    #: a token-cached run: ``masks`` are the tokens each call kept from the cache (True) or recomputed
    cached: bool = False


def _run(
    record: list, image_index: int, indices: list[int], patch_size: int | None, decode: Decode | None, tile: int | None
) -> _Run:
    B = record[indices[0]].x.shape[0]
    if not -B <= image_index < B:
        raise IndexError(f"image_index {image_index} out of range for a batch of {B}")
    i = image_index % B
    p, h, w = patch_geometry(record[indices[0]], patch_size)
    recs = [record[k] for k in indices]
    states = image_tiles([r.x[i] for r in recs], decode)
    ih, iw = states.shape[1:3]
    k = 1 if tile is not None and max(ih, iw) > tile else auto_scale(ih, iw, 128 if tile is None else tile)
    times = [patch_times(r, i, h, w) for r in recs]
    cached = any(getattr(r, "active", None) is not None for r in record)
    if cached:  # full calls (refreshes) recompute every token
        masks = [
            np.zeros((h, w), bool) if r.active is None else ~r.active[i].bool().reshape(h, w).numpy() for r in recs
        ]
    else:
        masks = [None if r.mask is None else r.mask.detach().cpu()[i].bool().reshape(h, w).numpy() for r in recs]
    variances = [None if r.logvar is None else patch_variance(r.logvar, i, p) for r in recs]
    labels = []
    for r, t, m in zip(recs, times, masks):
        lines = [
            f"step {r.step} · call {r.call}",
            f"s = {r.s:.2f} -> {r.s_next:.2f}",
            f"t = {t.min():.2f}" if t.max() - t.min() < 5e-3 else f"t: {t.min():.2f} to {t.max():.2f}",
        ]
        if cached:
            lines.append("full call" if r.active is None else f"recomputed: {100 * (1 - m.mean()):.0f}%")
        elif m is not None:
            lines.append(f"certain: {100 * m.mean():.0f}%")
        labels.append("\n".join(lines))
    return _Run(
        labels,
        states,
        image_tiles([r.x1_hat[i] for r in recs], decode),
        times,
        variances,
        masks,
        log_limits(variances),
        (iw * k, ih * k),
        cached,
    )


def sheet_figure(
    run: _Run, rows: list[int], st: Style, *, title: str | None, subtitle: str | None, footer: bool = False
) -> Figure:
    """Rows ``rows`` of ``run`` under the column headers with their scales (repeated below when ``footer``)."""
    tw, th = run.tile
    unc = None if run.limits is None else norm_of(*run.limits, True)
    heads = [0, len(rows) + 1] if footer else [0]
    height = (70 if title else 20) + (25 * subtitle.count("\n") + 25 if subtitle else 0) + 95 * len(heads)
    fig = st.figure(LABEL_PX + 5 * (max(tw, 150) + 18) + 10, height + len(rows) * (th + ROW_GAP), title, subtitle)
    ratios = [0.08 if k in heads else 1 for k in range(len(rows) + len(heads))]
    gs = fig.add_gridspec(len(ratios), 6, width_ratios=[LABEL_PX / tw] + [1] * 5, height_ratios=ratios)
    maps = [(None, None), (None, None), (TIME, st.time_cmap), (unc, st.uncertainty_cmap), (None, None)]
    subs = ["", "", "0 = noise, 1 = data", "variance (log scale)" if unc is not None else "", ""]
    for k in heads:  # column headers (2 lines, aligned); the maps' colour bars and the mask legend under them
        bare(fig.add_subplot(gs[k, 0]))
        headers = HEADERS[:4] + ((CACHE_HEADER,) if run.cached else HEADERS[4:])
        for j, ((norm, cmap), text, sub) in enumerate(zip(maps, headers, subs)):
            ax = fig.add_subplot(gs[k, 1 + j])
            scale(ax, norm, cmap, None, n=4) if norm is not None else bare(ax)
            ax.set_title(f"{text}\n{sub or ' '}", pad=4, linespacing=1.5)
            if j == 4:
                legend = CACHE_LEGEND if run.cached else ("certain", "uncertain", "n/a: no mask")
                mask_legend(ax, st, legend, loc="upper left", bbox_to_anchor=(0, 1.6))
    for n, r in enumerate(rows, start=1):
        label = bare(fig.add_subplot(gs[n, 0])).text(0, 0.5, run.labels[r], va="center")
        label.set_in_layout(False)  # every frame of a GIF gets the same layout
        data = (run.states[r], run.cleans[r], run.times[r], run.variances[r], run.masks[r])
        for j, (d, (norm, cmap)) in enumerate(zip(data, maps)):
            tile(fig.add_subplot(gs[n, 1 + j]), d, st, norm, cmap)
    return fig


def trajectory_sheet(
    record: Any,
    image_index: int = 0,
    every: int = 1,
    patch_size: int | None = None,
    decode: Decode | None = None,
    path: PathLike | None = None,
    *,
    tile: int | None = None,
    title: str | None = None,
    note: str | None = None,
    style: Style | None = None,
) -> Image.Image:
    """One image's sampling run as a contact sheet: one row per recorded network call.

    Each row is labelled with step, call index, the step's times, the range of ``t`` and the
    share of certain patches; the column headers (with colour bars) repeat below from 6 rows on.

    Args:
        record: ``SampleResult.record`` (a list of ``CallRecord``) or the ``SampleResult``.
        image_index: which image of the batch.
        every: keep every ``every``-th call (calls ``0, every, 2 every, ...``); the last call is
            always kept, so there are ``len(range(0, n, every))`` rows, plus one when
            ``(n - 1) % every != 0``.
        patch_size: ``p`` of the model (inferred from the record when ``None``).
        decode: latent models: ``(B, C, h, w) -> (B, 3, H, W)`` in ``[-1, 1]`` for the images.
        path: also write the picture there (PNG by extension).
        tile: minimum tile size in px (default 128; small images are enlarged by an integer factor).
        title: heading (default: image index and number of calls).
        note: an extra line under the explanation (e.g. that the maps are on a latent grid).
    Returns:
        the picture; each row adds ``tile + 12`` px to its height.
    """
    rec = records(record)
    indices = select(len(rec), every)
    run = _run(rec, image_index, indices, patch_size, decode, tile)
    subtitle = (
        f"{len(indices)} of {len(rec)} network calls, top to bottom. "
        "Bright uncertainty = the model is unsure; t = how far a patch has been denoised."
        + (f"\n{note}" if note else "")
    )
    st = resolve(style)
    with st.context():
        fig = sheet_figure(
            run, list(range(len(indices))), st, subtitle=subtitle, footer=len(indices) >= 6,
            title=f"Sampling trajectory of image {image_index}" if title is None else title,
        )  # fmt: skip
        return save(render(fig), path)


def trajectory_gif(
    record: Any,
    path: PathLike | None,
    image_index: int = 0,
    every: int = 1,
    patch_size: int | None = None,
    duration_ms: int = 400,
    *,
    decode: Decode | None = None,
    tile: int | None = None,
    hold_last_ms: int = 1600,
    title: str | None = None,
    note: str | None = None,
    style: Style | None = None,
) -> list[Image.Image]:
    """The rows of :func:`trajectory_sheet` as an animation, one frame per kept call.

    Frames share the colour scales of the whole run and have one size. Frame count: as the rows
    of :func:`trajectory_sheet` with the same ``every``. The last frame stays ``hold_last_ms``.
    ``title`` (default ``"Sampling image I"``) is followed by ``": call k of n"`` on each frame;
    ``note`` is a line of text under it.

    Returns:
        the frames (RGB); written as a looping GIF (one shared palette) to ``path`` when given.
    """
    st = resolve(style)
    rec = records(record)
    indices = select(len(rec), every)
    run = _run(rec, image_index, indices, patch_size, decode, tile)
    head = title if title else f"Sampling image {image_index}"
    with st.context():
        frames = [
            render(sheet_figure(run, [n], st, title=f"{head}: call {n + 1} of {len(indices)}", subtitle=note))
            for n in range(len(indices))
        ]
    if path is not None:
        durations = [int(duration_ms)] * (len(frames) - 1) + [max(int(duration_ms), int(hold_last_ms))]
        # one palette for all frames: 16 exact greys (white background, text) + a median cut over all frames,
        # each colour mapped to its exact nearest entry (Pillow's own mapping is approximate)
        rgb = [np.asarray(f) for f in frames]
        cut = Image.fromarray(np.concatenate(rgb)).quantize(240, dither=Image.Dither.NONE).getpalette()[: 3 * 240]
        palette = np.concatenate([np.linspace(0, 255, 16).round().repeat(3), cut]).reshape(-1, 3).astype(np.int64)
        pal = []
        for a in rgb:
            colours, inverse = np.unique(a.reshape(-1, 3), axis=0, return_inverse=True)
            nearest = ((colours[:, None].astype(np.int64) - palette[None]) ** 2).sum(-1).argmin(1).astype(np.uint8)
            pal.append(Image.fromarray(nearest[inverse.reshape(-1)].reshape(a.shape[:2]), "P"))
            pal[-1].putpalette(palette.astype(np.uint8).reshape(-1).tolist())
        atomic_write(
            path,
            lambda tmp: pal[0].save(
                tmp, format="GIF", save_all=True, append_images=pal[1:], duration=durations, loop=0, disposal=1
            ),
        )
    return frames


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
    decode: Decode | None = None,
    options: dict[str, Any] | None = None,
    progress: bool = False,
    style: Style | None = None,
    cache: TokenCache | None = None,
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
        cache: token caching (:class:`~patchforcing.sampling.cache.TokenCache`); the sheet's last
            column then shows which tokens every call recomputed.
    """
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
    spec = GenerationSpec(
        num_samples=1,
        seed=seed,
        sampler=sampler,
        steps=steps,
        nfe=nfe,
        cfg_scale=cfg_scale,
        guidance_interval=guidance_interval,
        labels=labels,
        classes=classes,
        options=dict(options or {}),
    )
    n = max(1, int(num_images)) if overview else 1
    indices = list(range(index, index + n))
    device = module_device(model)
    noise = sample_noise(seed, indices, (model.in_channels, *model.image_size)).to(device)
    y = sample_labels(spec, indices, model.num_classes)
    res = sample(
        model,
        noise,
        sampler,
        steps,
        nfe=nfe,
        y=None if y is None else y.to(device),
        cfg_scale=cfg_scale,
        guidance_interval=guidance_interval,
        record=True,
        progress=progress,
        cache=cache,
        **spec.options,
    )
    rec = res.record
    p = int(model.patch_size)
    gh, gw = model.image_size[0] // p, model.image_size[1] // p
    run = f"{_SAMPLER_NAMES.get(res.sampler, res.sampler)}, {res.steps} steps, {res.nfe} NFE" + (
        f", CFG {cfg_scale:g}" if cfg_scale != 1.0 else ""
    )
    lab = [int(v) for v in y.tolist()] if y is not None else None
    cls = "" if lab is None else f" (class {lab[0]})"
    latent = decode is not None
    grid_note = (
        f"Images decoded by the VAE; time, uncertainty and mask are per latent patch ({gh}x{gw} grid "
        f"of {p}x{p} latent cells), what the model predicts."
        if latent
        else None
    )

    if overview:
        title = (
            f"Sampling of samples {indices[0]}-{indices[-1]}: {run}" if n > 1 else f"Sampling of sample {index}: {run}"
        )
        if latent:
            title += f" (uncertainty and time on the {gh}x{gw} latent patch grid)"
        rows = [f"sample {i}" + ("" if lab is None else f" (class {c})") for i, c in zip(indices, lab or indices)]
        uncertainty_time_figure(
            rec,
            p,
            out,
            num_images=n,
            num_steps=num_steps,
            final=res.x,
            decode=decode,
            title=title,
            row_labels=rows,
            style=style,
        )
        shown = len({int(r.step) for r in rec})
        return TrajectoryResult(
            out,
            "overview",
            indices,
            lab,
            res.sampler,
            res.steps,
            res.nfe,
            res.calls,
            1,
            min(num_steps, shown),
            res.options,
        )

    if every is None:
        every = max(1, math.ceil(len(rec) / 16)) if ext == ".png" else 1
    if ext == ".png":
        trajectory_sheet(
            rec,
            image_index=0,
            every=every,
            patch_size=p,
            decode=decode,
            path=out,
            title=f"Sample {index}{cls}: {run}",
            note=grid_note,
            style=style,
        )
        kind = "sheet"
    else:
        trajectory_gif(
            rec,
            out,
            image_index=0,
            every=every,
            patch_size=p,
            decode=decode,
            title=f"Sample {index}{cls}",
            note=f"{run}.\n{grid_note}" if grid_note else run,
            style=style,
        )
        kind = "gif"
    shown = len(select(len(rec), every))
    return TrajectoryResult(
        out, kind, indices, lab, res.sampler, res.steps, res.nfe, res.calls, every, shown, res.options
    )
