"""Small charts drawn with PIL: line charts, density scatter plots, histograms (headless).

Built on the text, tick and colour helpers of :mod:`patchforcing.viz` (same fonts, colours and
tick rules), for the analysis figures (:mod:`patchforcing.analysis`). Every function returns a
:class:`PIL.Image.Image` and, when ``path`` is given, also writes it (format from the extension).

Charts are drawn at twice their size and reduced (smooth lines and markers). Axes may be linear
or log10; ticks, grid lines, axis labels, a title, an optional subtitle and a legend (below the
axes, so it never hides data) are always drawn.

Public functions: :func:`line_chart`, :func:`scatter_density`, :func:`histogram_chart`,
:func:`hstack`; :class:`Series` describes one line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from .viz import (
    _BG,
    _MUTED,
    _OUTLINE,
    _RULE,
    PathLike,
    _decimals,
    _fmt,
    _linear_ticks,
    _log_ticks,
    _put_text,
    _rotated_text,
    _save,
    _text_size,
)

__all__ = ["COLORS", "Series", "line_chart", "scatter_density", "histogram_chart", "hstack"]

#: A colour-blind safe cycle (blue, orange, green, red-purple, grey).
COLORS: tuple[tuple[int, int, int], ...] = ((40, 110, 185), (235, 125, 20), (30, 150, 95), (190, 55, 120), (120, 120, 120))

_SS = 2  # supersampling factor
_TITLE, _SUB, _LABEL, _TICK, _LEGEND = 18, 13, 14, 12, 13
Color = tuple[int, int, int]


@dataclass
class Series:
    """One line of a :func:`line_chart`.

    Attributes:
        x, y: the points (NaN / non-finite points are skipped; the line breaks there).
        label: legend text.
        color: RGB.
        marker: ``"o"``, ``"s"``, ``"D"``, ``"^"``, ``"x"`` or ``None``.
        line: ``"solid"``, ``"dashed"`` or ``None`` (markers only).
    """

    x: Sequence[float]
    y: Sequence[float]
    label: str
    color: Color = COLORS[0]
    marker: str | None = "o"
    line: str | None = "solid"


# --------------------------------------------------------------------------------------------
# Scales and layout
# --------------------------------------------------------------------------------------------


class _Scale:
    def __init__(self, lo: float, hi: float, log: bool, a: float, b: float):
        if log and (lo <= 0 or hi <= 0):
            raise ValueError("a log axis needs positive limits")
        self.lo, self.hi, self.log, self.a, self.b = lo, hi, log, a, b
        self._lo = math.log10(lo) if log else lo
        self._hi = math.log10(hi) if log else hi

    def __call__(self, v: Any) -> np.ndarray:
        v = np.asarray(v, dtype=np.float64)
        if self.log:
            with np.errstate(divide="ignore", invalid="ignore"):
                v = np.where(v > 0, np.log10(np.where(v > 0, v, 1.0)), np.nan)
        span = self._hi - self._lo
        frac = (v - self._lo) / span if span > 0 else np.full(v.shape, 0.5)
        return self.a + frac * (self.b - self.a)

    def ticks(self, max_ticks: int) -> list[tuple[float, str]]:
        ticks, step = (_log_ticks if self.log else _linear_ticks)(self.lo, self.hi, max_ticks)
        if len(ticks) < 2 and self.hi > self.lo:
            ticks, step = [self.lo, self.hi], None
        ticks = [t for t in ticks if self.lo - 1e-12 * abs(self.lo) <= t <= self.hi + 1e-12 * abs(self.hi)]
        labels = [_fmt(t, step) for t in ticks]
        if step is not None and not self.log and step < 1 and max((abs(t) for t in ticks), default=0) < 1e5:
            d = _decimals(step)  # the same number of decimals on every tick (0.9959, 0.9960, ...)
            if d <= 8:
                labels = [f"{0.0 if abs(t) < step * 1e-6 else t:.{d}f}" for t in ticks]
        return list(zip(ticks, labels))


def _auto_limits(values: np.ndarray, log: bool, pad: float = 0.05) -> tuple[float, float]:
    v = values[np.isfinite(values)]
    if log:
        v = v[v > 0]
    if v.size == 0:
        return (0.1, 10.0) if log else (0.0, 1.0)
    lo, hi = float(v.min()), float(v.max())
    if log:
        a, b = math.log10(lo), math.log10(hi)
        if b - a < 1e-9:
            a, b = a - 0.5, b + 0.5
        d = (b - a) * pad
        return 10 ** (a - d), 10 ** (b + d)
    if hi - lo < 1e-12 * max(1.0, abs(hi)):
        d = max(abs(hi) * 0.1, 1e-3)
        return lo - d, hi + d
    d = (hi - lo) * pad
    return lo - d, hi + d


@dataclass
class _LegendItem:
    label: str
    color: Color
    kind: str = "line"  # line | patch | dots
    marker: str | None = None
    line: str | None = "solid"


def _legend_rows(items: Sequence[_LegendItem], width: int) -> list[list[tuple[_LegendItem, int]]]:
    """Items flowed into rows of at most ``width`` px (entry widths included)."""
    s = _SS
    rows: list[list[tuple[_LegendItem, int]]] = [[]]
    used = 0
    for it in items:
        w = 30 * s + 6 * s + _text_size(it.label, _LEGEND * s)[0]
        if rows[-1] and used + 18 * s + w > width:
            rows.append([])
            used = 0
        used += (18 * s if rows[-1] else 0) + w
        rows[-1].append((it, w))
    return [r for r in rows if r]


def _draw_marker(draw: ImageDraw.ImageDraw, x: float, y: float, marker: str | None, color: Color, r: float) -> None:
    if marker is None:
        return
    fill = color + (255,) if len(color) == 3 else color
    white = (255, 255, 255, 255)
    if marker == "o":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill, outline=white, width=max(1, int(r / 3)))
    elif marker == "s":
        q = r * 0.9
        draw.rectangle((x - q, y - q, x + q, y + q), fill=fill, outline=white, width=max(1, int(r / 3)))
    elif marker == "D":
        q = r * 1.2
        draw.polygon([(x, y - q), (x + q, y), (x, y + q), (x - q, y)], fill=fill, outline=white)
    elif marker == "^":
        q = r * 1.2
        draw.polygon([(x, y - q), (x + q, y + q * 0.8), (x - q, y + q * 0.8)], fill=fill, outline=white)
    elif marker == "x":
        q = r * 1.1
        w = max(2, int(r / 2))
        draw.line((x - q, y - q, x + q, y + q), fill=fill, width=w)
        draw.line((x - q, y + q, x + q, y - q), fill=fill, width=w)
    else:
        raise ValueError(f"unknown marker {marker!r}; use o, s, D, ^, x or None")


def _dashed(draw: ImageDraw.ImageDraw, pts: list[tuple[float, float]], color: Any, width: int, dash: float, gap: float) -> None:
    """A dashed polyline (the pattern continues across vertices)."""
    on, left = True, dash
    for (x0, y0), (x1, y1) in zip(pts[:-1], pts[1:]):
        seg = math.hypot(x1 - x0, y1 - y0)
        pos = 0.0
        while pos < seg - 1e-9:
            step = min(left, seg - pos)
            if on:
                a, b = pos / seg, (pos + step) / seg
                draw.line((x0 + a * (x1 - x0), y0 + a * (y1 - y0), x0 + b * (x1 - x0), y0 + b * (y1 - y0)),
                          fill=color, width=width)
            pos += step
            left -= step
            if left <= 1e-9:
                on = not on
                left = dash if on else gap


def _polyline(draw: ImageDraw.ImageDraw, pts: list[tuple[float, float]], color: Any, width: int, style: str | None) -> None:
    if style is None or len(pts) < 2:
        return
    if style == "solid":
        draw.line(pts, fill=color, width=width, joint="curve")
    elif style == "dashed":
        _dashed(draw, pts, color, width, dash=7.0 * _SS, gap=5.0 * _SS)
    else:
        raise ValueError(f"unknown line style {style!r}; use 'solid', 'dashed' or None")


class _Chart:
    """A canvas (supersampled) with one set of axes, title, axis labels and a legend below."""

    def __init__(self, size: tuple[int, int], *, title: str, xlabel: str, ylabel: str, subtitle: str | None,
                 xlim: tuple[float, float], ylim: tuple[float, float], xlog: bool, ylog: bool,
                 legend: Sequence[_LegendItem]):
        s = _SS
        W, H = int(size[0]) * s, int(size[1]) * s
        M = 12 * s
        self.img = Image.new("RGB", (W, H), _BG)
        self.draw = ImageDraw.Draw(self.img)
        y = _put_text(self.img, M, M, title, _TITLE * s)
        if subtitle:
            y = _put_text(self.img, M, y + 3 * s, subtitle, _SUB * s, fill=_MUTED)
        top = y + 12 * s

        # y ticks need their width before the plot rectangle is known
        probe = _Scale(*ylim, ylog, 0, 1)
        yticks = probe.ticks(8)
        tick_w = max([_text_size(t, _TICK * s)[0] for _, t in yticks] + [s])
        ylab = _rotated_text(ylabel, _LABEL * s)
        left = M + ylab.width + 8 * s + tick_w + 6 * s
        right = W - M - 14 * s
        rows = _legend_rows(legend, right - left + 40 * s)
        line_h = _text_size("Ag", _LEGEND * s)[1]
        legend_h = len(rows) * (line_h + 4 * s) + (6 * s if rows else 0)
        tick_h = _text_size("0", _TICK * s)[1]
        xlab_h = _text_size(xlabel, _LABEL * s)[1]
        bottom = H - M - legend_h - xlab_h - 6 * s - tick_h - 6 * s
        if bottom - top < 60 * s or right - left < 60 * s:
            raise ValueError(f"chart size {size} is too small for its labels")
        self.rect = (left, top, right, bottom)
        self.xs = _Scale(*xlim, xlog, left, right)
        self.ys = _Scale(*ylim, ylog, bottom, top)

        # grid, ticks, labels
        d = self.draw
        for v, text in self.ys.ticks(8):
            py = float(self.ys(v))
            d.line((left, py, right, py), fill=_RULE, width=s)
            d.line((left - 4 * s, py, left, py), fill=_OUTLINE, width=s)
            _put_text(self.img, left - 6 * s, int(py - tick_h / 2), text, _TICK * s, align="right")
        prev_right = -10**9
        for v, text in self.xs.ticks(max(3, (right - left) // (70 * s))):
            px = float(self.xs(v))
            d.line((px, top, px, bottom), fill=_RULE, width=s)
            d.line((px, bottom, px, bottom + 4 * s), fill=_OUTLINE, width=s)
            w = _text_size(text, _TICK * s)[0]
            lx = int(px - w / 2)
            if lx > prev_right + 4 * s:
                _put_text(self.img, lx, bottom + 6 * s, text, _TICK * s)
                prev_right = lx + w
        _put_text(self.img, (left + right) // 2, bottom + 6 * s + tick_h + 6 * s, xlabel, _LABEL * s, align="center")
        self.img.paste(ylab, (M, max(top, (top + bottom - ylab.height) // 2)), ylab)
        self._legend_y = bottom + 6 * s + tick_h + 6 * s + xlab_h + 6 * s
        self._legend_rows = rows
        self._legend_left = left - 20 * s
        self.layer = Image.new("RGBA", (W, H), (0, 0, 0, 0))  # data, clipped to the axes at the end
        self.ldraw = ImageDraw.Draw(self.layer)

    # -- data ----------------------------------------------------------------------------------
    def series(self, x: Any, y: Any, color: Color, marker: str | None, line: str | None) -> None:
        px, py = self.xs(x), self.ys(y)
        ok = np.isfinite(px) & np.isfinite(py)
        runs, cur = [], []
        for a, b, good in zip(px, py, ok):
            if good:
                cur.append((float(a), float(b)))
            elif cur:
                runs.append(cur)
                cur = []
        if cur:
            runs.append(cur)
        for run in runs:
            _polyline(self.ldraw, run, color + (255,), 2 * _SS, line)
        for run in runs:
            for a, b in run:
                _draw_marker(self.ldraw, a, b, marker, color, 4.0 * _SS)

    def hline(self, y: float, color: Any = _OUTLINE, style: str = "solid", width: int = 1) -> None:
        py = float(self.ys(y))
        if np.isfinite(py):
            _polyline(self.ldraw, [(self.rect[0], py), (self.rect[2], py)], tuple(color) + (255,), width * _SS, style)

    def vline(self, x: float, color: Any, style: str = "dashed", width: int = 2) -> None:
        px = float(self.xs(x))
        if np.isfinite(px):
            _polyline(self.ldraw, [(px, self.rect[1]), (px, self.rect[3])], tuple(color) + (255,), width * _SS, style)

    def note(self, text: str, corner: str = "top-left") -> None:
        """Text in a corner of the axes on a white box."""
        s = _SS
        left, top, right, bottom = self.rect
        w, h = _text_size(text, _SUB * s)
        x = left + 8 * s if "left" in corner else right - 8 * s - w
        y = top + 8 * s if "top" in corner else bottom - 8 * s - h
        self.ldraw.rectangle((x - 4 * s, y - 3 * s, x + w + 4 * s, y + h + 3 * s), fill=(255, 255, 255, 225),
                             outline=_RULE + (255,))
        self._notes = getattr(self, "_notes", []) + [(x, y, text)]

    # -- finish --------------------------------------------------------------------------------
    def finish(self, path: PathLike | None) -> Image.Image:
        s = _SS
        left, top, right, bottom = self.rect
        clip = Image.new("L", self.layer.size, 0)
        ImageDraw.Draw(clip).rectangle((left, top, right, bottom), fill=255)
        alpha = np.minimum(np.asarray(self.layer.getchannel("A")), np.asarray(clip))
        self.layer.putalpha(Image.fromarray(alpha))
        self.img.paste(self.layer, (0, 0), self.layer)
        for x, y, text in getattr(self, "_notes", []):
            _put_text(self.img, x, y, text, _SUB * s)
        self.draw.rectangle((left, top, right, bottom), outline=_OUTLINE, width=s)
        y = self._legend_y
        line_h = _text_size("Ag", _LEGEND * s)[1]
        for row in self._legend_rows:
            x = self._legend_left
            for it, w in row:
                cy = y + line_h / 2
                if it.kind == "patch":
                    self.draw.rectangle((x + 6 * s, cy - 6 * s, x + 24 * s, cy + 6 * s), fill=_tint(it.color, 0.35),
                                        outline=it.color, width=2 * s)
                elif it.kind == "dots":
                    for dx, dy in ((8, 2), (15, -3), (22, 3)):
                        self.draw.ellipse((x + dx * s - 2 * s, cy + dy * s - 2 * s, x + dx * s + 2 * s, cy + dy * s + 2 * s),
                                          fill=it.color)
                else:
                    _polyline(self.draw, [(x, cy), (x + 30 * s, cy)], it.color, 2 * s, it.line)
                    _draw_marker(self.draw, x + 15 * s, cy, it.marker, it.color, 4.0 * s)
                _put_text(self.img, x + 36 * s, int(y), it.label, _LEGEND * s)
                x += w + 18 * s
            y += line_h + 4 * s
        out = self.img.resize((self.img.width // s, self.img.height // s), Image.LANCZOS)
        return _save(out, path)


def _tint(color: Color, amount: float) -> Color:
    """``color`` mixed with white (``amount`` = share of the colour)."""
    return tuple(int(round(255 + amount * (c - 255))) for c in color)  # type: ignore[return-value]


def _limits_of(values: list[np.ndarray], given: tuple[float, float] | None, log: bool) -> tuple[float, float]:
    if given is not None:
        return float(given[0]), float(given[1])
    allv = np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in values]) if values else np.zeros(0)
    return _auto_limits(allv, log)


# --------------------------------------------------------------------------------------------
# Public charts
# --------------------------------------------------------------------------------------------


def line_chart(series: Sequence[Series], *, title: str, xlabel: str, ylabel: str, subtitle: str | None = None,
               xlim: tuple[float, float] | None = None, ylim: tuple[float, float] | None = None,
               xlog: bool = False, ylog: bool = False, hlines: Sequence[float] = (),
               notes: Sequence[str] = (), size: tuple[int, int] = (620, 420),
               path: PathLike | None = None) -> Image.Image:
    """Lines (with markers) over shared axes; legend below the axes.

    Args:
        series: the lines, drawn in order.
        xlim, ylim: axis limits (default: the data's range plus 5 %).
        xlog, ylog: log10 axes.
        hlines: y values of thin reference lines (e.g. 0).
        notes: text lines in a box in the top-left corner of the axes.
        size: ``(width, height)`` of the picture in pixels.
    """
    if not series:
        raise ValueError("line_chart: no series")
    xl = _limits_of([np.asarray(s.x, dtype=np.float64) for s in series], xlim, xlog)
    yl = _limits_of([np.asarray(s.y, dtype=np.float64) for s in series], ylim, ylog)
    legend = [_LegendItem(s.label, s.color, "line", s.marker, s.line) for s in series]
    ch = _Chart(size, title=title, xlabel=xlabel, ylabel=ylabel, subtitle=subtitle, xlim=xl, ylim=yl,
                xlog=xlog, ylog=ylog, legend=legend)
    for h in hlines:
        ch.hline(h, color=_MUTED)
    for s in series:
        ch.series(s.x, s.y, s.color, s.marker, s.line)
    if notes:
        ch.note("\n".join(notes))
    return ch.finish(path)


def scatter_density(x: Any, y: Any, *, title: str, xlabel: str, ylabel: str, subtitle: str | None = None,
                    log: bool = True, diagonal: str | None = None, notes: Sequence[str] = (),
                    label: str = "one patch (darker: many patches)", color: Color = COLORS[0],
                    lims: tuple[float, float] | None = None, size: tuple[int, int] = (560, 520),
                    path: PathLike | None = None) -> Image.Image:
    """A scatter plot of many points, shaded by how many fall on each dot (darker = more).

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
    ok = np.isfinite(xv) & np.isfinite(yv)
    if log:
        ok &= (xv > 0) & (yv > 0)
    xv, yv = xv[ok], yv[ok]
    lim = _limits_of([xv, yv], lims, log)
    legend = [_LegendItem(label, color, "dots")]
    if diagonal:
        legend.append(_LegendItem(diagonal, _MUTED, "line", None, "dashed"))
    ch = _Chart(size, title=title, xlabel=xlabel, ylabel=ylabel, subtitle=subtitle, xlim=lim, ylim=lim,
                xlog=log, ylog=log, legend=legend)
    left, top, right, bottom = ch.rect
    if xv.size:
        px = np.clip(np.round(ch.xs(xv) - left).astype(np.int64), 0, right - left)
        py = np.clip(np.round(ch.ys(yv) - top).astype(np.int64), 0, bottom - top)
        counts = np.zeros((bottom - top + 1, right - left + 1), dtype=np.float64)
        np.add.at(counts, (py, px), 1.0)
        r = int(1.5 * _SS)  # dot radius: spread each count over a small disc
        spread = np.zeros_like(counts)
        for dy in range(-r, r + 1):
            for dx in range(-r, r + 1):
                if dx * dx + dy * dy <= r * r + 1:
                    spread += np.roll(np.roll(counts, dy, axis=0), dx, axis=1)
        hit = spread > 0
        level = np.log1p(spread) / max(np.log1p(spread.max()), 1e-12)
        amount = np.where(hit, 0.3 + 0.7 * level, 0.0)  # even a single patch stays visible
        rgb = (255.0 + amount[..., None] * (np.asarray(color, dtype=np.float64) * 0.8 - 255.0))
        rgba = np.dstack([np.clip(rgb, 0, 255), np.where(hit, 255, 0)]).astype(np.uint8)
        tile = Image.fromarray(rgba, "RGBA")
        ch.layer.paste(tile, (left, top), tile)
    if diagonal:
        ch.series(list(lim), list(lim), _MUTED, None, "dashed")
    if notes:
        ch.note("\n".join(notes))
    return ch.finish(path)


def histogram_chart(edges: Any, counts: Mapping[str, Any], *, title: str, xlabel: str, ylabel: str,
                    subtitle: str | None = None, xlog: bool = True, colors: Sequence[Color] | None = None,
                    vlines: Sequence[tuple[float, str]] = (), notes: Sequence[str] = (),
                    size: tuple[int, int] = (640, 440), path: PathLike | None = None) -> Image.Image:
    """Overlaid histograms (translucent fills, outlined steps) on shared bins.

    Args:
        edges: ``(K + 1,)`` bin edges (positive when ``xlog``).
        counts: legend label -> ``(K,)`` heights (e.g. the share of patches in %), in drawing order.
        colors: one per histogram (default :data:`COLORS`).
        vlines: ``(x, label)``: dashed vertical lines in the colour of the histogram of the same
            position (e.g. the medians), with legend entries.
    """
    e = np.asarray(edges, dtype=np.float64).ravel()
    if e.size < 2:
        raise ValueError("histogram_chart: need at least two edges")
    names = list(counts)
    if not names:
        raise ValueError("histogram_chart: no histograms")
    cols = list(colors) if colors is not None else [COLORS[i % len(COLORS)] for i in range(len(names))]
    hs = [np.asarray(counts[n], dtype=np.float64).ravel() for n in names]
    for n, h in zip(names, hs):
        if h.size != e.size - 1:
            raise ValueError(f"histogram {n!r} has {h.size} bins for {e.size} edges")
    top = max(float(max(h.max() for h in hs)), 1e-12)
    legend = [_LegendItem(n, c, "patch") for n, c in zip(names, cols)]
    legend += [_LegendItem(lab, cols[i % len(cols)], "line", None, "dashed") for i, (_, lab) in enumerate(vlines)]
    ch = _Chart(size, title=title, xlabel=xlabel, ylabel=ylabel, subtitle=subtitle, xlim=(float(e[0]), float(e[-1])),
                ylim=(0.0, top * 1.08), xlog=xlog, ylog=False, legend=legend)
    base = float(ch.ys(0.0))
    for h, c in zip(hs, cols):
        xs = ch.xs(e)
        ys = ch.ys(h)
        pts = [(float(xs[0]), base)]
        for k in range(h.size):
            pts += [(float(xs[k]), float(ys[k])), (float(xs[k + 1]), float(ys[k]))]
        pts.append((float(xs[-1]), base))
        ch.ldraw.polygon(pts, fill=tuple(c) + (70,))
    for h, c in zip(hs, cols):  # outlines on top of all fills
        xs = ch.xs(e)
        ys = ch.ys(h)
        pts = [(float(xs[0]), base)]
        for k in range(h.size):
            pts += [(float(xs[k]), float(ys[k])), (float(xs[k + 1]), float(ys[k]))]
        pts.append((float(xs[-1]), base))
        _polyline(ch.ldraw, pts, tuple(c) + (255,), 2 * _SS, "solid")
    for i, (xv, _) in enumerate(vlines):
        ch.vline(xv, cols[i % len(cols)])
    if notes:
        ch.note("\n".join(notes), corner="top-right")
    return ch.finish(path)


def hstack(images: Sequence[Image.Image], gap: int = 12, path: PathLike | None = None) -> Image.Image:
    """Pictures side by side (tops aligned) on white."""
    if not images:
        raise ValueError("hstack: no images")
    W = sum(im.width for im in images) + gap * (len(images) - 1)
    H = max(im.height for im in images)
    out = Image.new("RGB", (W, H), _BG)
    x = 0
    for im in images:
        out.paste(im.convert("RGB"), (x, 0))
        x += im.width + gap
    return _save(out, path)

