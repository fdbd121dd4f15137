"""From ``SampleResult.record`` (a list of ``CallRecord``) to the arrays the pictures show."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .grid import to_uint8_images

Decode = Callable[[torch.Tensor], torch.Tensor]


def records(record: Any) -> list:
    """The ``CallRecord`` list of a ``SampleResult`` or of a list; errors when there is none."""
    if hasattr(record, "record") and not isinstance(record, (list, tuple)):
        record = record.record
    if record is None:
        raise ValueError("no record: sample with pf.sample(..., record=True)")
    record = list(record)
    if not record:
        raise ValueError("the record is empty")
    return record


def patch_geometry(rec: Any, patch_size: int | None) -> tuple[int, int, int]:
    """``(p, h, w)``: patch size and patch grid of the recorded state (``p`` inferred when ``None``)."""
    H, W = rec.x.shape[-2:]
    N = rec.t.shape[-1]
    p = int(round(math.sqrt(H * W / max(N, 1)))) if patch_size is None else int(patch_size)
    if p < 1 or H % p or W % p or (H // p) * (W // p) != N:
        raise ValueError(f"{N} patch times do not tile a {H}x{W} state with patch size {patch_size or p}")
    return p, H // p, W // p


def patch_variance(logvar: torch.Tensor, image: int, p: int) -> np.ndarray:
    """``(h, w)`` float64: ``exp(logvar)`` of one image averaged over each ``p x p`` patch."""
    var = torch.exp(logvar.detach().cpu()[image, 0].double().clamp(max=700.0))
    h, w = var.shape[0] // p, var.shape[1] // p
    return var.reshape(h, p, w, p).mean(dim=(1, 3)).numpy()


def patch_times(rec: Any, image: int, h: int, w: int) -> np.ndarray:
    """``(h, w)`` float64 per-patch times of one image."""
    return rec.t.detach().cpu()[image].double().reshape(h, w).numpy()


def select(n: int, every: int) -> list[int]:
    """Calls ``0, every, 2 every, ...`` of ``n``, plus the last one."""
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    idx = list(range(0, n, every))
    return idx if idx[-1] == n - 1 else idx + [n - 1]


def image_tiles(states: list[torch.Tensor], decode: Decode | None) -> np.ndarray:
    """``(C, H, W)`` tensors -> ``(n, H', W', 3)`` uint8, decoded in one batch when ``decode`` is given."""
    batch = torch.stack([s.detach().cpu().float() for s in states])
    if decode is not None:
        with torch.no_grad():
            batch = decode(batch)
    return to_uint8_images(batch)


def log_limits(maps: list[np.ndarray | None]) -> tuple[float, float] | None:
    """Shared ``(lo, hi)`` of the positive finite values of ``maps`` (widened when constant)."""
    vals = [m[np.isfinite(m) & (m > 0)] for m in maps if m is not None]
    vals = [v for v in vals if v.size]
    if not vals:
        return None
    allv = np.concatenate(vals)
    lo, hi = float(allv.min()), float(allv.max())
    return (lo / 1.1, hi * 1.1) if hi <= lo else (lo, hi)


def by_step(record: list) -> dict[int, list]:
    """Outer step -> its calls, in order."""
    out: dict[int, list] = {}
    for r in record:
        out.setdefault(int(r.step), []).append(r)
    return out
