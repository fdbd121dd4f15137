"""Text-to-image pictures: a prompt grid, one row of samples per prompt with the prompt under it."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from .grid import auto_scale, make_grid, to_uint8_images
from .grid import upscale as _upscale
from .maps import bare
from .style import PathLike, Style, render, resolve, save

__all__ = ["prompt_grid"]


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
        upscale: nearest-neighbour enlargement (default: tiles at least ``min_tile`` px).
        wrap: characters per caption line (default: what fits the row's width).
    Returns:
        the picture (also written to ``path`` when given).
    Raises:
        ValueError: no prompts, or an image count that is not a multiple of the prompt count.
    """
    imgs = to_uint8_images(images)
    n, p = imgs.shape[0], len(prompts)
    if p == 0 or n == 0 or n % p:
        raise ValueError(f"prompt_grid: {n} images do not split into rows for {p} prompts")
    k = n // p
    scale = auto_scale(imgs.shape[1], imgs.shape[2], min_tile) if upscale is None else int(upscale)
    rows = [make_grid(_upscale(imgs[i * k : (i + 1) * k], scale), nrow=k) for i in range(p)]
    gw, gh = rows[0].shape[1], rows[0].shape[0]
    chars = wrap or max(16, gw // 7)
    texts = ["\n".join(textwrap.wrap(str(t), chars)[:2]) or '""' for t in prompts]
    lines = [t.count("\n") + 1 for t in texts]
    text_px = [14 * n_lines + 8 for n_lines in lines]
    st = resolve(style)
    height = sum(gh + t for t in text_px) + (45 if title else 10) + (20 if subtitle else 0)
    with st.context():
        fig = st.figure(gw + 20, height, title, subtitle)
        axes = fig.subplots(p, 1, squeeze=False, gridspec_kw={"height_ratios": [gh + t for t in text_px]})[:, 0]
        for ax, grid, text in zip(axes, rows, texts):
            bare(ax).imshow(np.asarray(grid))
            ax.set_xlabel(text, color=st.fg, fontsize="medium")
        return save(render(fig), path)
