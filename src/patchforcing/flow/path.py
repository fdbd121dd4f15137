"""The linear flow path, applied patch-wise.

Convention: **t = 0 is noise, t = 1 is data**. ``x_t = t * x1 + (1 - t) * x0`` and the target
velocity is ``u = x1 - x0``; every pixel of patch ``i`` uses ``t[:, i]``.

Patches are ``p x p`` cells of the input, numbered row-major over the ``h x w`` patch grid
(``index = row * w + col``), the same order as the model's tokens.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["patch_to_pixel", "pixel_to_patch", "interpolate", "target_velocity", "clean_estimate"]


def patch_to_pixel(values: Tensor, patch_size: int, height: int, width: int) -> Tensor:
    """Broadcast one value per patch to every pixel of that patch.

    Args:
        values: ``(B, N)`` with ``N = (height / p) * (width / p)``, or ``(B,)`` (one per image).
    Returns:
        ``(B, 1, height, width)`` (a view-free expansion; ``(B, 1, 1, 1)`` for ``(B,)`` input).
    """
    if values.dim() == 1:
        return values.view(-1, 1, 1, 1)
    p = patch_size
    h, w = height // p, width // p
    B, N = values.shape
    if N != h * w or h * p != height or w * p != width:
        raise ValueError(
            f"{N} patch values do not tile a {height}x{width} input with patch size {p} (expected {h * w})"
        )
    return values.view(B, 1, h, 1, w, 1).expand(B, 1, h, p, w, p).reshape(B, 1, height, width)


def pixel_to_patch(values: Tensor, patch_size: int) -> Tensor:
    """Average a per-pixel map over each patch.

    Args:
        values: ``(B, K, H, W)``.
    Returns:
        ``(B, N)`` when ``K == 1`` (``(B, K, N)`` otherwise), row-major over the patch grid.
    """
    pooled = F.avg_pool2d(values, patch_size).flatten(2)  # (B, K, N)
    return pooled[:, 0] if pooled.shape[1] == 1 else pooled


def interpolate(x0: Tensor, x1: Tensor, t: Tensor, patch_size: int) -> Tensor:
    """Patch-wise ``x_t = t * x1 + (1 - t) * x0``.

    Args:
        x0: ``(B, C, H, W)`` noise.
        x1: ``(B, C, H, W)`` data.
        t: ``(B, N)`` per-patch or ``(B,)`` per-image times in ``[0, 1]``.
    Returns:
        ``(B, C, H, W)``.
    """
    tp = patch_to_pixel(t, patch_size, x1.shape[-2], x1.shape[-1]).to(x1.dtype)
    return tp * x1 + (1 - tp) * x0


def target_velocity(x0: Tensor, x1: Tensor) -> Tensor:
    """``u = x1 - x0`` (constant along the linear path), ``(B, C, H, W)``."""
    return x1 - x0


def clean_estimate(x: Tensor, v: Tensor, t: Tensor, patch_size: int) -> Tensor:
    """One-step estimate of the data from ``x_t`` and the velocity: ``x1_hat = x + (1 - t) v``.

    Args:
        x: ``(B, C, H, W)`` current state; v: ``(B, C, H, W)``; t: ``(B, N)`` or ``(B,)``.
    """
    tp = patch_to_pixel(t, patch_size, x.shape[-2], x.shape[-1]).to(x.dtype)
    return x + (1 - tp) * v
