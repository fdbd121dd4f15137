"""``evaluate(samples, ref, metrics, features)``: the ADM evaluation suite in one call.

Protocol (ADM evaluator, Dhariwal & Nichol 2021):

* **FID**: Fréchet distance between the samples' pool features and the reference's (an ADM
  reference batch's stored ``mu``/``sigma`` when the features are Inception's).
* **sFID**: the same on spatial features (stored ``mu_s``/``sigma_s``).
* **IS**: Inception Score of the samples' logits, splits of 5,000 samples.
* **precision / recall**: k-NN manifolds (k = 3) of the samples' pool features and those of the
  reference *images* (all of them; an ADM reference batch has 10k).

With ``features="classifier:CKPT"`` the same numbers are computed in a small classifier's feature
space and named ``FD_classifier``, ``sFD_classifier``, ``IS_classifier``, ``precision_classifier``
and ``recall_classifier``; they are only comparable with numbers from the same checkpoint.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..utils.io import save_npz_atomic
from .features import FeatureExtractor, build_feature_extractor
from .frechet import feature_statistics, frechet_distance
from .metrics import inception_score, precision_recall
from .reference import EvaluationError, ImageSet, open_images

__all__ = ["METRICS", "parse_metrics", "extract_features", "evaluate", "format_results"]

#: the metric keys, in report order
METRICS: tuple[str, ...] = ("fid", "sfid", "is", "precision", "recall")
_ALIASES: dict[str, tuple[str, ...]] = {
    "all": METRICS,
    "pr": ("precision", "recall"),
    "prc": ("precision", "recall"),
    "isc": ("is",),
    "inception_score": ("is",),
    "fd": ("fid",),
    "sfd": ("sfid",),
}
_CACHE_VERSION = 1


def parse_metrics(metrics: str | Iterable[str] | None) -> tuple[str, ...]:
    """``"fid,is"`` / ``["fid", "pr"]`` -> metric keys in :data:`METRICS` order (aliases: ``all``,
    ``pr``/``prc`` = precision + recall, ``isc``). Raises :class:`EvaluationError` for unknown names."""
    if metrics is None:
        return METRICS
    items = metrics.split(",") if isinstance(metrics, str) else list(metrics)
    wanted: set[str] = set()
    for raw in items:
        name = str(raw).strip().lower()
        if not name:
            continue
        if name in METRICS:
            wanted.add(name)
        elif name in _ALIASES:
            wanted.update(_ALIASES[name])
        else:
            raise EvaluationError(
                f"unknown metric {raw!r}; known: {', '.join(METRICS)} (aliases: {', '.join(sorted(_ALIASES))})"
            )
    if not wanted:
        raise EvaluationError("no metric requested")
    return tuple(m for m in METRICS if m in wanted)


def extract_features(
    images: ImageSet,
    extractor: FeatureExtractor,
    *,
    batch_size: int = 100,
    resolution: int | None = None,
    parts: Sequence[str] = ("pool", "spatial", "logits"),
    progress: Callable[[str], None] | None = None,
    label: str = "images",
) -> dict[str, Tensor | None]:
    """Run ``extractor`` over every image of ``images``; returns the requested ``parts``
    concatenated (float32, CPU), ``None`` for a part the extractor does not produce."""
    out: dict[str, list[Tensor] | None] = {p: [] for p in parts}
    done, next_report = 0, 0
    for batch in images.batches(batch_size, resolution):
        feats = extractor(batch)
        for p in parts:
            v = feats.get(p)
            if v is None:
                out[p] = None
            elif out[p] is not None:
                out[p].append(v.detach().float().cpu())
        done += len(batch)
        if progress is not None and (done >= next_report or done == images.num_images):
            progress(f"{label}: {done}/{images.num_images}")
            next_report = done + max(batch_size, images.num_images // 10)
    return {p: (None if v is None or not v else torch.cat(v)) for p, v in out.items()}


# --------------------------------------------------------------------------------------------
# Reference features, with an optional cache file
# --------------------------------------------------------------------------------------------


def _cache_meta(ref: ImageSet, extractor: FeatureExtractor, resolution: int | None) -> dict[str, Any]:
    return {
        "version": _CACHE_VERSION,
        "reference": ref.fingerprint(),
        "features": extractor.describe(),
        "resolution": resolution,
    }


def _load_cache(path: Path, meta: dict[str, Any]) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            stored = json.loads(str(z["meta"]))
            if stored != json.loads(json.dumps(meta)):
                return None
            return {k: z[k] for k in z.files if k != "meta"}
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return None


def _save_cache(path: Path, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    save_npz_atomic(path, meta=np.array(json.dumps(meta)), **arrays)


def _reference_arrays(
    ref: ImageSet,
    extractor: FeatureExtractor,
    *,
    resolution: int | None,
    batch_size: int,
    cache: str | os.PathLike | None,
    progress: Callable[[str], None] | None,
    notes: list[str],
) -> dict[str, np.ndarray]:
    """Pool features and pool/spatial statistics of the reference images (cached if asked)."""
    meta = _cache_meta(ref, extractor, resolution)
    if cache is not None:
        hit = _load_cache(Path(cache), meta)
        if hit is not None:
            notes.append(f"reference features read from the cache {cache}")
            return hit
    feats = extract_features(
        ref,
        extractor,
        batch_size=batch_size,
        resolution=resolution,
        parts=("pool", "spatial"),
        progress=progress,
        label="reference",
    )
    arrays: dict[str, np.ndarray] = {"pool": feats["pool"].numpy()}
    mu, sigma = feature_statistics(feats["pool"])
    arrays.update(mu=mu.numpy(), sigma=sigma.numpy())
    if feats["spatial"] is not None:
        mu_s, sigma_s = feature_statistics(feats["spatial"])
        arrays.update(mu_s=mu_s.numpy(), sigma_s=sigma_s.numpy())
    if cache is not None:
        _save_cache(Path(cache), meta, arrays)
        notes.append(f"reference features written to the cache {cache}")
    return arrays


# --------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------


def _fd(stats_a: tuple[Tensor, Tensor], mu: Any, sigma: Any, what: str) -> float:
    mu_t = torch.as_tensor(np.asarray(mu), dtype=torch.float64).reshape(-1)
    if mu_t.numel() != stats_a[0].numel():
        raise EvaluationError(
            f"{what}: the reference statistics are {mu_t.numel()}-dimensional but the sample features are "
            f"{stats_a[0].numel()}-dimensional (statistics of another feature space?)"
        )
    return frechet_distance(stats_a[0], stats_a[1], mu_t, sigma)


def evaluate(
    samples: Any,
    ref: Any,
    metrics: str | Iterable[str] | None = METRICS,
    features: str | FeatureExtractor = "inception",
    *,
    batch_size: int = 100,
    k: int = 3,
    is_split_size: int = 5000,
    is_splits: int | None = None,
    device: Any = "cpu",
    inception_weights: str | os.PathLike | None = None,
    cache: str | os.PathLike | None = None,
    use_reference_stats: bool = True,
    chunk_size: int = 10_000,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Score ``samples`` against ``ref``.

    Args:
        samples: an ``.npz`` (``arr_0`` or ``images``, uint8 NHWC), ``.npy``, image folder,
            :class:`ImageSet` or uint8 array.
        ref: the same kinds, or an ADM reference batch (``arr_0`` + ``mu``/``sigma``/``mu_s``/``sigma_s``).
        metrics: subset of ``fid, sfid, is, precision, recall`` (a comma list or iterable).
        features: ``"inception"``, ``"classifier:PATH"`` or a :class:`FeatureExtractor`.
        batch_size: images per feature-extractor call.
        k: neighbourhood size of precision/recall (ADM: 3).
        is_split_size, is_splits: Inception Score splits (ADM: 5,000 samples per split).
        inception_weights: local Inception weights file (torch-fidelity format).
        cache: optional ``.npz`` path holding the reference's features/statistics; reused when
            it matches the reference file, the feature extractor and the resolution.
        use_reference_stats: use an ADM reference batch's stored statistics for FID/sFID
            (only with feature extractors in that space, i.e. Inception).
        chunk_size: rows/columns of each distance block of precision/recall.

    Returns:
        ``{"metrics": {name: value or None}, "samples": {...}, "reference": {...},
        "features": {...}, "settings": {...}, "details": {...}, "notes": [...]}``.
    """
    wanted = parse_metrics(metrics)
    if k < 1:
        raise EvaluationError(f"k must be >= 1, got {k}")
    if batch_size < 1:
        raise EvaluationError(f"batch size must be >= 1, got {batch_size}")
    smp = open_images(samples, role="samples")
    refset = open_images(ref, role="reference")
    extractor = build_feature_extractor(features, inception_weights=inception_weights, device=device)
    names = extractor.metric_names
    notes: list[str] = []

    # resolutions: the extractor's if it has one, else the samples' (the reference follows)
    smp_res: int | None
    if extractor.resolution is not None:
        smp_res = ref_res = int(extractor.resolution)
        if smp.resolution is not None and smp.resolution != smp_res:
            notes.append(f"samples resized from {smp.resolution} to {smp_res} px (the feature extractor's resolution)")
    else:
        smp_res = smp.resolution if smp.kind != "folder" else (refset.resolution or None)
        if smp_res is None:
            raise EvaluationError(
                "both samples and reference are image folders: give one as an .npz to fix the resolution"
            )
        ref_res = smp_res
    if refset.resolution is not None and refset.resolution != ref_res:
        notes.append(f"reference images resized from {refset.resolution} to {ref_res} px (centre crop)")

    # samples
    need_pool = any(m in wanted for m in ("fid", "precision", "recall"))
    parts = tuple(
        p for p, need in (("pool", need_pool), ("spatial", "sfid" in wanted), ("logits", "is" in wanted)) if need
    )
    sf = extract_features(
        smp, extractor, batch_size=batch_size, resolution=smp_res, parts=parts, progress=progress, label="samples"
    )

    # reference: stored statistics where allowed, else computed from its images
    stored = refset.stats if (refset.stats and use_reference_stats and extractor.accepts_adm_statistics) else None
    if refset.stats and not stored:
        why = (
            "use_reference_stats is off"
            if not use_reference_stats
            else f"they are Inception statistics, not {extractor.name} ones"
        )
        notes.append(f"the reference's stored mu/sigma are not used ({why}); statistics computed from its images")
    need_images = (
        "precision" in wanted
        or "recall" in wanted
        or ("fid" in wanted and not (stored and "mu" in stored))
        or ("sfid" in wanted and sf.get("spatial") is not None and not (stored and "mu_s" in stored))
    )
    ra: dict[str, np.ndarray] = {}
    if need_images:
        ra = _reference_arrays(
            refset, extractor, resolution=ref_res, batch_size=batch_size, cache=cache, progress=progress, notes=notes
        )
    ref_stats_source = {}

    values: dict[str, float | None] = {}
    details: dict[str, Any] = {}
    if "fid" in wanted:
        pool_stats = feature_statistics(sf["pool"])
        if stored and "mu" in stored:
            values[names["fid"]] = _fd(pool_stats, stored["mu"], stored["sigma"], names["fid"])
            ref_stats_source["pool"] = "stored in the reference file"
        else:
            values[names["fid"]] = _fd(pool_stats, ra["mu"], ra["sigma"], names["fid"])
            ref_stats_source["pool"] = "computed from the reference images"
        if sf["pool"].shape[0] <= sf["pool"].shape[1]:
            notes.append(
                f"{names['fid']}: {sf['pool'].shape[0]} samples for {sf['pool'].shape[1]}-d features; "
                "the covariance is rank-deficient and the value is biased upwards"
            )
    if "sfid" in wanted:
        if sf.get("spatial") is None:
            values[names["sfid"]] = None
            notes.append(
                f"{names['sfid']} not computed: {extractor.spatial_note or 'the feature extractor has no spatial features'}"
            )
        else:
            sp_stats = feature_statistics(sf["spatial"])
            if sf["spatial"].shape[0] <= sf["spatial"].shape[1]:
                notes.append(
                    f"{names['sfid']}: {sf['spatial'].shape[0]} samples for {sf['spatial'].shape[1]}-d "
                    "features; the covariance is rank-deficient and the value is biased upwards"
                )
            if stored and "mu_s" in stored:
                values[names["sfid"]] = _fd(sp_stats, stored["mu_s"], stored["sigma_s"], names["sfid"])
                ref_stats_source["spatial"] = "stored in the reference file"
            elif "mu_s" in ra:
                values[names["sfid"]] = _fd(sp_stats, ra["mu_s"], ra["sigma_s"], names["sfid"])
                ref_stats_source["spatial"] = "computed from the reference images"
            else:
                values[names["sfid"]] = None
                notes.append(f"{names['sfid']} not computed: no spatial features for the reference")
    if "is" in wanted:
        if sf.get("logits") is None:
            values[names["is"]] = None
            notes.append(f"{names['is']} not computed: the feature extractor gives no logits")
        else:
            mean, std = inception_score(sf["logits"], split_size=is_split_size, splits=is_splits)
            values[names["is"]] = mean
            n = sf["logits"].shape[0]
            details[f"{names['is']}_std"] = std
            details[f"{names['is']}_splits"] = int(is_splits) if is_splits else math.ceil(n / is_split_size)
    if "precision" in wanted or "recall" in wanted:
        n_ref, n_smp = ra["pool"].shape[0], sf["pool"].shape[0]
        if min(n_ref, n_smp) <= k:
            raise EvaluationError(
                f"precision/recall with k={k} need more than {k} images per set (samples: {n_smp}, reference: {n_ref})"
            )
        pr = precision_recall(ra["pool"], sf["pool"], k=k, row_chunk=chunk_size, col_chunk=chunk_size, device=device)
        for m in ("precision", "recall"):
            if m in wanted:
                values[names[m]] = pr[m]

    return {
        "metrics": values,
        "samples": {
            "path": smp.path,
            "kind": smp.kind,
            "num_images": smp.num_images,
            "stored_size": None if smp.size is None else list(smp.size),
            "resolution": smp_res,
        },
        "reference": {
            "path": refset.path,
            "kind": refset.kind,
            "num_images": refset.num_images,
            "stored_size": None if refset.size is None else list(refset.size),
            "resolution": ref_res,
            "statistics": ref_stats_source or None,
            "images_used": bool(need_images),
        },
        "features": extractor.describe(),
        "settings": {
            "metrics": list(wanted),
            "k": k,
            "is_split_size": None if is_splits else is_split_size,
            "is_splits": is_splits,
            "batch_size": batch_size,
            "chunk_size": chunk_size,
        },
        "details": details,
        "notes": notes,
    }


def format_results(result: dict[str, Any]) -> str:
    """A small text table of :func:`evaluate`'s result."""
    rows = [(name, "n/a" if v is None else f"{v:.4f}") for name, v in result["metrics"].items()]
    width = max([len(r[0]) for r in rows] + [6])
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 10}"]
    lines += [f"{n:<{width}}  {v}" for n, v in rows]
    s, r = result["samples"], result["reference"]
    lines.append(
        f"samples: {s['num_images']} from {s['path']}; reference: {r['num_images']} from {r['path']} "
        f"({r['kind']}); features: {result['features'].get('name')}"
    )
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)
