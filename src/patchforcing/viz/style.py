"""The look of every figure: matplotlib rcParams plus the colours the pictures use, passed explicitly.

Every drawing function takes ``style: Style | None`` (``None``: :data:`DEFAULT_STYLE`). A style is
frozen; make a variant with :func:`dataclasses.replace` or the constructor, e.g.
``Style(dpi=200, uncertainty_cmap="inferno", rc={"font.family": "serif", "font.size": 11})``.
Font sizes are rcParams (``font.size``, ``axes.titlesize``, ``figure.titlesize``, ...); ``rc`` is
applied on top of :data:`BASE_RC` inside a :func:`matplotlib.rc_context` for one drawing only (no
global state changes). Figure sizes are pixels at 100 dpi; a larger ``dpi`` draws the same
figure sharper and proportionally bigger. Layout is matplotlib's own (``layout="constrained"``).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Union

import matplotlib
import numpy as np
from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from ..utils.io import atomic_write

__all__ = ["BASE_RC", "COLORS", "DEFAULT_STYLE", "PathLike", "Style"]

PathLike = Union[str, "os.PathLike[str]"]

#: rcParams of every figure (read-only; override per call with ``Style(rc={...})``).
BASE_RC: Mapping[str, Any] = MappingProxyType(
    {
        "font.family": "DejaVu Sans",
        "font.size": 9.5,
        "figure.titlesize": 13,
        "axes.titlesize": 10.5,
        "axes.labelsize": 10,
        "axes.edgecolor": "#3c3c3c",
        "axes.linewidth": 0.8,
        "axes.grid": True,
        "axes.axisbelow": True,
        "grid.color": "#dedede",
        "grid.linewidth": 0.8,
        "xtick.labelsize": 8.5,
        "ytick.labelsize": 8.5,
        "legend.fontsize": 9,
        "legend.frameon": False,
        "lines.linewidth": 2.0,
        "lines.markersize": 6,
        "lines.markeredgecolor": "white",
        "lines.markeredgewidth": 0.8,
        "figure.facecolor": "white",
        "savefig.facecolor": "white",
        "image.interpolation": "nearest",
    }
)

#: A colour-blind safe cycle (blue, orange, green, red-purple, grey), RGB 0..255.
COLORS: tuple[tuple[int, int, int], ...] = (
    (40, 110, 185),
    (235, 125, 20),
    (30, 150, 95),
    (190, 55, 120),
    (120, 120, 120),
)


@dataclass(frozen=True)
class Style:
    """Resolution, rcParams and colours of the figures.

    Attributes:
        dpi: resolution (100: sizes are pixels).
        rc: rcParams applied on top of :data:`BASE_RC` (fonts, sizes, line widths, ...).
        fg, muted, frame: text, secondary text (subtitles), tile frames.
        na_fill: background of "n/a" tiles; certain, uncertain: the colours of the patch mask.
        time_cmap, uncertainty_cmap: matplotlib colormap names of the per-patch time and uncertainty.
    """

    dpi: int = 100
    rc: Mapping[str, Any] = field(default_factory=dict)
    fg: str = "#191919"
    muted: str = "#696969"
    frame: str = "#bebebe"
    na_fill: str = "#e8e8e8"
    certain: str = "#2878be"  # blue / orange: safe for the common colour blindnesses
    uncertain: str = "#f08c1e"
    time_cmap: str = "viridis"
    uncertainty_cmap: str = "magma"

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """rcParams of this style, for one drawing."""
        with matplotlib.rc_context({**BASE_RC, **dict(self.rc)}):
            yield

    def figure(self, width: float, height: float, title: str | None = None, subtitle: str | None = None) -> Any:
        """A headless constrained-layout figure of ``width x height`` px (at 100 dpi) with a left-aligned title.

        Returns the (sub)figure to draw in: under the ``subtitle`` (muted) when one is given.
        """
        fig = Figure(figsize=(width / 100, height / 100), dpi=self.dpi, layout="constrained")
        if title:
            fig.suptitle(title, x=0.005, ha="left", color=self.fg)
        if not subtitle:
            return fig
        body = fig.subfigures(1, 1)
        body.suptitle(subtitle, x=0.005, ha="left", fontsize="medium", color=self.muted)
        return body


DEFAULT_STYLE = Style()


def resolve(style: Style | None) -> Style:
    return DEFAULT_STYLE if style is None else style


def rgb01(color: Any) -> Any:
    """An RGB triple of 0..255 ints -> 0..1 floats; any other matplotlib colour unchanged."""
    if isinstance(color, (tuple, list)) and len(color) in (3, 4) and any(float(c) > 1 for c in color):
        return tuple(float(c) / 255.0 for c in color)
    return color


def number(v: float, _pos: Any = None) -> str:
    """A short tick label (``0.5``, ``1``, ``2e-05``)."""
    return "0" if v == 0 else f"{v:.3g}"


def log_axis(axis: Any, lo: float, hi: float, max_ticks: int = 6) -> None:
    """Readable plain-number ticks on a log axis from ``lo`` to ``hi`` (> 0).

    Under a decade: evenly spaced round values with equal decimals (``0.6, 0.7, ...``); up to
    2.5 decades: also 2 and 5 times the powers of ten; more: the powers of ten.
    """
    lo, hi = min(lo, hi), max(lo, hi)
    decades = math.log10(hi / lo)
    if decades < 1:
        vals = [v for v in ticker.MaxNLocator(max_ticks, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi) if lo <= v <= hi]
        step = vals[1] - vals[0] if len(vals) > 1 else (abs(vals[0]) if vals else 1.0) or 1.0
        d = max(0, -math.floor(math.log10(step) + 1e-9))
        axis.set_major_locator(ticker.FixedLocator(vals))
        axis.set_major_formatter(ticker.StrMethodFormatter(f"{{x:.{d}f}}"))
        axis.set_minor_locator(ticker.NullLocator())
        return
    axis.set_major_locator(ticker.LogLocator(numticks=max_ticks + 2))
    axis.set_major_formatter(ticker.FuncFormatter(number))
    if decades <= 2.5:
        axis.set_minor_locator(ticker.LogLocator(subs=(2.0, 5.0), numticks=3 * max_ticks))
    axis.set_minor_formatter(ticker.FuncFormatter(number) if decades <= 2.5 else ticker.NullFormatter())


def render(fig: Any) -> Image.Image:
    """A figure (or any of its subfigures) drawn by Agg as an RGB picture."""
    canvas = FigureCanvasAgg(fig.get_figure(root=True))
    canvas.draw()
    return Image.fromarray(np.ascontiguousarray(np.asarray(canvas.buffer_rgba())[..., :3]))


def save(img: Image.Image, path: PathLike | None, **kwargs: Any) -> Image.Image:
    """Write ``img`` atomically to ``path`` (format from the extension) when a path is given."""
    if path is not None:
        fmt = Image.registered_extensions().get(os.path.splitext(os.fspath(path))[1].lower(), "PNG")
        atomic_write(path, lambda tmp: img.save(tmp, format=fmt, **kwargs))
    return img
