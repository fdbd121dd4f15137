"""Scoring the samples of a study: features (cached), Fréchet distances with paired bootstrap
replicates, precision/recall.

Every FD is between a set of ``n`` images (samples of one run/sampler/NFE, or the floor's real
images) and the held-out reference. Bootstrap replicate ``r`` resamples the reference with one
draw and *every* ``n``-image set with one shared draw of indices (:func:`~patchforcing.analysis.stats.replicate_indices`):
since sample ``i`` has the same noise and label in every set, replicate ``r`` of two sets is a
paired resample, and the replicates of a difference are the differences of the replicates.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..analysis.stats import replicate_indices
from ..evaluation import (
    FeatureExtractor,
    build_feature_extractor,
    extract_features,
    feature_statistics,
    frechet_distance,
    open_images,
    precision_recall,
)
from ..utils.io import save_npz_atomic

__all__ = ["FrechetTo", "cached_features", "make_extractor", "image_features", "bootstrap_fd", "fd", "pr"]

_REFERENCE_STREAM, _SAMPLE_STREAM = 1, 0


def image_features(images: Any, extractor: FeatureExtractor, batch_size: int = 100) -> np.ndarray:
    """``(n, D)`` float32 pool features of ``images`` (uint8 NHWC array or ``.npz`` path)."""
    feats = extract_features(
        open_images(images, role="images"),
        extractor,
        batch_size=batch_size,
        resolution=extractor.resolution,
        parts=("pool",),
    )
    return feats["pool"].numpy().astype(np.float32)


def cached_features(path: Path, meta: Mapping[str, Any], compute: Callable[[], np.ndarray]) -> np.ndarray:
    """``compute()``, kept in ``path`` (``.npz`` with the JSON ``meta``); reused while the meta matches."""
    want = json.dumps(meta, sort_keys=True, default=str)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["meta"]) == want:
                    return z["features"]
        except (OSError, ValueError, KeyError):
            pass
    feats = compute()
    save_npz_atomic(path, meta=np.array(want), features=feats)
    return feats


def make_extractor(features: str, classifier: str | Path | None, inception_weights: str | None, device: Any):
    """The feature extractor of a study: ``classifier`` (the study's own checkpoint), ``classifier:PATH``
    or ``inception``."""
    spec = f"classifier:{classifier}" if features == "classifier" else features
    return build_feature_extractor(spec, inception_weights=inception_weights, device=device)


def _stats(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return feature_statistics(f)


def fd(features: np.ndarray, reference: np.ndarray) -> float:
    """Fréchet distance of two ``(n, D)`` feature sets."""
    with _one_thread():
        return frechet_distance(*_stats(torch.from_numpy(features)), *_stats(torch.from_numpy(reference)))


def pr(features: np.ndarray, reference: np.ndarray, k: int = 3) -> dict[str, float]:
    """Precision/recall (k-NN manifolds) of ``features`` against ``reference``."""
    return precision_recall(reference, features, k=k)


class FrechetTo:
    """Fréchet distances to one Gaussian ``N(mu, sigma)``, its matrix square root computed once.

    The formula of :func:`~patchforcing.evaluation.frechet_distance` (float64, symmetric
    eigendecompositions) with the reference as the first argument::

        FD = |mu - mu2|^2 + tr(S) + tr(S2) - 2 sum sqrt(eig(S^1/2 S2 S^1/2))

    so each further distance costs one ``eigvalsh`` (the bootstrap computes thousands).
    """

    def __init__(self, mu: torch.Tensor, sigma: torch.Tensor):
        s = sigma.double()
        w, v = torch.linalg.eigh((s + s.T) / 2)
        self.mu, self.root, self.trace = mu.double(), (v * w.clamp_min(0).sqrt()) @ v.T, torch.trace(s)

    def __call__(self, mu: torch.Tensor, sigma: torch.Tensor) -> float:
        inner = self.root @ sigma.double() @ self.root
        tr_covmean = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum()
        d = (self.mu - mu.double()).pow(2).sum() + self.trace + torch.trace(sigma.double()) - 2 * tr_covmean
        return float(d.clamp_min(0))


@contextmanager
def _one_thread():
    """Small eigendecompositions run one-threaded: with two threads on a busy CPU a 128 x 128
    ``eigh`` was measured ~80x slower (thread contention) than on one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def bootstrap_fd(
    sets: Mapping[Any, np.ndarray],
    reference: np.ndarray,
    replicates: int,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> dict[Any, np.ndarray]:
    """``(replicates,)`` bootstrap FDs of every feature set against ``reference``.

    Sets of the same size share their index draws (paired); the reference is resampled once per
    replicate for all sets. Deterministic given ``seed``."""
    ref = torch.from_numpy(np.ascontiguousarray(reference, dtype=np.float64))
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64)) for k, v in sets.items()}
    out = {k: np.empty(int(replicates), dtype=np.float64) for k in sets}
    with _one_thread():
        for r in range(int(replicates)):
            j = torch.from_numpy(replicate_indices(ref.shape[0], r, seed, _REFERENCE_STREAM))
            to_ref = FrechetTo(*_stats(ref[j]))
            draws: dict[int, torch.Tensor] = {}
            for key, f in tensors.items():
                n = f.shape[0]
                if n not in draws:
                    draws[n] = torch.from_numpy(replicate_indices(n, r, seed, _SAMPLE_STREAM))
                out[key][r] = to_ref(*_stats(f[draws[n]]))
            if progress is not None:
                progress(r)
    return out
