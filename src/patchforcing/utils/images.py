"""Pixel conversions and tiling shared by the data tools and the figures.

Model space is float32 in ``[-1, 1]``; storage space is ``uint8`` in ``[0, 255]``. The mapping
``u = clamp(127.5 * x + 128, 0, 255)`` (then truncation) is the inverse of ``x = u / 127.5 - 1``:
``to_uint8(to_float(u)) == u`` exactly for every ``uint8`` value. :func:`to_uint8_images` turns a
batch of either kind (tensor or array, float or ``uint8``) into ``uint8 (B, H, W, 3)`` pictures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np
import torch

__all__ = ["to_uint8", "to_float", "to_uint8_images", "tile_images"]

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


def to_uint8_images(x: Any, *, strict: bool = False) -> np.ndarray:
    """Images as contiguous ``uint8 (B, H, W, 3)`` (a tensor on any device, or an array).

    Args:
        x: float images in roughly ``[-1, 1]``, converted with :func:`to_uint8`
            (``clamp(127.5 * x + 128, 0, 255)``, truncated), or ``uint8`` images, kept as they are.
        strict: how ``x`` is read.

            * ``False`` (pictures): float ``(B, C, H, W)`` or ``(C, H, W)``, channels-first;
              ``C < 3`` shows channel 0 grey, ``C >= 3`` the first three channels; NaN -> 128.
              ``uint8`` ``(B, H, W, C)`` or ``(H, W, C)``, channels-last, ``C`` in 1 (grey,
              repeated), 3, 4 (alpha dropped). Other dtypes are read as float.
            * ``True`` (metrics: every pixel counts, nothing is made up): a 4-D batch of exactly
              3 channels, float or ``uint8``, ``(B, H, W, 3)`` or ``(B, 3, H, W)`` (channels-first
              when dim 1 is 3 and the last dim is not); other dtypes are refused; NaN as
              :func:`to_uint8` quantises it (as samples are saved).

    Returns:
        ``uint8 (B, H, W, 3)``, C-contiguous (an already fitting ``uint8`` array is returned as is).

    Raises:
        ValueError: a shape, channel count or (``strict``) dtype that does not fit, naming it.
    """
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        is_u8, is_float, dtype, shape = t.dtype == torch.uint8, t.is_floating_point(), t.dtype, tuple(t.shape)
        a = t.numpy() if is_u8 else None
    else:
        a = np.asarray(x)
        is_u8, is_float, dtype, shape = a.dtype == np.uint8, a.dtype.kind == "f", a.dtype, a.shape
        t = None
    if strict and not (is_u8 or is_float):
        raise ValueError(f"images must be uint8 or float in [-1, 1], got {dtype}")
    if t is None and not is_u8:
        t = torch.as_tensor(np.ascontiguousarray(a))
    if strict:
        if len(shape) != 4:
            raise ValueError(f"images must be a batch (B, H, W, 3) or (B, 3, H, W), got shape {shape}")
        first = shape[-1] != 3 and shape[1] == 3
        if not first and shape[-1] != 3:
            raise ValueError(f"images must have 3 channels, got shape {shape}")
        u8 = a if is_u8 else to_uint8(t).numpy()
        return np.ascontiguousarray(u8.transpose(0, 2, 3, 1) if first else u8)
    if is_u8:
        b = a[None] if a.ndim == 3 else a
        if b.ndim != 4 or b.shape[-1] not in (1, 3, 4):
            raise ValueError(f"uint8 images must be channels-last (B, H, W, 1|3|4), got shape {shape}")
        return np.ascontiguousarray(np.repeat(b, 3, axis=-1) if b.shape[-1] == 1 else b[..., :3])
    if t.dim() == 3:
        t = t.unsqueeze(0)
    if t.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W) or (C, H, W), got shape {shape}")
    if t.shape[1] == 0:
        raise ValueError("images have no channels")
    t = t[:, :1].expand(-1, 3, -1, -1) if t.shape[1] < 3 else t[:, :3]
    u8 = to_uint8(torch.nan_to_num(t.float(), nan=0.0, posinf=1.0, neginf=-1.0))
    return np.ascontiguousarray(u8.permute(0, 2, 3, 1).numpy())


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
