"""Fréchet distance between Gaussians fitted to two feature sets (the statistic behind FID).

    FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr( (S1^{1/2} S2 S1^{1/2})^{1/2} )

computed in float64 with symmetric eigendecompositions (no scipy needed; the matrix inside the
trace is symmetric PSD, so its square-root trace is the sum of the square roots of its
eigenvalues).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["feature_statistics", "frechet_distance", "frechet_distance_from_features"]


def _as64(a) -> Tensor:
    return torch.as_tensor(np.asarray(a) if not isinstance(a, Tensor) else a).detach().to("cpu", torch.float64)


def feature_statistics(features) -> tuple[Tensor, Tensor]:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)`` of ``(N, D)`` features (float64)."""
    f = _as64(features)
    if f.dim() != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, D), got shape {tuple(f.shape)}")
    mu = f.mean(0)
    centred = f - mu
    return mu, centred.T @ centred / (f.shape[0] - 1)


def _sqrtm_psd(s: Tensor) -> Tensor:
    w, v = torch.linalg.eigh((s + s.T) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance of ``N(mu1, sigma1)`` and ``N(mu2, sigma2)`` (``(D,)``, ``(D, D)``)."""
    mu1, mu2, s1, s2 = map(_as64, (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(
            f"statistics do not match: mu {tuple(mu1.shape)}/{tuple(mu2.shape)}, "
            f"sigma {tuple(s1.shape)}/{tuple(s2.shape)}"
        )
    r1 = _sqrtm_psd(s1)
    inner = r1 @ s2 @ r1
    tr_covmean = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum()
    fd = (mu1 - mu2).pow(2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * tr_covmean
    return float(fd.clamp_min(0))


def frechet_distance_from_features(f1, f2) -> float:
    """Fréchet distance between Gaussians fitted to two ``(N, D)`` feature sets."""
    return frechet_distance(*feature_statistics(f1), *feature_statistics(f2))
