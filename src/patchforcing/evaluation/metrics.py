"""Sample-quality statistics beyond the Fréchet distance: Inception Score and k-NN precision/recall.

Definitions follow the ADM evaluator (Dhariwal & Nichol 2021) and Kynkäänniemi et al. (2019):

* **Inception Score** ``IS = exp( E_x KL( p(y|x) || p(y) ) )`` where ``p(y|x)`` is the softmax of
  a classifier's logits and ``p(y)`` the mean of ``p(y|x)`` over a *split* of the samples; the
  score is computed per split and averaged (ADM: consecutive splits of 5,000 samples, i.e. 10
  splits of 50k samples).
* **Precision / recall** (k-NN manifolds, k = 3): every point of a set gets the radius of the ball
  reaching its k-th nearest neighbour *within its own set* (the point itself excluded); a point
  lies on the other set's manifold when it falls inside at least one of that set's balls
  (``distance <= radius``). Precision = fraction of samples on the reference manifold; recall =
  fraction of reference points on the sample manifold.

All pairwise distances are computed in row x column chunks with :func:`torch.cdist`, so e.g.
50k samples against 10k reference points never hold more than ``row_chunk x col_chunk`` distances
at once.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .frechet import feature_statistics, frechet_distance

__all__ = [
    "inception_score",
    "knn_radii",
    "within_manifold",
    "precision_recall",
    "frechet_distance_to_stats",
]


def _as_tensor(a: Any, dtype: torch.dtype, device: Any = None) -> Tensor:
    t = a if isinstance(a, Tensor) else torch.as_tensor(np.asarray(a))
    return t.detach().to(device=device if device is not None else t.device, dtype=dtype)


# --------------------------------------------------------------------------------------------
# Inception Score
# --------------------------------------------------------------------------------------------


def inception_score(
    logits: Any,
    split_size: int | None = 5000,
    splits: int | None = None,
) -> tuple[float, float]:
    """Inception Score of ``(N, K)`` class logits; returns ``(mean, std)`` over the splits.

    Args:
        logits: unnormalised class scores ``(N, K)`` (a softmax is applied, in float64).
        split_size: ADM's convention: consecutive splits of this many samples (the last one may
            be shorter). Used when ``splits`` is ``None``.
        splits: instead, this many near-equal consecutive splits (the classic "10 splits").

    Uniform predictions give 1; confident predictions spread evenly over ``K`` classes give ``K``.
    """
    p = torch.softmax(_as_tensor(logits, torch.float64, "cpu"), dim=1)
    if p.dim() != 2 or p.shape[0] < 1:
        raise ValueError(f"logits must be (N >= 1, K), got shape {tuple(p.shape)}")
    n = p.shape[0]
    if splits is not None:
        if int(splits) < 1 or int(splits) > n:
            raise ValueError(f"splits must be in 1..{n}, got {splits}")
        parts = torch.tensor_split(p, int(splits), dim=0)
    else:
        size = n if split_size is None else int(split_size)
        if size < 1:
            raise ValueError(f"split_size must be >= 1, got {split_size}")
        parts = torch.split(p, size, dim=0)
    scores = []
    for part in parts:
        py = part.mean(0, keepdim=True)
        # x log(x / y) with 0 log 0 = 0
        kl = torch.xlogy(part, part) - part * torch.log(py.clamp_min(1e-300))
        scores.append(math.exp(float(kl.sum(1).mean())))
    s = np.asarray(scores)
    return float(s.mean()), float(s.std())


# --------------------------------------------------------------------------------------------
# k-NN manifolds
# --------------------------------------------------------------------------------------------


def _pairwise(a: Tensor, b: Tensor) -> Tensor:
    return torch.cdist(a, b).clamp_min_(0)


def knn_radii(
    features: Any,
    k: int = 3,
    *,
    row_chunk: int = 10_000,
    col_chunk: int = 10_000,
    device: Any = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Distance of every point of ``(N, D)`` features to its ``k``-th nearest neighbour in the set.

    The point itself (distance 0) is not counted, as in the ADM evaluator (which takes index ``k``
    of each point's sorted distances, index 0 being the point itself). Duplicated points count as
    neighbours at distance 0. Returns a float ``(N,)`` tensor on the CPU.
    """
    f = _as_tensor(features, dtype)
    if f.dim() != 2:
        raise ValueError(f"features must be (N, D), got shape {tuple(f.shape)}")
    n = f.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be in 1..{n - 1} for {n} points, got {k}")
    out = torch.empty(n, dtype=dtype)
    for r0 in range(0, n, row_chunk):
        rows = f[r0 : r0 + row_chunk].to(device)
        best = None  # (rows, k+1) smallest distances so far, self included
        for c0 in range(0, n, col_chunk):
            d = _pairwise(rows, f[c0 : c0 + col_chunk].to(device))
            # the self distance is exactly 0 (cdist's matmul path can leave a tiny residue)
            lo, hi = max(r0, c0), min(r0 + rows.shape[0], c0 + d.shape[1])
            if lo < hi:
                idx = torch.arange(lo, hi, device=d.device)
                d[idx - r0, idx - c0] = 0
            cand = d if best is None else torch.cat([best, d], dim=1)
            best = torch.topk(cand, min(k + 1, cand.shape[1]), dim=1, largest=False).values
        out[r0 : r0 + rows.shape[0]] = best[:, k].cpu()
    return out


def within_manifold(
    points: Any,
    manifold: Any,
    radii: Any,
    *,
    row_chunk: int = 10_000,
    col_chunk: int = 10_000,
    device: Any = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Boolean ``(M,)``: whether each of ``points (M, D)`` lies in at least one ball
    ``|x - manifold[j]| <= radii[j]`` of ``manifold (N, D)``."""
    p, m = _as_tensor(points, dtype), _as_tensor(manifold, dtype)
    r = _as_tensor(radii, dtype).reshape(-1)
    if p.dim() != 2 or m.dim() != 2 or p.shape[1] != m.shape[1] or r.numel() != m.shape[0]:
        raise ValueError(
            f"shapes do not fit: points {tuple(p.shape)}, manifold {tuple(m.shape)}, radii {tuple(r.shape)}"
        )
    inside = torch.zeros(p.shape[0], dtype=torch.bool)
    for r0 in range(0, p.shape[0], row_chunk):
        rows = p[r0 : r0 + row_chunk].to(device)
        hit = torch.zeros(rows.shape[0], dtype=torch.bool, device=rows.device)
        for c0 in range(0, m.shape[0], col_chunk):
            d = _pairwise(rows, m[c0 : c0 + col_chunk].to(device))
            hit |= (d <= r[c0 : c0 + col_chunk].to(d.device)[None, :]).any(1)
        inside[r0 : r0 + rows.shape[0]] = hit.cpu()
    return inside


def precision_recall(
    reference: Any,
    samples: Any,
    k: int = 3,
    *,
    row_chunk: int = 10_000,
    col_chunk: int = 10_000,
    device: Any = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of ``samples`` w.r.t. ``reference``.

    Args:
        reference, samples: ``(N_ref, D)`` and ``(N_samples, D)`` features (e.g. Inception pool3).
        k: neighbourhood size of the manifold radii (ADM: 3).
        row_chunk, col_chunk: size of the distance blocks (memory ~ ``row_chunk * col_chunk``).

    Returns:
        ``{"precision": ..., "recall": ...}``.
    """
    kw = dict(row_chunk=row_chunk, col_chunk=col_chunk, device=device, dtype=dtype)
    ref, smp = _as_tensor(reference, dtype), _as_tensor(samples, dtype)
    if ref.dim() != 2 or smp.dim() != 2 or ref.shape[1] != smp.shape[1]:
        raise ValueError(f"feature shapes do not fit: reference {tuple(ref.shape)}, samples {tuple(smp.shape)}")
    ref_r = knn_radii(ref, k, **kw)
    smp_r = knn_radii(smp, k, **kw)
    precision = within_manifold(smp, ref, ref_r, **kw).double().mean().item()
    recall = within_manifold(ref, smp, smp_r, **kw).double().mean().item()
    return {"precision": float(precision), "recall": float(recall)}


# --------------------------------------------------------------------------------------------
# Fréchet distance against stored statistics (FID / sFID against an ADM reference batch)
# --------------------------------------------------------------------------------------------


def frechet_distance_to_stats(features: Any, mu: Any, sigma: Any) -> float:
    """Fréchet distance between Gaussians fitted to ``(N, D)`` ``features`` and ``N(mu, sigma)``
    (e.g. an ADM reference batch's stored ``mu``/``sigma`` or ``mu_s``/``sigma_s``)."""
    mu_f, sigma_f = feature_statistics(features)
    mu_t = _as_tensor(mu, torch.float64, "cpu").reshape(-1)
    if mu_t.numel() != mu_f.numel():
        raise ValueError(
            f"the reference statistics are {mu_t.numel()}-dimensional but the features are "
            f"{mu_f.numel()}-dimensional (statistics of a different feature space?)"
        )
    return frechet_distance(mu_f, sigma_f, mu_t, sigma)
