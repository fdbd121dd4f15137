"""``analyze``: measure, summarise (a) correlation, (b) context, (c) histogram, and write the report."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from .data import as_dataset, is_pixel_model, resolve_data
from .measure import Measurements, context_time, measure
from .report import write_report
from .stats import finite_or_none, log_histogram, pearson_r, spearman_r

__all__ = ["DEFAULT_T", "PAPER_REFERENCE", "analyze"]

DEFAULT_T: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

#: What the paper reports (ImageNet 256; docs/method.md section 5).
PAPER_REFERENCE: dict[str, Any] = {
    "source": "Denoising, Fast and Slow (CVPR 2026, arXiv 2604.19141), findings on ImageNet 256",
    "pearson_r": {"0.2": 0.11, "0.6": 0.52},
    "context": "more clean context lowers both the loss and the predicted uncertainty",
}

_UNCERTAINTY_DEF = "mean over the p x p pixels of the patch of exp(logvar) (variance, not log-variance)"
_ERROR_DEF = "mean over channels and the p x p pixels of the patch of (v - u)^2, u = x1 - x0"


def correlation_summary(m: Measurements) -> dict[str, list]:
    """Per ``t``: Pearson / Spearman / log-Pearson R of uncertainty and error over all patches, and means."""
    out: dict[str, list] = {
        k: []
        for k in (
            "pearson_r",
            "spearman_r",
            "pearson_r_log",
            "mean_uncertainty",
            "mean_squared_error",
            "error_over_uncertainty",
        )
    }
    for a32, b32 in zip(m.unc0, m.err0):
        a, b = a32.astype(np.float64).ravel(), b32.astype(np.float64).ravel()
        ok = (a > 0) & (b > 0)
        out["pearson_r"].append(finite_or_none(pearson_r(a, b)))
        out["spearman_r"].append(finite_or_none(spearman_r(a, b)))
        out["pearson_r_log"].append(finite_or_none(pearson_r(np.log(a[ok]), np.log(b[ok]))) if ok.sum() > 1 else None)
        out["mean_uncertainty"].append(float(a.mean()))
        out["mean_squared_error"].append(float(b.mean()))
        out["error_over_uncertainty"].append(finite_or_none(float(b.mean() / a.mean())) if a.mean() > 0 else None)
    return out


def context_summary(m: Measurements) -> dict[str, list]:
    """Per ``t``: loss and mean uncertainty of the non-context patches without / with context."""
    free = ~m.ctx.numpy()
    out: dict[str, list] = {
        k: []
        for k in (
            "loss_without",
            "loss_with",
            "uncertainty_without",
            "uncertainty_with",
            "loss_lower_share",
            "uncertainty_lower_share",
        )
    }
    for j in range(len(m.unc0)):
        e0, e1 = m.err0[j][free].astype(np.float64), m.err1[j][free].astype(np.float64)
        s0, s1 = m.unc0[j][free].astype(np.float64), m.unc1[j][free].astype(np.float64)
        out["loss_without"].append(float(e0.mean()))
        out["loss_with"].append(float(e1.mean()))
        out["uncertainty_without"].append(float(s0.mean()))
        out["uncertainty_with"].append(float(s1.mean()))
        out["loss_lower_share"].append(float((e1 < e0).mean()))
        out["uncertainty_lower_share"].append(float((s1 < s0).mean()))
    return out


def histogram_summary(m: Measurements, ts: Sequence[float], bins: int) -> dict[str, Any]:
    """Log-spaced histograms of the non-context patches' uncertainty, pooled over ``t`` and per ``t``."""
    free = ~m.ctx.numpy()
    pooled0 = np.concatenate([u[free] for u in m.unc0]).astype(np.float64)
    pooled1 = np.concatenate([u[free] for u in m.unc1]).astype(np.float64)
    both = np.concatenate([pooled0, pooled1])
    pos = both[np.isfinite(both) & (both > 0)]
    lo, hi = (float(pos.min()), float(pos.max())) if pos.size else (1e-3, 1.0)
    if hi <= lo * 1.0001:
        lo, hi = lo / 1.5, hi * 1.5
    edges = np.logspace(math.log10(lo), math.log10(hi), int(bins) + 1)

    def gmean(v: np.ndarray) -> float:
        return float(np.exp(np.mean(np.log(np.maximum(v, 1e-300)))))

    return {
        "edges": edges.tolist(),
        "without": log_histogram(pooled0, edges).tolist(),
        "with": log_histogram(pooled1, edges).tolist(),
        "median_without": float(np.median(pooled0)),
        "median_with": float(np.median(pooled1)),
        "geometric_mean_without": gmean(pooled0),
        "geometric_mean_with": gmean(pooled1),
        "per_t": [
            {
                "t": t,
                "without": log_histogram(m.unc0[j][free].astype(np.float64), edges).tolist(),
                "with": log_histogram(m.unc1[j][free].astype(np.float64), edges).tolist(),
            }
            for j, t in enumerate(ts)
        ],
    }


def _model_info(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    return dict(cfg.to_dict()) if cfg is not None and hasattr(cfg, "to_dict") else {"class": type(model).__name__}


def _check(model: nn.Module, ts: list[float], num_images: int, batch_size: int) -> None:
    if not getattr(model, "predict_uncertainty", False):
        raise ValueError("analyze needs a model with an uncertainty head (a PFT); this one has none (SiT?)")
    if not getattr(model, "per_patch_time", False):
        raise ValueError("analyze needs a model that takes per-patch times (a PFT)")
    if not ts:
        raise ValueError("no t values")
    if any(not 0.0 <= t <= 1.0 for t in ts):
        raise ValueError(f"t values must lie in [0, 1], got {ts}")
    if num_images < 1 or batch_size < 1:
        raise ValueError("num_images and batch_size must be >= 1")


def analyze(
    model: nn.Module,
    data: Any,
    out_dir: str | os.PathLike | None = None,
    *,
    num_images: int = 256,
    t_values: Sequence[float] = DEFAULT_T,
    context_share: float = 0.5,
    context_move: float = 0.5,
    context_t: float | None = None,
    batch_size: int = 32,
    seed: int = 0,
    use_labels: bool = True,
    autoencoder: Any = None,
    scatter_t: Sequence[float] = (0.2, 0.6, 0.9),
    hist_bins: int = 48,
    data_info: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Measure (a) uncertainty-error correlation, (b) the effect of clean context, (c) the
    uncertainty histogram with and without context (see :mod:`patchforcing.analysis`).

    Args:
        model: a PFT (per-patch times and an uncertainty head) in eval mode, on its device.
        data: a data set of ``(x, label)`` items, a ``(B, C, H, W)`` tensor, a ``(tensor, labels)``
            pair, or a string for :func:`resolve_data`. Items are the model's inputs (images in
            ``[-1, 1]`` for pixel models, scaled latents for latent models) or images that
            ``autoencoder`` encodes (posterior mean).
        out_dir: write ``analysis.json`` and the PNGs here (``None``: compute only).
        num_images: the first ``num_images`` items of ``data`` (all when fewer).
        t_values: the times of the measurement (all patches share one ``t`` in (a)).
        context_share: share of patches moved closer to the data in (b).
        context_move, context_t: the context time, see :func:`context_time`.
        batch_size: items per forward pass (memory only; results do not depend on it).
        seed: seed of the noise and of the context patches.
        use_labels: condition on the items' labels (else the null class, unconditional).
        autoencoder: encodes image items for a latent model (an Autoencoder or a callable).
        scatter_t: draw scatter plots at the measured times nearest to these.
        hist_bins: log-spaced bins of the uncertainty histogram.
        data_info: description of the data for the JSON (from :func:`resolve_data`).
        progress: show a progress bar.
    Returns:
        The dict that is written to ``analysis.json``.
    """
    ts = [float(t) for t in t_values]
    _check(model, ts, num_images, batch_size)
    t_ctx = [context_time(t, context_move, context_t) for t in ts]
    if isinstance(data, (str, os.PathLike)):
        data, info = resolve_data(data, model, autoencoder=autoencoder, num_images=num_images)
        data_info = {**info, **(data_info or {})}
    data = as_dataset(data)
    n = min(int(num_images), len(data))
    if n < 1:
        raise ValueError("the data set is empty")
    pixel = is_pixel_model(model, autoencoder)
    m = measure(
        model,
        data,
        n,
        ts,
        t_ctx,
        context_share=context_share,
        batch_size=batch_size,
        seed=seed,
        use_labels=use_labels,
        autoencoder=autoencoder,
        pixel=pixel,
        progress=progress,
    )

    corr, cx = correlation_summary(m), context_summary(m)
    p, N = int(model.patch_size), int(model.num_patches)
    size = tuple(int(s) for s in model.image_size)
    result: dict[str, Any] = {
        "settings": {
            "num_images": n,
            "t": ts,
            "seed": int(seed),
            "batch_size": int(batch_size),
            "labels": "the items' labels" if m.labels_used else "null class (unconditional)",
            "space": "pixels" if pixel else "latents (maps on the latent patch grid)",
            "patch_size": p,
            "patch_grid": [size[0] // p, size[1] // p],
            "num_patches": N,
            "input_shape": [int(model.in_channels), *size],
            "uncertainty": _UNCERTAINTY_DEF,
            "error": _ERROR_DEF,
            "noise": "x0 ~ N(0, I) fixed per (seed, item); the same x0 for every t and both context settings",
            "context_share": float(context_share),
            "context_patches_per_image": int(m.ctx[0].sum()),
            "context_rule": f"t_ctx = max(t, {context_t})"
            if context_t is not None
            else f"t_ctx = t + {context_move} * (1 - t)",
            "context_t": t_ctx,
            "context_choice": "the same random patches of each item for every t, fixed per (seed, item)",
            "data": data_info or {"source": type(data).__name__, "num_items": len(data)},
            "model": _model_info(model),
        },
        "reference": PAPER_REFERENCE,
        "correlation": {"t": ts, "num_pairs": n * N, **corr},
        "context": {
            "t": ts,
            "t_context": t_ctx,
            "measured_on": "the non-context patches only",
            **cx,
            "loss_lower_at_every_t": all(b < a for a, b in zip(cx["loss_without"], cx["loss_with"])),
            "uncertainty_lower_at_every_t": all(
                b < a for a, b in zip(cx["uncertainty_without"], cx["uncertainty_with"])
            ),
        },
        "histogram": histogram_summary(m, ts, hist_bins),
    }
    summary: dict[str, Any] = {}
    for key, paper in PAPER_REFERENCE["pearson_r"].items():
        j = min(range(len(ts)), key=lambda q: abs(ts[q] - float(key)))
        if abs(ts[j] - float(key)) < 1e-6:
            summary[f"pearson_r_at_t{key}"] = {"measured": corr["pearson_r"][j], "paper": paper}
    summary["context_lowers_loss"] = result["context"]["loss_lower_at_every_t"]
    summary["context_lowers_uncertainty"] = result["context"]["uncertainty_lower_at_every_t"]
    result["summary"] = summary
    if out_dir is not None:
        result["files"] = write_report(result, Path(out_dir), m.unc0, m.err0, scatter_t)
    return result
