"""Pixel conversions (``to_uint8``/``to_float`` live in :mod:`patchforcing.utils.images`) and
image-grid IO for data previews."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from ..utils.images import tile_images, to_float, to_uint8

__all__ = ["to_uint8", "to_float", "composite_on_white", "image_grid", "save_image_grid"]


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
    images: torch.Tensor | np.ndarray, nrow: int | None = None, padding: int = 2, pad_value: float = 1.0
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
    if images.shape[1] == 1:
        images = np.repeat(images, 3, axis=1)
    fill = int(to_uint8(np.float32(pad_value)))
    return tile_images(to_uint8(images).transpose(0, 2, 3, 1), nrow=nrow, padding=padding, fill=fill)


def save_image_grid(
    images: torch.Tensor | np.ndarray,
    path: str | os.PathLike,
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
    grid = image_grid(images, nrow=nrow, padding=padding)
    img = Image.fromarray(grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)
    img.save(path)
    return grid
