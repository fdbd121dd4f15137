"""Text-to-image pictures: a prompt grid, one row of samples per prompt with the prompt under it.

Texts never run off the figure: a title (or subtitle) too long for the grid's width widens the
figure up to :data:`TITLE_WIDTH` px and wraps beyond that; a caption line too wide is re-wrapped
to the width as drawn (at most two lines, as always). Widths are measured with the style's fonts
(a throwaway Agg renderer), not estimated from the character count.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from .grid import auto_scale, make_grid, to_uint8_images
from .grid import upscale as _upscale
from .maps import bare
from .style import PathLike, Style, render, resolve, save

__all__ = ["TITLE_WIDTH", "prompt_grid"]

#: px (at 100 dpi) up to which a narrow grid's figure is widened to fit its title on one line
TITLE_WIDTH = 320
#: lines of a caption (longer prompts are cut)
CAPTION_LINES = 2


def prompt_grid(
    images: Any,
    prompts: Sequence[str],
    path: PathLike | None = None,
    *,
    title: str | None = None,
    subtitle: str | None = None,
    upscale: int | None = None,
    min_tile: int = 64,
    wrap: int | None = None,
    style: Style | None = None,
) -> Image.Image:
    """Samples in rows, one row per prompt, the prompt's text under its row.

    Args:
        images: ``(P * K, C, H, W)`` in ``[-1, 1]`` (or ``(P * K, H, W, 3)`` uint8), prompt-major:
            images ``p * K .. p * K + K - 1`` belong to ``prompts[p]``.
        prompts: the ``P`` prompts.
        title, subtitle: above the grid; widened up to :data:`TITLE_WIDTH` px, then wrapped, to fit.
        upscale: nearest-neighbour enlargement (default: tiles at least ``min_tile`` px).
        wrap: characters per caption line (default: what fits the figure's width, measured).
    Returns:
        the picture (also written to ``path`` when given).
    Raises:
        ValueError: no prompts, or an image count that is not a multiple of the prompt count.
    """
    st = resolve(style)
    with st.context():
        fig = _prompt_figure(images, prompts, title, subtitle, upscale, min_tile, wrap, st)
        return save(render(fig), path)


class _TextBox:
    """Extents of texts as a figure would draw them now (current rcParams), in px at 100 dpi."""

    def __init__(self) -> None:
        self._fig = Figure(dpi=100)
        self._renderer = FigureCanvasAgg(self._fig).get_renderer()

    def size(self, text: str, **props: Any) -> tuple[float, float]:
        """``(width, height)`` of ``text`` drawn with the text properties ``props``."""
        t = self._fig.text(0, 0, text, **props)
        try:
            box = t.get_window_extent(self._renderer)
        finally:
            t.remove()
        return float(box.width), float(box.height)

    def wrap(self, text: str, width: float, **props: Any) -> list[str]:
        """``text`` in lines no wider than ``width`` (greedy by words, a word too wide for a line
        broken between characters; white space folded). ``[text]`` when it fits as it is."""
        if self.size(text, **props)[0] <= width:
            return [text]

        def fits(s: str) -> bool:
            return self.size(s, **props)[0] <= width

        lines: list[str] = []
        for para in text.split("\n"):
            line = ""
            for word in para.split():
                if fits(f"{line} {word}" if line else word):
                    line = f"{line} {word}" if line else word
                    continue
                if line:
                    lines.append(line)
                while len(word) > 1 and not fits(word):
                    k = 1
                    while k + 1 < len(word) and fits(word[: k + 1]):
                        k += 1
                    lines.append(word[:k])
                    word = word[k:]
                line = word
            lines.append(line)
        return lines


def _fit_heading(box: _TextBox, text: str | None, width: float, props: dict[str, Any]) -> tuple[str | None, float]:
    """``text`` wrapped to ``width`` and the height (px) its extra lines add."""
    if not text:
        return text, 0.0
    lines = box.wrap(text, width, **props)
    if len(lines) == 1:
        return lines[0], 0.0
    fitted = "\n".join(lines)
    return fitted, box.size(fitted, **props)[1] - box.size(lines[0], **props)[1]


def _fit_caption(box: _TextBox, prompt: str, text: str, width: float, props: dict[str, Any]) -> str:
    """``text`` (``prompt`` wrapped by characters) when every line fits ``width``, else ``prompt``
    wrapped to ``width`` as drawn; at most :data:`CAPTION_LINES` lines either way."""
    if all(box.size(line, **props)[0] <= width for line in text.split("\n")):
        return text
    return "\n".join(box.wrap(" ".join(prompt.split()), width, **props)[:CAPTION_LINES]) or '""'


def _pad_width(grid: np.ndarray, width: int, left: int, fill: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` -> ``(H, width, 3)``: ``grid`` at column ``left``, ``fill`` around it."""
    out = np.empty((grid.shape[0], width, 3), np.uint8)
    out[...] = fill
    out[:, left : left + grid.shape[1]] = grid
    return out


def _prompt_figure(
    images: Any,
    prompts: Sequence[str],
    title: str | None,
    subtitle: str | None,
    upscale: int | None,
    min_tile: int,
    wrap: int | None,
    st: Style,
) -> Any:
    """The :func:`prompt_grid` figure (the root :class:`~matplotlib.figure.Figure`, not drawn yet);
    call it inside ``st.context()`` (the fonts are measured with the rcParams in effect)."""
    imgs = to_uint8_images(images)
    n, p = imgs.shape[0], len(prompts)
    if p == 0 or n == 0 or n % p:
        raise ValueError(f"prompt_grid: {n} images do not split into rows for {p} prompts")
    k = n // p
    scale = auto_scale(imgs.shape[1], imgs.shape[2], min_tile) if upscale is None else int(upscale)
    rows = [make_grid(_upscale(imgs[i * k : (i + 1) * k], scale), nrow=k) for i in range(p)]
    gw, gh = rows[0].shape[1], rows[0].shape[0]

    box = _TextBox()
    rc = matplotlib.rcParams
    title_props = {"fontsize": rc["figure.titlesize"], "fontweight": rc["figure.titleweight"]}
    sub_props: dict[str, Any] = {"fontsize": "medium"}
    caption_props = {"fontsize": "medium", "fontweight": rc["axes.labelweight"]}
    width = float(gw + 20)
    heads = [(t, pr) for t, pr in ((title, title_props), (subtitle, sub_props)) if t]
    if heads:  # headings start at 0.5 % of the width; 4 px to spare on the right
        need = max(box.size(t, **pr)[0] for t, pr in heads)
        width = float(max(gw + 20, min(math.ceil((need + 4) / 0.995), max(gw + 20, TITLE_WIDTH))))
    if width > gw + 20:  # widened: the rows padded with the background, so the tiles keep their size
        fill = np.round(255 * np.asarray(matplotlib.colors.to_rgb(rc["figure.facecolor"]))).astype(np.uint8)
        left = (int(width) - 8 - gw) // 2
        rows = [_pad_width(r, int(width) - 8, left, fill) for r in rows]
    title, title_extra = _fit_heading(box, title, 0.995 * width - 4, title_props)
    subtitle, sub_extra = _fit_heading(box, subtitle, 0.995 * width - 4, sub_props)

    chars = wrap or max(16, (int(width) - 20) // 7)
    texts = ["\n".join(textwrap.wrap(str(t), chars)[:CAPTION_LINES]) or '""' for t in prompts]
    if wrap is None:  # centred under the row: a line wider than the figure is re-wrapped as drawn
        texts = [_fit_caption(box, str(src), t, width - 8, caption_props) for src, t in zip(prompts, texts)]
    lines = [t.count("\n") + 1 for t in texts]
    text_px = [14 * n_lines + 8 for n_lines in lines]
    height = sum(gh + t for t in text_px) + (45 if title else 10) + (20 if subtitle else 0)
    height += math.ceil(title_extra + sub_extra)
    fig = st.figure(width, height, title, subtitle)
    axes = fig.subplots(p, 1, squeeze=False, gridspec_kw={"height_ratios": [gh + t for t in text_px]})[:, 0]
    for ax, grid, text in zip(axes, rows, texts):
        bare(ax).imshow(np.asarray(grid))
        ax.set_xlabel(text, color=st.fg, fontsize="medium")
    return fig.get_figure(root=True)
