"""Charts of the analysis (:mod:`patchforcing.analysis`): line charts, density scatter plots, histograms.

Every function draws one matplotlib figure of ``size`` pixels (at 100 dpi) with a title, an
optional subtitle, axis labels, grid lines and a legend below the axes (so it never hides data),
and returns it as a :class:`PIL.Image.Image` (also written to ``path`` when given). Axes may be
linear or log10. Colours are RGB triples of 0..255 ints (:data:`COLORS`) or any matplotlib colour.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from PIL import Image

from .style import COLORS, PathLike, Style, log_axis, render, resolve, rgb01, save

__all__ = ["COLORS", "Series", "line_chart", "scatter_density", "histogram_chart", "hstack"]

Color = Any
_LINES = {"solid": "-", "dashed": "--", None: "none"}
_MARKERS = ("o", "s", "D", "^", "x", None)


@dataclass
class Series:
    """One line of a :func:`line_chart`.

    Attributes:
        x, y: the points (NaN / non-finite points are skipped; the line breaks there).
        label: legend text.
        color: RGB (0..255) or a matplotlib colour.
        marker: ``"o"``, ``"s"``, ``"D"``, ``"^"``, ``"x"`` or ``None``.
        line: ``"solid"``, ``"dashed"`` or ``None`` (markers only).
    """

    x: Sequence[float]
    y: Sequence[float]
    label: str
    color: Color = COLORS[0]
    marker: str | None = "o"
    line: str | None = "solid"


def _auto_limits(
    values: list[Any], given: tuple[float, float] | None, log: bool, pad: float = 0.05
) -> tuple[float, float]:
    """``given``, or the finite (positive on log axes) range of ``values`` plus ``pad`` on each side."""
    if given is not None:
        return float(given[0]), float(given[1])
    v = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in values]) if values else np.zeros(0)
    v = v[np.isfinite(v) & ((v > 0) if log else True)]
    if v.size == 0:
        return (0.1, 10.0) if log else (0.0, 1.0)
    lo, hi = float(v.min()), float(v.max())
    if log:
        a, b = math.log10(lo), math.log10(hi)
        a, b = (a - 0.5, b + 0.5) if b - a < 1e-9 else (a, b)
        return 10 ** (a - (b - a) * pad), 10 ** (b + (b - a) * pad)
    if hi - lo < 1e-12 * max(1.0, abs(hi)):
        d = max(abs(hi) * 0.1, 1e-3)
        return lo - d, hi + d
    return lo - (hi - lo) * pad, hi + (hi - lo) * pad


def _axes(size: tuple[int, int], st: Style, title: str, subtitle: str | None, xlabel: str, ylabel: str,
          xlim: tuple[float, float], ylim: tuple[float, float], xlog: bool, ylog: bool) -> tuple[Any, Any]:  # fmt: skip
    fig = st.figure(*size, title)
    ax = fig.add_subplot(
        xlabel=xlabel, ylabel=ylabel, xscale="log" if xlog else "linear", yscale="log" if ylog else "linear"
    )
    if subtitle:
        ax.set_title(subtitle, loc="left", fontsize="medium", color=st.muted)
    for log, axis, lim in ((xlog, ax.xaxis, xlim), (ylog, ax.yaxis, ylim)):
        if log:
            log_axis(axis, *lim)
    ax.set(xlim=xlim, ylim=ylim)
    return fig, ax


def _finish(
    fig: Any, ax: Any, handles: list[Any], notes: Sequence[str], corner: str, st: Style, path: PathLike | None
) -> Image.Image:
    if notes:
        right = corner == "top-right"
        ax.text(
            0.98 if right else 0.02,
            0.97,
            "\n".join(notes),
            transform=ax.transAxes,
            va="top",
            ha="right" if right else "left",
            zorder=5,
            bbox={"boxstyle": "square,pad=0.35", "facecolor": "white", "edgecolor": "#dedede", "alpha": 0.9},
        )
    fig.legend(
        handles=handles, loc="outside lower left", ncols=1 if any(len(h.get_label()) > 28 for h in handles) else 2
    )
    return save(render(fig), path)


def _check_style(marker: str | None, line: str | None) -> None:
    if marker not in _MARKERS:
        raise ValueError(f"unknown marker {marker!r}; use o, s, D, ^, x or None")
    if line not in _LINES:
        raise ValueError(f"unknown line style {line!r}; use 'solid', 'dashed' or None")


def line_chart(
    series: Sequence[Series],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    subtitle: str | None = None,
    xlim: tuple[float, float] | None = None,
    ylim: tuple[float, float] | None = None,
    xlog: bool = False,
    ylog: bool = False,
    hlines: Sequence[float] = (),
    notes: Sequence[str] = (),
    size: tuple[int, int] = (620, 420),
    path: PathLike | None = None,
    style: Style | None = None,
) -> Image.Image:
    """Lines (with markers) over shared axes; legend below the axes.

    Args:
        series: the lines, drawn in order.
        xlim, ylim: axis limits (default: the data's range plus 5 %).
        xlog, ylog: log10 axes.
        hlines: y values of thin reference lines (e.g. 0).
        notes: text lines in a box in the top-left corner of the axes.
        size: ``(width, height)`` of the picture in pixels.
    Returns:
        a ``size`` picture.
    """
    if not series:
        raise ValueError("line_chart: no series")
    st = resolve(style)
    for s in series:
        _check_style(s.marker, s.line)
    with st.context():
        fig, ax = _axes(
            size,
            st,
            title,
            subtitle,
            xlabel,
            ylabel,
            _auto_limits([s.x for s in series], xlim, xlog),
            _auto_limits([s.y for s in series], ylim, ylog),
            xlog,
            ylog,
        )
        for h in hlines:
            ax.axhline(h, color=st.muted, linewidth=0.9, zorder=1)
        handles = []
        for s in series:
            x, y = np.asarray(s.x, dtype=np.float64), np.asarray(s.y, dtype=np.float64)
            handles += ax.plot(
                x,
                np.where(np.isfinite(x) & np.isfinite(y), y, np.nan),
                color=rgb01(s.color),
                marker=s.marker or "none",
                linestyle=_LINES[s.line],
                label=s.label,
                markeredgecolor=rgb01(s.color) if s.marker == "x" else "white",
                markeredgewidth=2 if s.marker == "x" else 0.8,
                markersize=7 if s.marker == "x" else 6,
            )
        return _finish(fig, ax, handles, notes, "top-left", st, path)


def scatter_density(
    x: Any,
    y: Any,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    subtitle: str | None = None,
    log: bool = True,
    diagonal: str | None = None,
    notes: Sequence[str] = (),
    label: str = "one patch (darker: many patches)",
    color: Color = COLORS[0],
    lims: tuple[float, float] | None = None,
    size: tuple[int, int] = (560, 520),
    path: PathLike | None = None,
    style: Style | None = None,
) -> Image.Image:
    """A scatter plot of many points, translucent dots so that dense regions are darker.

    Args:
        x, y: the points (non-finite, and non-positive on log axes, are dropped).
        log: log10 scale on both axes.
        diagonal: when given, draw ``y = x`` (dashed) with this legend label.
        notes: text lines in a box in the top-left corner (e.g. the correlation).
        lims: the same limits for both axes (default: the joint range of x and y).
    """
    xv = np.asarray(x, dtype=np.float64).ravel()
    yv = np.asarray(y, dtype=np.float64).ravel()
    if xv.shape != yv.shape:
        raise ValueError(f"x and y differ in size: {xv.size} vs {yv.size}")
    ok = np.isfinite(xv) & np.isfinite(yv) & (((xv > 0) & (yv > 0)) if log else True)
    xv, yv = xv[ok], yv[ok]
    st = resolve(style)
    lim = _auto_limits([xv, yv], lims, log)
    with st.context():
        fig, ax = _axes(size, st, title, subtitle, xlabel, ylabel, lim, lim, log, log)
        alpha = float(np.clip(30.0 / math.sqrt(max(xv.size, 1)), 0.08, 0.6))  # a single dot stays visible
        ax.scatter(xv, yv, s=6, color=rgb01(color), alpha=alpha, linewidths=0, zorder=2)
        handles = [Line2D([], [], linestyle="none", marker="o", color=rgb01(color), markeredgewidth=0, label=label)]
        if diagonal:
            handles += ax.plot(lim, lim, linestyle="--", color=st.muted, linewidth=1.5, label=diagonal, zorder=3)
        ax.set_aspect("equal" if size[0] >= size[1] * 0.8 else "auto", adjustable="box")
        return _finish(fig, ax, handles, notes, "top-left", st, path)


def histogram_chart(
    edges: Any,
    counts: Mapping[str, Any],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    subtitle: str | None = None,
    xlog: bool = True,
    colors: Sequence[Color] | None = None,
    vlines: Sequence[tuple[float, str]] = (),
    notes: Sequence[str] = (),
    size: tuple[int, int] = (640, 440),
    path: PathLike | None = None,
    style: Style | None = None,
) -> Image.Image:
    """Overlaid histograms (translucent fills, outlined steps) on shared bins.

    Args:
        edges: ``(K + 1,)`` bin edges (positive when ``xlog``).
        counts: legend label -> ``(K,)`` heights (e.g. the share of patches in %), in drawing order.
        colors: one per histogram (default :data:`COLORS`).
        vlines: ``(x, label)``: dashed vertical lines in the colour of the histogram of the same
            position (e.g. the medians), with legend entries.
        notes: text lines in a box in the top-right corner.
    """
    e = np.asarray(edges, dtype=np.float64).ravel()
    if e.size < 2:
        raise ValueError("histogram_chart: need at least two edges")
    names = list(counts)
    if not names:
        raise ValueError("histogram_chart: no histograms")
    cols = [rgb01(c) for c in (colors if colors is not None else [COLORS[i % len(COLORS)] for i in range(len(names))])]
    hs = [np.asarray(counts[n], dtype=np.float64).ravel() for n in names]
    for n, h in zip(names, hs):
        if h.size != e.size - 1:
            raise ValueError(f"histogram {n!r} has {h.size} bins for {e.size} edges")
    st = resolve(style)
    top = max(float(max(h.max() for h in hs)), 1e-12)
    with st.context():
        fig, ax = _axes(
            size, st, title, subtitle, xlabel, ylabel, (float(e[0]), float(e[-1])), (0.0, top * 1.08), xlog, False
        )
        for h, c in zip(hs, cols):
            ax.stairs(h, e, fill=True, color=c, alpha=0.27, linewidth=0, zorder=2)
        for h, c in zip(hs, cols):  # outlines on top of all fills
            ax.stairs(h, e, color=c, linewidth=1.8, zorder=3)
        handles = [
            Patch(facecolor=(*c[:3], 0.35) if isinstance(c, tuple) else c, edgecolor=c, linewidth=1.8, label=n)
            for n, c in zip(names, cols)
        ]
        for i, (xv, lab) in enumerate(vlines):
            handles.append(
                ax.axvline(xv, color=cols[i % len(cols)], linestyle="--", linewidth=1.8, label=lab, zorder=4)
            )
        return _finish(fig, ax, handles, notes, "top-right", st, path)


def hstack(images: Sequence[Image.Image], gap: int = 12, path: PathLike | None = None) -> Image.Image:
    """Pictures side by side (tops aligned) on white: ``sum(widths) + gap * (n - 1)`` by ``max(heights)``."""
    if not images:
        raise ValueError("hstack: no images")
    out = Image.new(
        "RGB",
        (sum(im.width for im in images) + gap * (len(images) - 1), max(im.height for im in images)),
        (255, 255, 255),
    )
    x = 0
    for im in images:
        out.paste(im.convert("RGB"), (x, 0))
        x += im.width + gap
    return save(out, path)
