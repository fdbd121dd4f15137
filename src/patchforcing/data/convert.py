"""Pixel conversions and image-grid IO.

Model space is float32 in ``[-1, 1]``; storage space is ``uint8`` in ``[0, 255]``. The mapping
``u = clamp(127.5 * x + 128, 0, 255)`` (then truncation) is the inverse of ``x = u / 127.5 - 1``:
``to_uint8(to_float(u)) == u`` exactly for every ``uint8`` value.
"""

from __future__ import annotations

import math
import os
from typing import TypeVar, Union

import numpy as np
import torch

__all__ = ["to_uint8", "to_float", "composite_on_white", "image_grid", "save_image_grid"]

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


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """Composite straight-alpha RGBA on a white background: ``rgb * a + 255 * (1 - a)``.

    Args:
        rgba: ``uint8`` array ``(..., 4)``.
    Returns:
        ``uint8`` array ``(..., 3)``, rounded to nearest. Exact integer arithmetic: a fully opaque
        pixel keeps its colour, a fully transparent one becomes ``(255, 255, 255)``.
    """
    if rgba.dtype != np.uint8 or rgba.shape[-1] != 4:
        raise ValueError(f"expected uint8 (..., 4) RGBA, got {rgba.dtype} {rgba.shape}")
    # rgb * a + 255 * (255 - a) + 127 <= 255 * 255 + 127 < 2**16: uint16 is exact and fast
    a = rgba[..., 3:4].astype(np.uint16)
    out = rgba[..., :3] * a
    out += 255 * (255 - a) + 127
    out //= 255
    return out.astype(np.uint8)


def image_grid(
    images: Union[torch.Tensor, np.ndarray], nrow: int | None = None, padding: int = 2, pad_value: float = 1.0
) -> np.ndarray:
    """Tile a batch into one picture.

    Args:
        images: ``(B, C, H, W)`` float in ``[-1, 1]`` with ``C`` in {1, 3} (tensor or array).
        nrow: images per row; default ``ceil(sqrt(B))``.
        padding: pixels between images (and around the border).
        pad_value: padding colour in ``[-1, 1]`` (default white).
    Returns:
        ``uint8`` array ``(rows * (H + p) + p, nrow * (W + p) + p, 3)``.
    """
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().float().numpy()
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[1] not in (1, 3) or images.shape[0] == 0:
        raise ValueError(f"expected a non-empty (B, C, H, W) batch with C in (1, 3), got {images.shape}")
    b, c, h, w = images.shape
    if c == 1:
        images = np.repeat(images, 3, axis=1)
    nrow = max(1, min(b, nrow if nrow is not None else math.ceil(math.sqrt(b))))
    rows = math.ceil(b / nrow)
    p = padding
    grid = np.full((rows * (h + p) + p, nrow * (w + p) + p, 3), to_uint8(np.float32(pad_value)), np.uint8)
    tiles = to_uint8(images).transpose(0, 2, 3, 1)
    for i in range(b):
        r, col = divmod(i, nrow)
        y, x = p + r * (h + p), p + col * (w + p)
        grid[y : y + h, x : x + w] = tiles[i]
    return grid


def save_image_grid(
    images: Union[torch.Tensor, np.ndarray],
    path: Union[str, os.PathLike],
    nrow: int | None = None,
    padding: int = 2,
    scale: int = 1,
) -> np.ndarray:
    """Write a batch ``(B, C, H, W)`` in ``[-1, 1]`` as one PNG grid (see :func:`image_grid`).

    Args:
        scale: integer nearest-neighbour upscaling of the whole grid (handy for 32x32 images).
    Returns:
        the ``uint8`` ``(H', W', 3)`` grid that was written (before scaling).
    """
    from PIL import Image

    grid = image_grid(images, nrow=nrow, padding=padding)
    img = Image.fromarray(grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)
    img.save(path)
    return grid
