"""Sample grids (plain arrays; no matplotlib needed).

Images are ``(B, C, H, W)`` in roughly ``[-1, 1]`` and are converted with
``uint8 = clamp(127.5 * x + 128, 0, 255)`` truncated towards zero (so ``-1 -> 0``, ``0 -> 128``,
``1 -> 255``). ``C = 1`` is shown grey, ``C = 3`` as RGB; ``C = 2`` shows channel 0 grey and
``C >= 4`` the first three channels (latents should be decoded first). :func:`to_uint8_images`
is :func:`patchforcing.utils.images.to_uint8_images` (re-exported here; the metrics use its
``strict`` reading).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from ..utils.images import tile_images, to_uint8_images
from .style import PathLike, save

__all__ = ["to_uint8_images", "make_grid", "save_grid", "auto_scale", "upscale"]


def auto_scale(h: int, w: int, min_px: int) -> int:
    """Smallest integer factor that makes the longer side at least ``min_px`` (1 if already so)."""
    return max(1, math.ceil(min_px / max(h, w, 1)))


def upscale(images: np.ndarray, factor: int) -> np.ndarray:
    """``(..., H, W, 3)`` -> ``(..., H * factor, W * factor, 3)`` nearest neighbour."""
    return images if factor <= 1 else images.repeat(factor, axis=-3).repeat(factor, axis=-2)


def make_grid(
    images: Any, nrow: int | None = None, padding: int = 2, pad_value: int | Sequence[int] = 255
) -> np.ndarray:
    """Tile images into one array.

    Args:
        images: ``(B, H, W, 3)`` uint8 (or anything :func:`to_uint8_images` takes).
        nrow: images per row (default ``ceil(sqrt(B))``); the number of rows is ``ceil(B / nrow)``.
        padding: pixels between tiles and around the border.
        pad_value: grey level or RGB triple of the padding (and of empty cells).
    Returns:
        ``(rows * H + (rows + 1) * padding, cols * W + (cols + 1) * padding, 3)`` uint8 with
        ``cols = min(nrow, B)``; image ``k`` sits at row ``k // cols``, column ``k % cols``,
        top-left corner ``(padding + r * (H + padding), padding + c * (W + padding))``.
    """
    return tile_images(to_uint8_images(images), nrow=nrow, padding=padding, fill=pad_value)


def save_grid(
    x: Any,
    path: PathLike | None = None,
    nrow: int | None = None,
    upscale: int | None = None,
    *,
    padding: int = 2,
    pad_value: int | Sequence[int] = 255,
    min_tile: int = 96,
) -> Image.Image:
    """A sample grid as a picture (and a file when ``path`` is given).

    Args:
        x: ``(B, C, H, W)`` tensor in ``[-1, 1]`` or ``(B, H, W, 3)`` uint8 array.
        upscale: integer nearest-neighbour enlargement of every image; default: the smallest
            factor that makes tiles at least ``min_tile`` (96) px (so 32 x 32 samples become
            96 x 96); 1 keeps the native size. Padding is not enlarged.
    Returns:
        the grid picture, ``make_grid`` of the enlarged images.
    """
    imgs = to_uint8_images(x)
    factor = auto_scale(imgs.shape[1], imgs.shape[2], min_tile) if upscale is None else int(upscale)
    if factor < 1:
        raise ValueError(f"upscale must be >= 1, got {upscale}")
    grid = make_grid(_upscale(imgs, factor), nrow=nrow, padding=padding, pad_value=pad_value)
    return save(Image.fromarray(grid), path)


_upscale = upscale  # save_grid's ``upscale`` argument shadows the function
