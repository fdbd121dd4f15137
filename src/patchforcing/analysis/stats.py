"""Correlations, histograms and confidence intervals (float64 NumPy).

Intervals: :func:`bootstrap_interval` and :func:`paired_bootstrap_difference` (bootstrap,
:func:`centered_interval` or :func:`percentile_interval`; paired = the same resampled indices for
both sides), :func:`bootstrap_indices` / :func:`replicate_indices` (the draws, for statistics
that are not a function of one array, e.g. a Fréchet distance), :func:`t_interval` (Student t,
e.g. over training seeds) and :func:`combined_interval` (independent errors in quadrature).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "pearson_r",
    "spearman_r",
    "ranks",
    "log_histogram",
    "finite_or_none",
    "Interval",
    "replicate_indices",
    "bootstrap_indices",
    "percentile_interval",
    "centered_interval",
    "bootstrap_interval",
    "paired_bootstrap_difference",
    "regularized_incomplete_beta",
    "student_t_cdf",
    "student_t_quantile",
    "t_interval",
    "welch_interval",
    "combined_interval",
]


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


# --------------------------------------------------------------------------------------------
# Confidence intervals: bootstrap (percentile) and Student t
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided confidence interval ``[low, high]`` at ``confidence``."""

    estimate: float
    low: float
    high: float
    confidence: float = 0.95

    @property
    def excludes_zero(self) -> bool:
        """Whether 0 lies outside ``[low, high]`` (a significant difference at this level)."""
        return bool(self.low > 0 or self.high < 0)

    def to_dict(self) -> dict[str, float | None]:
        return {
            "estimate": finite_or_none(self.estimate),
            "low": finite_or_none(self.low),
            "high": finite_or_none(self.high),
            "confidence": self.confidence,
        }


def _check_confidence(confidence: float) -> float:
    c = float(confidence)
    if not 0.0 < c < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
    return c


def replicate_indices(n: int, replicate: int, seed: int = 0, stream: int = 0) -> np.ndarray:
    """``(n,)`` int64 indices of bootstrap replicate ``replicate``: drawn uniformly with replacement
    from ``range(n)`` by a generator seeded with ``(seed, stream, replicate)`` (so any replicate can
    be drawn on its own, and ``stream`` separates independent resamplings, e.g. of a reference)."""
    if int(n) < 1 or int(replicate) < 0:
        raise ValueError(f"bootstrap needs n >= 1 and a replicate index >= 0, got n={n}, replicate={replicate}")
    rng = np.random.default_rng([int(seed), int(stream), int(replicate)])
    return rng.integers(0, int(n), size=int(n), dtype=np.int64)


def bootstrap_indices(n: int, replicates: int, seed: int = 0, stream: int = 0) -> np.ndarray:
    """``(replicates, n)`` int64 indices: row ``r`` is :func:`replicate_indices` ``(n, r, seed, stream)``.

    Two statistics bootstrapped with the same indices are *paired* (replicate ``r`` resamples the
    same items for both)."""
    if int(replicates) < 1:
        raise ValueError(f"bootstrap needs replicates >= 1, got {replicates}")
    return np.stack([replicate_indices(n, r, seed, stream) for r in range(int(replicates))])


def _finite_quantiles(replicates: Any, c: float) -> tuple[np.ndarray, float, float] | None:
    """``(r, q_lo, q_hi)``: the finite replicate values ``r`` ``(m,)`` float64 and their ``(1 - c) / 2``
    and ``(1 + c) / 2`` quantiles (linear interpolation); ``None`` when no value is finite."""
    r = np.asarray(replicates, dtype=np.float64).ravel()
    r = r[np.isfinite(r)]
    if r.size == 0:
        return None
    lo, hi = np.quantile(r, [(1 - c) / 2, (1 + c) / 2])
    return r, float(lo), float(hi)


def percentile_interval(estimate: float, replicates: Any, confidence: float = 0.95) -> Interval:
    """The percentile bootstrap interval: the ``(1 - c) / 2`` and ``(1 + c) / 2`` quantiles
    (linear interpolation) of the finite replicate values, around ``estimate``."""
    c = _check_confidence(confidence)
    q = _finite_quantiles(replicates, c)
    if q is None:
        return Interval(float(estimate), float("nan"), float("nan"), c)
    return Interval(float(estimate), q[1], q[2], c)


def centered_interval(estimate: float, replicates: Any, confidence: float = 0.95) -> Interval:
    """The bootstrap interval of the *expected value of the statistic at this sample size*:
    ``[estimate - (q_hi - m), estimate - (q_lo - m)]`` with ``q_lo, q_hi`` the ``(1 -+ c) / 2``
    quantiles and ``m`` the mean of the finite replicates.

    The replicates' deviations from their mean stand in for the estimate's deviations from its
    expectation (the basic bootstrap, with the bootstrap's bias estimate added back). Unlike the
    percentile interval it is not displaced by the extra bias that resampling *with duplicates*
    gives statistics such as a Fréchet distance (whose replicates all lie above the estimate when
    the sampling spread is small against that bias). For a mean both intervals nearly agree."""
    c = _check_confidence(confidence)
    q = _finite_quantiles(replicates, c)
    if q is None:
        return Interval(float(estimate), float("nan"), float("nan"), c)
    r, lo, hi = q
    m = float(r.mean())
    est = float(estimate)
    low, high = est - (hi - m), est - (lo - m)
    if np.all(r == r[0]):  # no spread: exactly the estimate (no rounding from the mean)
        low = high = est
    return Interval(est, low, high, c)


_METHODS = {"centered": centered_interval, "percentile": percentile_interval}


def _bootstrap(
    n: int, statistic_of: Callable[[Any], float], replicates: int, confidence: float, seed: int, method: str
) -> Interval:
    """The bootstrap interval of ``statistic_of(index)`` (the statistic of the items at ``index``,
    ``slice(None)``: all of them) over :func:`bootstrap_indices` ``(n, replicates, seed)``, by
    ``method`` (:data:`_METHODS`)."""
    if method not in _METHODS:
        raise ValueError(f"unknown bootstrap interval method {method!r}; use one of {sorted(_METHODS)}")
    idx = bootstrap_indices(n, replicates, seed)
    reps = np.array([statistic_of(i) for i in idx], dtype=np.float64)
    return _METHODS[method](float(statistic_of(slice(None))), reps, confidence)


def bootstrap_interval(
    values: Any,
    statistic: Any = np.mean,
    *,
    replicates: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    method: str = "centered",
) -> Interval:
    """Bootstrap interval of ``statistic`` of ``values`` (``(n,)`` or ``(n, ...)``; the items along
    axis 0 are resampled). ``statistic`` maps an array like ``values`` to a number; ``method``:
    ``"centered"`` (:func:`centered_interval`) or ``"percentile"`` (:func:`percentile_interval`)."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 0 or v.shape[0] < 1:
        raise ValueError("bootstrap_interval: need at least one value")
    return _bootstrap(v.shape[0], lambda i: statistic(v[i]), replicates, confidence, seed, method)


def paired_bootstrap_difference(
    a: Any,
    b: Any,
    statistic: Any = np.mean,
    *,
    replicates: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    method: str = "centered",
) -> Interval:
    """Interval of ``statistic(a) - statistic(b)`` for paired data: item ``i`` of ``a`` and of
    ``b`` belong together (e.g. samples made from the same noise and label), so every replicate
    resamples the same indices from both. Identical inputs give exactly ``[0, 0]``; ``a = b + c``
    with the mean gives exactly ``[c, c]``."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape[:1] != y.shape[:1] or x.ndim == 0 or x.shape[0] < 1:
        raise ValueError(f"paired_bootstrap_difference: paired data need the same length, got {x.shape}, {y.shape}")
    return _bootstrap(x.shape[0], lambda i: statistic(x[i]) - statistic(y[i]), replicates, confidence, seed, method)


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """``I_x(a, b)`` for ``a, b > 0`` and ``x`` in ``[0, 1]``."""
    if not (a > 0 and b > 0) or not 0.0 <= x <= 1.0:
        raise ValueError(f"regularized_incomplete_beta: need a, b > 0 and 0 <= x <= 1, got {a}, {b}, {x}")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def student_t_cdf(x: float, df: float) -> float:
    """CDF of Student's t distribution with ``df > 0`` degrees of freedom."""
    if not df > 0:
        raise ValueError(f"df must be > 0, got {df}")
    tail = 0.5 * regularized_incomplete_beta(df / 2.0, 0.5, df / (df + x * x))
    return 1.0 - tail if x >= 0 else tail


def student_t_quantile(p: float, df: float) -> float:
    """The ``p``-quantile of Student's t with ``df`` degrees of freedom (bisection on the CDF;
    ``student_t_quantile(0.975, 2) = 4.3027``)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie in (0, 1), got {p}")
    if p < 0.5:
        return -student_t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while student_t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if student_t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return (lo + hi) / 2.0


def t_interval(values: Any, confidence: float = 0.95) -> Interval:
    """Student-t interval of the mean of ``values`` (e.g. one number per training seed):
    ``mean +- t_{(1 + c) / 2, n - 1} s / sqrt(n)``; NaN bounds for fewer than two values."""
    c = _check_confidence(confidence)
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("t_interval: no values")
    mean = float(v.mean())
    if v.size < 2:
        return Interval(mean, float("nan"), float("nan"), c)
    half = student_t_quantile((1 + c) / 2, v.size - 1) * float(v.std(ddof=1)) / math.sqrt(v.size)
    return Interval(mean, mean - half, mean + half, c)


def welch_interval(a: Any, b: Any, confidence: float = 0.95) -> Interval:
    """Interval of ``mean(a) - mean(b)`` for two independent samples (e.g. per-seed FDs of two training
    recipes): Welch's ``t`` with the Welch-Satterthwaite degrees of freedom; NaN bounds when either
    sample has fewer than two values or both have no spread."""
    c = _check_confidence(confidence)
    x, y = (np.asarray(v, dtype=np.float64).ravel() for v in (a, b))
    if x.size == 0 or y.size == 0:
        raise ValueError("welch_interval: no values")
    diff = float(x.mean() - y.mean())
    if x.size < 2 or y.size < 2:
        return Interval(diff, float("nan"), float("nan"), c)
    vx, vy = float(x.var(ddof=1)) / x.size, float(y.var(ddof=1)) / y.size
    if vx + vy == 0:
        return Interval(diff, float("nan"), float("nan"), c)
    df = (vx + vy) ** 2 / (vx**2 / (x.size - 1) + vy**2 / (y.size - 1))
    half = student_t_quantile((1 + c) / 2, df) * math.sqrt(vx + vy)
    return Interval(diff, diff - half, diff + half, c)


def combined_interval(estimate: float, *intervals: Interval) -> Interval:
    """One interval for two or more independent sources of error around ``estimate``: on each
    side the distances from ``estimate`` to the given bounds are added in quadrature (e.g. the
    sampling noise from a bootstrap and the training-seed spread from :func:`t_interval`).
    Intervals with NaN bounds are left out; the confidence is the first interval's."""
    if not intervals:
        raise ValueError("combined_interval: no intervals")
    est = float(estimate)
    low2 = high2 = 0.0
    for iv in intervals:
        if not (math.isfinite(iv.low) and math.isfinite(iv.high)):
            continue
        low2 += max(0.0, est - iv.low) ** 2
        high2 += max(0.0, iv.high - est) ** 2
    return Interval(est, est - math.sqrt(low2), est + math.sqrt(high2), intervals[0].confidence)
