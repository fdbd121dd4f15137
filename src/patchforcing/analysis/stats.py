"""Correlations and histograms (float64 NumPy)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["pearson_r", "spearman_r", "ranks", "log_histogram", "finite_or_none"]


def pearson_r(a: Any, b: Any) -> float:
    """Pearson correlation of two equally long arrays (float64; NaN when one is constant or n < 2)."""
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"pearson_r: sizes differ ({x.size} vs {y.size})")
    if x.size < 2:
        return float("nan")
    x = x - x.mean()
    y = y - y.mean()
    den = math.sqrt(float(np.dot(x, x)) * float(np.dot(y, y)))
    return float(np.dot(x, y) / den) if den > 0 else float("nan")


def ranks(a: np.ndarray) -> np.ndarray:
    """``(n,)`` ranks 1..n of ``a``; ties get their average rank."""
    order = np.argsort(a, kind="mergesort")
    s = a[order]
    out = np.empty(a.size, dtype=np.float64)
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    ends = np.r_[starts[1:], a.size]
    out[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)  # average of 1-based ranks
    return out


def spearman_r(a: Any, b: Any) -> float:
    """Spearman's rank correlation (Pearson R of the ranks, ties averaged)."""
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"spearman_r: sizes differ ({x.size} vs {y.size})")
    return pearson_r(ranks(x), ranks(y))


def log_histogram(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """``(len(edges) - 1,)`` int64 counts of the positive finite values, clipped into the edge range."""
    v = np.clip(values[np.isfinite(values) & (values > 0)], edges[0], edges[-1])
    return np.histogram(v, bins=edges)[0].astype(np.int64)


def finite_or_none(x: float | None) -> float | None:
    """``x`` as a float, ``None`` when missing or not finite (JSON has no NaN)."""
    return None if x is None or not math.isfinite(x) else float(x)
