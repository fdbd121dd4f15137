"""The forward passes: every patch at ``t``, then with clean context, per-patch uncertainty and error.

Noise and context patches depend only on ``(seed, item index)``: item ``i``'s noise is
``indexed_randn(_NOISE_SALT, seed, [i], shape)`` and its context patches are drawn from
``hashed_generator(_MASK_SALT, seed, i)``, so the numbers never depend on the batch size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..flow.path import interpolate, pixel_to_patch
from ..utils.devices import module_device
from ..utils.seeding import hashed_generator, indexed_randn
from .data import get_autoencoder

__all__ = ["Measurements", "context_mask", "context_time", "measure", "patch_squared_error", "patch_uncertainty"]

_NOISE_SALT = 0x616E616C79  # "analy"
_MASK_SALT = 0x636F6E7478  # "contx"


def patch_uncertainty(logvar: Tensor, patch_size: int) -> Tensor:
    """``(B, 1, H, W)`` log-variance -> ``(B, N)`` float32: ``exp(logvar)`` averaged per patch."""
    return pixel_to_patch(logvar.float().clamp(max=80.0).exp(), patch_size)


def patch_squared_error(v: Tensor, u: Tensor, patch_size: int) -> Tensor:
    """``(B, C, H, W)`` twice -> ``(B, N)``: ``(v - u)^2`` averaged over the channels and the pixels of each patch."""
    return pixel_to_patch(((v.float() - u.float()) ** 2).mean(dim=1, keepdim=True), patch_size)


def context_time(t: float, move: float = 0.5, fixed: float | None = None) -> float:
    """The time of the context patches at base time ``t``.

    ``fixed`` given: ``max(t, fixed)``; otherwise ``t + move * (1 - t)`` (``move`` in ``[0, 1]``
    is the share of the remaining way to the data; 0.5 = half way).
    """
    if fixed is not None:
        if not 0.0 <= fixed <= 1.0:
            raise ValueError(f"context_t must be in [0, 1], got {fixed}")
        return max(float(t), float(fixed))
    if not 0.0 <= move <= 1.0:
        raise ValueError(f"context move must be in [0, 1], got {move}")
    return float(t) + float(move) * (1.0 - float(t))


def context_mask(indices: Sequence[int], num_patches: int, share: float, seed: int = 0) -> Tensor:
    """``(len(indices), num_patches)`` bool: the context patches of each item.

    Exactly ``round(share * num_patches)`` patches per item (at least 1, at most N - 1), chosen
    uniformly at random; row ``k`` depends only on ``(seed, indices[k])``.
    """
    if not 0.0 < share < 1.0:
        raise ValueError(f"the context share must be in (0, 1), got {share}")
    k = min(max(1, int(round(share * num_patches))), num_patches - 1)
    out = torch.zeros(len(indices), num_patches, dtype=torch.bool)
    for r, i in enumerate(indices):
        out[r, torch.randperm(num_patches, generator=hashed_generator(_MASK_SALT, int(seed), int(i)))[:k]] = True
    return out


@dataclass
class Measurements:
    """Per-patch numbers, each ``(T, n, N)`` float32 (``T`` times, ``n`` items, ``N`` patches).

    ``unc0`` / ``err0``: every patch at ``t``; ``unc1`` / ``err1``: the context patches (``ctx``,
    ``(n, N)`` bool) at ``t_ctx``. ``labels_used``: the items' labels conditioned the model.
    """

    unc0: np.ndarray
    err0: np.ndarray
    unc1: np.ndarray
    err1: np.ndarray
    ctx: Tensor
    labels_used: bool


class _Inputs:
    """Turns data items into the model's inputs: encodes images for latent models, checks labels."""

    def __init__(self, model: nn.Module, autoencoder: Any, pixel: bool, use_labels: bool):
        self.shape = (int(model.in_channels), *(int(s) for s in model.image_size))
        self.K = int(getattr(model, "num_classes", 0))
        self.autoencoder, self.pixel, self.use_labels = autoencoder, pixel, use_labels
        self._ae: Any = None

    def images(self, items: list) -> Tensor:
        x1 = torch.stack([torch.as_tensor(it[0]).float() for it in items])
        if x1.shape[1:] != self.shape and not self.pixel and x1.shape[1] == 3:
            if self._ae is None:
                self._ae = get_autoencoder(self.autoencoder)
                if self._ae is None:
                    raise ValueError("image items for a latent model: give the autoencoder to encode them")
            x1 = self._ae.encode(x1, sample=False).float().cpu()
        if x1.shape[1:] != self.shape:
            raise ValueError(f"data items have shape {tuple(x1.shape[1:])} but the model takes {self.shape}")
        return x1

    def labels(self, items: list) -> Tensor | None:
        if not self.use_labels or self.K <= 0:
            return None
        lab = torch.tensor([int(it[1]) for it in items], dtype=torch.long)
        if not bool((lab >= 0).all()):
            return None
        if bool((lab >= self.K).any()):
            raise ValueError(
                f"data label {int(lab.max())} is outside the model's {self.K} classes; "
                "use data with matching classes or use_labels=False"
            )
        return lab


def measure(
    model: nn.Module,
    data: Any,
    n: int,
    ts: Sequence[float],
    t_ctx: Sequence[float],
    *,
    context_share: float,
    batch_size: int,
    seed: int,
    use_labels: bool,
    autoencoder: Any,
    pixel: bool,
    progress: bool,
) -> Measurements:
    """Run the model on the first ``n`` items at every ``t`` without and with context (eval mode, no grad)."""
    p, N = int(model.patch_size), int(model.num_patches)
    device = module_device(model)
    inputs = _Inputs(model, autoencoder, pixel, use_labels)
    T = len(ts)
    unc0, err0, unc1, err1 = (np.zeros((T, n, N), dtype=np.float32) for _ in range(4))
    ctx = context_mask(range(n), N, context_share, seed)
    labels_used = False

    def run(x0: Tensor, x1: Tensor, t: Tensor, y: Tensor | None) -> tuple[np.ndarray, np.ndarray]:
        v, lv = model(interpolate(x0, x1, t, p), t, y)
        return patch_uncertainty(lv, p).cpu().numpy(), patch_squared_error(v, x1 - x0, p).cpu().numpy()

    was_training = model.training
    model.eval()
    bar = tqdm(total=n * T, desc="analyze", unit="img·t", disable=not progress, leave=False)
    try:
        with torch.no_grad():
            for lo in range(0, n, batch_size):
                idx = list(range(lo, min(lo + batch_size, n)))
                items = [data[i] for i in idx]
                x1 = inputs.images(items).to(device)
                y = inputs.labels(items)
                labels_used |= y is not None
                y = None if y is None else y.to(device)
                x0 = indexed_randn(_NOISE_SALT, seed, idx, inputs.shape).to(device)
                m = ctx[lo : lo + len(idx)].to(device)
                rows = slice(lo, lo + len(idx))
                for j, t in enumerate(ts):
                    tt = torch.full((len(idx), N), t, device=device)
                    unc0[j, rows], err0[j, rows] = run(x0, x1, tt, y)
                    unc1[j, rows], err1[j, rows] = run(x0, x1, torch.where(m, torch.full_like(tt, t_ctx[j]), tt), y)
                    bar.update(len(idx))
    finally:
        bar.close()
        if was_training:
            model.train()
    return Measurements(unc0, err0, unc1, err1, ctx, labels_used)
