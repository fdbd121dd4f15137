"""Pixel conversions and tiling shared by the data tools and the figures.

Model space is float32 in ``[-1, 1]``; storage space is ``uint8`` in ``[0, 255]``. The mapping
``u = clamp(127.5 * x + 128, 0, 255)`` (then truncation) is the inverse of ``x = u / 127.5 - 1``:
``to_uint8(to_float(u)) == u`` exactly for every ``uint8`` value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import torch

__all__ = ["to_uint8", "to_float", "tile_images"]

ArrayLike = TypeVar("ArrayLike", torch.Tensor, np.ndarray)


def to_uint8(x: ArrayLike) -> ArrayLike:
    """``[-1, 1]`` float -> ``uint8`` via ``clamp(127.5 x + 128, 0, 255)``; any shape, same kind out.

    Args:
        x: a tensor or array of any shape (e.g. ``(B, C, H, W)``), float, nominally in ``[-1, 1]``;
           values outside are clamped.
    Returns:
        ``uint8`` of the same shape and kind (tensor stays on its device).
    """
    if isinstance(x, torch.Tensor):
        return (x.detach().float() * 127.5 + 128.0).clamp_(0.0, 255.0).to(torch.uint8)
    a = np.asarray(x, dtype=np.float32)
    return np.clip(a * 127.5 + 128.0, 0.0, 255.0).astype(np.uint8)


def to_float(x: ArrayLike) -> ArrayLike:
    """``uint8`` in ``[0, 255]`` -> float32 in ``[-1, 1]`` (``x / 127.5 - 1``); any shape, same kind out."""
    if isinstance(x, torch.Tensor):
        return x.to(torch.float32) / 127.5 - 1.0
    return np.asarray(x, dtype=np.float32) / np.float32(127.5) - np.float32(1.0)


def tile_images(
    images: np.ndarray, nrow: int | None = None, padding: int = 2, fill: int | Sequence[int] = 255
) -> np.ndarray:
    """Tile ``(B, H, W, 3)`` uint8 images into one ``uint8`` picture.

    Image ``k`` sits at row ``k // cols``, column ``k % cols`` (``cols = min(nrow, B)``, default
    ``nrow = ceil(sqrt(B))``), its top-left corner at ``(padding + r * (H + padding), padding + c *
    (W + padding))``; padding and empty cells have the grey level or RGB triple ``fill``.

    Returns:
        ``(rows * H + (rows + 1) * padding, cols * W + (cols + 1) * padding, 3)`` uint8.
    """
    B, H, W, _ = images.shape
    if B == 0:
        raise ValueError("no images to tile")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    n = math.ceil(math.sqrt(B)) if nrow is None else int(nrow)
    if n < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    cols = min(n, B)
    rows = math.ceil(B / cols)
    value = np.asarray(fill, dtype=np.uint8).reshape(-1)
    grid = np.empty((rows * H + (rows + 1) * padding, cols * W + (cols + 1) * padding, 3), dtype=np.uint8)
    grid[...] = value if value.size == 3 else value[0]
    for k in range(B):
        r, c = divmod(k, cols)
        y, x = padding + r * (H + padding), padding + c * (W + padding)
        grid[y : y + H, x : x + W] = images[k]
    return grid
