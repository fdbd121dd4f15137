"""Per-patch value maps, colour bars, the uncertainty / time overview and sampler comparisons.

Colours are matplotlib colormaps: :func:`colorize` returns exactly the bytes matplotlib draws for
the same values, limits and map (``Colormap(frac, bytes=True)``). The uncertainty of a patch is
``exp(logvar)`` averaged over its ``p x p`` pixels (the quantity the samplers threshold, see
:func:`patchforcing.sampling.certain_mask`), on a log colour scale shared by the whole figure;
the per-patch time ``t`` uses the fixed scale ``[0, 1]`` (0 = noise, 1 = data).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import matplotlib
import numpy as np
import torch
from matplotlib import ticker
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Colormap, ListedColormap, LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image

from .grid import auto_scale, make_grid, to_uint8_images
from .grid import upscale as _upscale
from .records import Decode, by_step, image_tiles, log_limits, patch_geometry, patch_times, patch_variance, records
from .style import PathLike, Style, log_axis, number, render, resolve, save

__all__ = ["CMAPS", "colorize", "colorbar", "patch_map_image", "uncertainty_time_figure", "sampler_comparison"]

#: The colormaps the figures use by default (any matplotlib colormap name works everywhere).
CMAPS: Mapping[str, Colormap] = MappingProxyType({n: matplotlib.colormaps[n] for n in ("viridis", "magma", "coolwarm")})
TIME = Normalize(0.0, 1.0)


def get_cmap(cmap: str | Colormap) -> Colormap:
    if isinstance(cmap, Colormap):
        return cmap
    try:
        return matplotlib.colormaps[cmap]
    except KeyError:
        raise ValueError(f"unknown colormap {cmap!r}; e.g. {sorted(CMAPS)}") from None


def colorize(
    values: Any,
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str | Colormap = "viridis",
    *,
    log: bool = False,
    nan_color: Sequence[int] = (128, 128, 128),
) -> np.ndarray:
    """Map values to colours.

    Args:
        values: ``(H, W)`` (any shape) floats, tensor or array.
        vmin, vmax: the values of the first and last colour (default: the finite min / max);
            values outside are clipped. Equal limits map everything to the middle colour.
        cmap: a matplotlib colormap or its name.
        log: log10 scale (``vmin``, ``vmax`` are the positive values); non-positive values count as missing.
        nan_color: colour of NaN / missing values.
    Returns:
        ``values.shape + (3,)`` uint8: ``cmap(frac, bytes=True)`` with ``frac`` in ``[0, 1]``.
    """
    v = (values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)).astype(np.float64)
    if log:
        if (vmin is not None and vmin <= 0) or (vmax is not None and vmax <= 0):
            raise ValueError("a log scale needs vmin > 0 and vmax > 0")
        with np.errstate(divide="ignore", invalid="ignore"):
            v = np.where(v > 0, np.log10(np.where(v > 0, v, 1.0)), np.nan)
        vmin, vmax = (None if a is None else math.log10(a) for a in (vmin, vmax))
    finite = np.isfinite(v)
    lo = float(vmin) if vmin is not None else (float(v[finite].min()) if finite.any() else 0.0)
    hi = float(vmax) if vmax is not None else (float(v[finite].max()) if finite.any() else 1.0)
    if hi < lo:
        raise ValueError(f"vmin ({lo}) must not exceed vmax ({hi})")
    frac = (np.where(finite, v, lo) - lo) / (hi - lo) if hi > lo else np.full(v.shape, 0.5)  # constant: middle
    out = np.ascontiguousarray(get_cmap(cmap)(np.clip(frac, 0.0, 1.0), bytes=True)[..., :3])
    out[~finite] = np.asarray(nan_color, dtype=np.uint8)
    return out


def patch_map_image(
    values: Any,
    size: tuple[int, int] | int | None = None,
    *,
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str | Colormap = "viridis",
    log: bool = False,
    min_tile: int = 96,
) -> Image.Image:
    """A per-patch value map, nearest-neighbour enlarged.

    Args:
        values: ``(h, w)`` one value per patch (or ``(N,)`` with ``N`` a square number).
        size: output ``(width, height)`` in pixels, or one int for a square; default: the
            smallest integer enlargement with the longer side at least ``min_tile`` px.
        vmin, vmax, cmap, log: as in :func:`colorize`.
    """
    v = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
    if v.ndim == 1:
        side = math.isqrt(v.size)
        if side * side != v.size:
            raise ValueError(f"{v.size} patch values are not a square grid; pass them as (h, w)")
        v = v.reshape(side, side)
    if v.ndim != 2:
        raise ValueError(f"patch values must be (h, w), got shape {v.shape}")
    if size is None:
        k = auto_scale(v.shape[0], v.shape[1], min_tile)
        size = (v.shape[1] * k, v.shape[0] * k)
    elif isinstance(size, int):
        size = (size, size)
    return Image.fromarray(colorize(v, vmin, vmax, cmap, log=log)).resize((int(size[0]), int(size[1])), Image.NEAREST)


# ---- pieces shared by the figures --------------------------------------------------------------


def norm_of(vmin: float, vmax: float, log: bool) -> Normalize:
    if log and (vmin <= 0 or vmax <= 0):
        raise ValueError("a log colour bar needs vmin > 0 and vmax > 0")
    if vmax < vmin:
        raise ValueError(f"vmin ({vmin}) must not exceed vmax ({vmax})")
    return LogNorm(vmin, vmax) if log else Normalize(vmin, vmax)


def bare(ax: Any, frame: str | None = None) -> Any:
    """No ticks or grid; a frame of colour ``frame`` (``None``: no frame, no axes background)."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    for spine in ax.spines.values():
        spine.set_visible(frame is not None)
        spine.set_color(frame or "none")
    if frame is None:
        ax.patch.set_visible(False)
    return ax


def tile(ax: Any, data: np.ndarray | None, st: Style, norm: Normalize | None = None, cmap: Any = None) -> None:
    """One tile: ``(H, W, 3)`` uint8 image, ``(h, w)`` bool mask, ``(h, w)`` values (``norm``, ``cmap``) or "n/a"."""
    bare(ax, st.frame)
    if data is None or (data.dtype != np.bool_ and data.ndim == 2 and norm is None):
        ax.set_facecolor(st.na_fill)
        ax.text(0.5, 0.5, "n/a", transform=ax.transAxes, ha="center", va="center", color=st.muted, fontsize="large")
    elif data.dtype == np.bool_:
        ax.imshow(data.astype(np.float64), cmap=ListedColormap([st.uncertain, st.certain]), vmin=0.0, vmax=1.0)
    else:
        ax.imshow(data, cmap=None if data.ndim == 3 else get_cmap(cmap), norm=None if data.ndim == 3 else norm)


def mask_legend(
    ax: Any, st: Style, labels: tuple[str, str, str] = ("certain", "uncertain", "n/a: no mask"), **kw: Any
) -> Any:
    """The legend of the mask colours: ``labels`` of the True (certain), False (uncertain) and "n/a" tiles."""
    items = list(zip((st.certain, st.uncertain, st.na_fill), labels))
    handles = [Patch(facecolor=c, edgecolor="#3c3c3c", linewidth=0.6, label=t) for c, t in items]
    return ax.legend(handles=handles, handlelength=1.0, handleheight=1.0, borderpad=0, **kw)


def scale(
    cax: Any, norm: Normalize, cmap: Any, label: str | None, *, vertical: bool = False, ticks: Any = None, n: int = 5
) -> Any:
    """A colour bar in ``cax`` with readable ticks (log scales: :func:`~.style.log_axis`); label above / right."""
    cb = cax.get_figure().colorbar(
        ScalarMappable(norm, get_cmap(cmap)), cax=cax, orientation="vertical" if vertical else "horizontal"
    )
    cb.outline.set_linewidth(0.6)
    axis = cax.yaxis if vertical else cax.xaxis
    if label:
        cb.set_label(label)
        if not vertical:
            axis.set_label_position("top")
    cax.tick_params(length=3, width=0.6, which="both")
    if ticks is not None:
        cb.set_ticks([t for t in ticks if norm.vmin <= t <= norm.vmax])
        axis.set_major_formatter(ticker.FuncFormatter(number))
    elif isinstance(norm, LogNorm):
        log_axis(axis, norm.vmin, norm.vmax, n)
    else:
        axis.set_major_locator(ticker.MaxNLocator(n, steps=[1, 2, 2.5, 5, 10]))
        axis.set_major_formatter(ticker.FuncFormatter(number))
    return cb


# ---- public figures ----------------------------------------------------------------------------


def colorbar(
    length: int,
    vmin: float,
    vmax: float,
    cmap: str | Colormap = "viridis",
    label: str | None = None,
    *,
    orientation: str = "horizontal",
    log: bool = False,
    thickness: int = 12,
    font_size: float | None = None,
    max_ticks: int | None = None,
    ticks: Sequence[float] | None = None,
    style: Style | None = None,
) -> Image.Image:
    """A colour bar with tick labels (and an optional label) as a picture.

    Args:
        length: width (horizontal) or height (vertical) of the picture in pixels (at 100 dpi).
        vmin, vmax: the values at the two ends (positive when ``log``).
        label: text above the bar (horizontal) or along its right side (vertical).
        orientation: ``"horizontal"`` (low values left) or ``"vertical"`` (low values at the bottom).
        log: log10 scale; round values when the range spans less than a decade.
        thickness: bar thickness in px; font_size: tick and label size in points (default: rcParams).
        max_ticks: at most this many ticks (default: from the length); ``ticks``: explicit values.
    """
    if orientation not in ("horizontal", "vertical"):
        raise ValueError(f"orientation must be 'horizontal' or 'vertical', got {orientation!r}")
    norm = norm_of(float(vmin), float(vmax), log)
    if int(length) < 24:
        raise ValueError(f"a colour bar needs a length of at least 24 px, got {length}")
    st = resolve(style)
    vertical = orientation == "vertical"
    with st.context(), matplotlib.rc_context({} if font_size is None else {"font.size": font_size}):
        size = font_size or matplotlib.rcParams["xtick.labelsize"]
        extra = (2.5 if label else 1.3) * size * 100 / 72 + 18  # tick labels (and label) beside the bar
        fig = st.figure(thickness + 1.7 * extra if vertical else length, length if vertical else thickness + extra)
        fig.get_layout_engine().set(w_pad=2 / 72, h_pad=2 / 72)
        with matplotlib.rc_context({"axes.labelsize": size, "xtick.labelsize": size, "ytick.labelsize": size}):
            scale(fig.add_subplot(), norm, cmap, label, vertical=vertical, ticks=ticks, n=max_ticks or length // 45)
        return render(fig)


def _header(ax: Any, text: str) -> Any:
    """An invisible axes (of one header row of a grid) that only carries a column title."""
    bare(ax).set_title(text)
    return ax


def overview_figure(
    record: Any,
    patch_size: int | None = None,
    num_images: int = 4,
    num_steps: int = 6,
    *,
    final: Any = None,
    decode: Decode | None = None,
    title: str | None = None,
    tile_px: int = 96,
    row_labels: Sequence[str] | None = None,
    style: Style | None = None,
) -> Figure:
    """The :class:`~matplotlib.figure.Figure` of :func:`uncertainty_time_figure` (same arguments)."""
    st = resolve(style)
    rec = records(record)
    p, h, w = patch_geometry(rec[0], patch_size)
    steps = by_step(rec)
    ids = sorted(steps)
    picks = sorted({ids[int(round(j))] for j in np.linspace(0, len(ids) - 1, max(1, min(num_steps, len(ids))))})
    n_img = max(1, min(int(num_images), rec[0].x.shape[0]))
    row_labels = [f"image {i}" for i in range(n_img)] if row_labels is None else [str(v) for v in row_labels][:n_img]
    if len(row_labels) < n_img:
        raise ValueError(f"row_labels: {len(row_labels)} labels for {n_img} rows")
    groups = []  # (head, variance maps per image or None, time maps per image)
    for k in picks:
        calls = steps[k]
        spread = [float((c.t[:n_img].amax(1) - c.t[:n_img].amin(1)).float().mean()) for c in calls]
        t_call = calls[max(range(len(calls)), key=lambda j: (spread[j], j))]  # e.g. the look-ahead call
        lv = next((c.logvar for c in calls if c.logvar is not None), None)
        var = None if lv is None else [patch_variance(lv, i, p) for i in range(n_img)]
        groups.append((f"step {k} · s = {calls[0].s:.2f}", var, [patch_times(t_call, i, h, w) for i in range(n_img)]))
    limits = log_limits([m for g in groups if g[1] is not None for m in g[1]])
    unc = None if limits is None else norm_of(*limits, True)
    src = list(torch.as_tensor(final)[:n_img]) if final is not None else [rec[-1].x1_hat[i] for i in range(n_img)]
    finals = image_tiles(src, decode)
    tp = finals.shape[2] * auto_scale(finals.shape[1], finals.shape[2], tile_px)

    ncol = 2 * len(groups) + 2  # row labels, (uncertainty, time) per step, final
    fig = st.figure(
        max(1000, 130 + (ncol - 1) * (tp + 14)), 150 + n_img * (tp + 10),  # at least the subtitle wide
        "Where the model is unsure, and how far each patch has been denoised" if title is None else title,
        "Rows: images. Column pairs: sampling steps. Left of each pair: uncertainty per patch "
        "(bright = unsure). Right: per-patch time t (0 = noise, 1 = data).",
    )  # fmt: skip
    gs = fig.add_gridspec(
        n_img + 2, ncol, width_ratios=[110 / tp] + [1] * (ncol - 1), height_ratios=[0.01] + [1] * n_img + [0.1]
    )
    for j, (head, var, tmaps) in enumerate(groups):
        _header(fig.add_subplot(gs[0, 1 + 2 * j : 3 + 2 * j]), head)
        for i in range(n_img):
            a, b = fig.add_subplot(gs[1 + i, 1 + 2 * j]), fig.add_subplot(gs[1 + i, 2 + 2 * j])
            tile(a, None if var is None else var[i], st, unc, st.uncertainty_cmap)
            tile(b, tmaps[i], st, TIME, st.time_cmap)
            if i == 0:
                a.set_title("uncertainty", color=st.muted, fontsize="medium")
                b.set_title("time t", color=st.muted, fontsize="medium")
    _header(fig.add_subplot(gs[0, -1]), "final sample" if final is not None else "final estimate")
    for i in range(n_img):
        tile(fig.add_subplot(gs[1 + i, -1]), finals[i], st)
        bare(fig.add_subplot(gs[1 + i, 0])).text(0, 0.5, row_labels[i], va="center")
        fig.axes[-2].set_title(" ", fontsize="medium") if i == 0 else None  # the final column aligns with the maps
    half = ncol // 2
    if unc is not None:
        scale(fig.add_subplot(gs[-1, 1:half]), unc, st.uncertainty_cmap, "uncertainty: variance per patch (log scale)")
    scale(fig.add_subplot(gs[-1, half + 1 : ncol - 1]), TIME, st.time_cmap, "per-patch time t (0 = noise, 1 = data)")
    return fig


def uncertainty_time_figure(
    record: Any,
    patch_size: int | None = None,
    path: PathLike | None = None,
    num_images: int = 4,
    num_steps: int = 6,
    *,
    final: Any = None,
    decode: Decode | None = None,
    title: str | None = None,
    tile: int = 96,
    row_labels: Sequence[str] | None = None,
    style: Style | None = None,
) -> Image.Image:
    """Overview: where the model is unsure and how fast each patch is denoised.

    Rows are the first ``num_images`` images; column groups are ``num_steps`` evenly spaced
    outer steps (first and last included), each with the uncertainty map (``exp(logvar)``
    averaged per patch, from the step's first call; one log scale for the whole figure, "n/a"
    without a log-variance) and the per-patch time map (from the step's call with the widest spread
    of times, e.g. the look-ahead call; scale ``[0, 1]``). The last column shows ``final`` (the
    samples, e.g. ``res.x``) or, when not given, the clean estimate of the last call. Colour bars below.

    Args:
        record: ``SampleResult.record`` or the ``SampleResult``.
        patch_size: ``p`` of the model (inferred when ``None``).
        path: also write the picture there.
        final: ``(B, C, H, W)`` final samples (decoded with ``decode`` if given).
        decode: latent models: ``(B, C, h, w) -> (B, 3, H, W)`` in ``[-1, 1]``.
        tile: minimum tile size in px.
        row_labels: one label per row (default ``"image i"``), e.g. ``"sample 12 (class 3)"``.
    """
    st = resolve(style)
    with st.context():
        fig = overview_figure(
            record, patch_size, num_images, num_steps, final=final, decode=decode, title=title, tile_px=tile,
            row_labels=row_labels, style=st,
        )  # fmt: skip
        return save(render(fig), path)


def sampler_comparison(
    grids: Mapping[str, Any],
    path: PathLike | None = None,
    labels: Mapping[str, str] | None = None,
    nrow: int | None = None,
    *,
    upscale: int | None = None,
    title: str | None = None,
    min_tile: int = 64,
    style: Style | None = None,
) -> Image.Image:
    """Sample grids of several samplers side by side, each under its title.

    Args:
        grids: name -> ``(B, C, H, W)`` samples (or ``(B, H, W, 3)`` uint8), in display order.
        labels: name -> title (e.g. ``{"look_ahead": "look_ahead · 24 NFE"}``); default: the name.
        nrow: images per grid row (default ``ceil(sqrt(B))``).
        upscale: nearest-neighbour enlargement (default: tiles at least ``min_tile`` px).
        title: heading over the whole figure.
    Returns:
        the picture; each grid (``make_grid`` of the enlarged samples) is drawn at about its pixel size.
    """
    if not grids:
        raise ValueError("sampler_comparison: no grids")
    st = resolve(style)
    panels = []
    for name, x in grids.items():
        imgs = to_uint8_images(x)
        k = auto_scale(imgs.shape[1], imgs.shape[2], min_tile) if upscale is None else int(upscale)
        panels.append(((labels or {}).get(name, str(name)), make_grid(_upscale(imgs, k), nrow=nrow)))
    gw, gh = max(g.shape[1] for _, g in panels), max(g.shape[0] for _, g in panels)
    with st.context():
        fig = st.figure(len(panels) * (gw + 24) + 10, gh + (70 if title else 45), title)
        for ax, (text, g) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
            bare(ax).imshow(g)
            ax.set_title(text)
        return save(render(fig), path)
