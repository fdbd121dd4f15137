"""The paper's three findings about the uncertainty head, measured on held-out data.

``analyze(model, data, out_dir)`` runs a PFT on held-out items at a list of times ``t`` and
measures (method.md section 5):

(a) **Uncertainty vs error.** Every patch of every image at the same ``t`` (one fixed noise
    draw per image). Per patch: the *predicted uncertainty* ``mean over the p x p cell of
    exp(logvar)`` (the variance the samplers threshold, :func:`patch_uncertainty`) and the
    *actual error* ``mean over channels and the p x p cell of (v - u)^2``
    (:func:`patch_squared_error`). Pearson R between the two over all patches of all images,
    per ``t`` (also Spearman's rank correlation and Pearson R of the logs). The paper reports
    R = 0.52 at t = 0.6 and R = 0.11 at t = 0.2 on ImageNet 256.
(b) **Clean context.** A fixed random share of the patches of each image (the *context*,
    :func:`context_mask`) is moved closer to the data, to ``t_ctx = t + move * (1 - t)``
    (default ``move = 0.5``: half way) or to a fixed ``max(t, context_t)``
    (:func:`context_time`); the other patches stay at ``t`` with the same noise. The
    flow-matching loss and the mean predicted uncertainty are measured **on the non-context
    patches only**, with and without context ("without" = every patch at ``t``, the pass of (a)).
    The paper: more clean context lowers both.
(c) **Uncertainty histogram** of the non-context patches with and without context, log-spaced
    bins, pooled over all ``t`` (and per ``t`` in the JSON).

Writes ``analysis.json`` (every number, the settings and the paper's reference values),
``correlation.png`` (R vs t), ``scatter_t0.20.png`` ... (uncertainty vs error, log-log),
``context.png`` (loss and uncertainty vs t, with and without context) and
``uncertainty_hist.png``. Deterministic for a given ``seed``: noise and context patches depend
only on ``(seed, item index)``, never on the batch size.

Data (:func:`resolve_data`): ``synthetic`` (procedural shapes of a data seed no preset trains
on), a YAML config / preset (its ``data`` section; the trainer's held-out ``val_size`` split), an
image folder, an ``.npz`` of images, or a latent store made by ``patchforcing encode``; in
Python also a data set or a tensor. Latent models take latent data directly, or images encoded
by the model's autoencoder (posterior mean). Not supported: models without an uncertainty head
or without per-patch times (SiT).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .data.augment import item_hash
from .flow.path import interpolate, pixel_to_patch

__all__ = [
    "DEFAULT_T",
    "PAPER_REFERENCE",
    "analyze",
    "context_mask",
    "context_time",
    "format_table",
    "patch_squared_error",
    "patch_uncertainty",
    "pearson_r",
    "resolve_data",
    "spearman_r",
]

DEFAULT_T: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

#: What the paper reports (ImageNet 256; method.md section 5).
PAPER_REFERENCE: dict[str, Any] = {
    "source": "Denoising, Fast and Slow (CVPR 2026, arXiv 2604.19141), findings on ImageNet 256",
    "pearson_r": {"0.2": 0.11, "0.6": 0.52},
    "context": "more clean context lowers both the loss and the predicted uncertainty",
}

#: Data seed of ``DATA = synthetic``: procedural items no preset trains on (they use seed 0).
SYNTHETIC_HELD_OUT_SEED = 9973

_NOISE_SALT = 0x616E616C79  # "analy"
_MASK_SALT = 0x636F6E7478  # "contx"

_UNCERTAINTY_DEF = "mean over the p x p pixels of the patch of exp(logvar) (variance, not log-variance)"
_ERROR_DEF = "mean over channels and the p x p pixels of the patch of (v - u)^2, u = x1 - x0"


# --------------------------------------------------------------------------------------------
# Statistics and per-patch quantities
# --------------------------------------------------------------------------------------------


def pearson_r(a: Any, b: Any) -> float:
    """Pearson correlation of two equally long arrays (float64; NaN when one is constant)."""
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


def _ranks(a: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties get their average rank."""
    order = np.argsort(a, kind="mergesort")
    s = a[order]
    ranks = np.empty(a.size, dtype=np.float64)
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    ends = np.r_[starts[1:], a.size]
    avg = (starts + ends + 1) / 2.0  # average of 1-based ranks start+1 .. end
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def spearman_r(a: Any, b: Any) -> float:
    """Spearman's rank correlation (Pearson R of the ranks, ties averaged)."""
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"spearman_r: sizes differ ({x.size} vs {y.size})")
    return pearson_r(_ranks(x), _ranks(y))


def patch_uncertainty(logvar: Tensor, patch_size: int) -> Tensor:
    """``(B, 1, H, W)`` log-variance -> ``(B, N)`` float32: ``exp(logvar)`` averaged per patch."""
    return pixel_to_patch(logvar.float().clamp(max=80.0).exp(), patch_size)


def patch_squared_error(v: Tensor, u: Tensor, patch_size: int) -> Tensor:
    """``(B, N)``: ``(v - u)^2`` averaged over the channels and the pixels of each patch."""
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
        g = torch.Generator().manual_seed(item_hash(_MASK_SALT, int(seed), int(i)))
        out[r, torch.randperm(num_patches, generator=g)[:k]] = True
    return out


def _noise(seed: int, indices: Sequence[int], shape: Sequence[int]) -> Tensor:
    out = torch.empty(len(indices), *shape)
    for r, i in enumerate(indices):
        g = torch.Generator().manual_seed(item_hash(_NOISE_SALT, int(seed), int(i)))
        out[r] = torch.randn(*shape, generator=g)
    return out


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


class _TensorData(torch.utils.data.Dataset):
    def __init__(self, x: Tensor, y: Tensor | None):
        if x.dim() != 4:
            raise ValueError(f"data tensor must be (B, C, H, W), got {tuple(x.shape)}")
        if y is not None and y.shape != (x.shape[0],):
            raise ValueError(f"labels must be ({x.shape[0]},), got {tuple(y.shape)}")
        self.x, self.y = x, y

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int):
        return self.x[i], (-1 if self.y is None else int(self.y[i]))


def _get_autoencoder(autoencoder: Any) -> Any:
    """An autoencoder object, or a zero-argument loader of one (called here)."""
    if autoencoder is None or hasattr(autoencoder, "spec"):
        return autoencoder
    return autoencoder() if callable(autoencoder) else autoencoder


def _is_pixel_model(model: nn.Module, autoencoder: Any) -> bool:
    """Pixel space: an identity autoencoder, or none given and a 3-channel model; a loader
    (callable) means a latent model whose VAE is loaded only if images must be encoded."""
    if autoencoder is not None and hasattr(autoencoder, "spec"):
        return getattr(autoencoder.spec, "kind", "identity") == "identity"
    return autoencoder is None and getattr(model, "in_channels", 3) == 3


def resolve_data(data: str | os.PathLike, model: nn.Module, *, autoencoder: Any = None,
                 num_images: int | None = None) -> tuple[torch.utils.data.Dataset, dict[str, Any]]:
    """The held-out data set named by ``data`` and a description of it.

    Args:
        data: ``"synthetic"``; a YAML config or preset name (its ``data`` section, the trainer's
            held-out ``data.val_size`` split, the items it computes the validation loss on); an
            image folder; an ``.npz`` of images; a latent store directory (``index.json``).
        model: the network (its input size and channels decide the image resolution).
        autoencoder: for latent models given image data: an :class:`~patchforcing.autoencoders.Autoencoder`
            or a zero-argument callable returning one (called only when needed).
        num_images: items wanted (sizes the synthetic set).
    Returns:
        ``(dataset, info)``; ``info["held_out"]`` says in what sense the items are held out.
    """
    from .data import DataError, SyntheticShapes, build_dataset

    spec = os.fspath(data)
    size = int(model.image_size[0])
    pixel = _is_pixel_model(model, autoencoder)

    def image_resolution() -> int:
        if pixel:
            if model.in_channels != 3:
                raise ValueError(f"the model takes {model.in_channels}-channel inputs, not images; give latent data "
                                 "(a latent store or a data.kind=latents config) or its autoencoder")
            return size
        ae = _get_autoencoder(autoencoder)
        if ae is None:
            raise ValueError("this is a latent model: give latent data (a latent store or a data.kind=latents "
                             "config) or the autoencoder (--vae) to encode images")
        return size * int(ae.downsample)

    p = Path(spec).expanduser()
    if spec.lower() in ("synthetic", "shapes"):
        nc = int(model.num_classes) if 1 <= int(getattr(model, "num_classes", 0)) <= 10 else 8
        n = int(num_images or 256)
        ds = SyntheticShapes(size=image_resolution(), num_classes=nc, length=n, seed=SYNTHETIC_HELD_OUT_SEED)
        info = {"kind": "synthetic", "num_classes": nc, "data_seed": SYNTHETIC_HELD_OUT_SEED,
                "held_out": f"procedural items of data seed {SYNTHETIC_HELD_OUT_SEED} (the presets train on seed 0)"}
    elif p.is_dir() and (p / "index.json").is_file():
        from .latents import LatentDataset

        ds = LatentDataset(p, flip=False, seed=0)
        info = {"kind": "latents", "path": str(p),
                "held_out": "the whole latent store (not known to be held out; pass the training config to use "
                            "its held-out split)"}
    elif p.is_dir():
        ds = build_dataset({"kind": "folder", "path": str(p), "resolution": image_resolution(), "flip": False})
        info = {"kind": "folder", "path": str(p),
                "held_out": "the whole folder (not known to be held out; pass the training config to use its "
                            "held-out split)"}
    elif p.suffix.lower() == ".npz":
        ds = build_dataset({"kind": "npz", "path": str(p), "resolution": image_resolution(), "flip": False})
        info = {"kind": "npz", "path": str(p),
                "held_out": "the whole file (not known to be held out; pass the training config to use its "
                            "held-out split)"}
    elif p.suffix.lower() in (".yaml", ".yml") or (p.suffix == "" and "/" not in spec and os.sep not in spec):
        from .training.config import load_config
        from .training.trainer import build_data, split_train_val

        cfg = load_config(spec)
        if cfg.data.val_size <= 0:
            raise ValueError(f"{spec}: data.val_size is 0, so the config holds nothing out; pass the data itself "
                             "(folder, .npz, latent store) instead")
        _, ds = split_train_val(build_data(cfg), cfg.data.val_size)
        info = {"kind": f"config:{cfg.data.kind}", "config": spec, "path": cfg.data.path,
                "held_out": f"the config's held-out split (data.val_size = {cfg.data.val_size} items, the ones the "
                            "trainer computes the validation loss on)"}
    else:
        raise DataError(f"DATA {spec!r} is not 'synthetic', a config file or preset, an image folder, an .npz or a "
                        "latent store directory")
    info["source"] = spec
    info["num_items"] = len(ds)
    return ds, info


# --------------------------------------------------------------------------------------------
# The measurement
# --------------------------------------------------------------------------------------------


def _model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    if p is None:
        b = next(iter(model.buffers()), None) if hasattr(model, "buffers") else None
        return b.device if b is not None else torch.device("cpu")
    return p.device


def _histogram(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    v = np.clip(values[np.isfinite(values) & (values > 0)], edges[0], edges[-1])
    return np.histogram(v, bins=edges)[0].astype(np.int64)


def _r(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


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
    uncertainty histogram with and without context (see the module docs).

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
    if not getattr(model, "predict_uncertainty", False):
        raise ValueError("analyze needs a model with an uncertainty head (a PFT); this one has none (SiT?)")
    if not getattr(model, "per_patch_time", False):
        raise ValueError("analyze needs a model that takes per-patch times (a PFT)")
    ts = [float(t) for t in t_values]
    if not ts:
        raise ValueError("no t values")
    if any(not 0.0 <= t <= 1.0 for t in ts):
        raise ValueError(f"t values must lie in [0, 1], got {ts}")
    if num_images < 1 or batch_size < 1:
        raise ValueError("num_images and batch_size must be >= 1")
    t_ctx = [context_time(t, context_move, context_t) for t in ts]

    if isinstance(data, (str, os.PathLike)):
        data, info = resolve_data(data, model, autoencoder=autoencoder, num_images=num_images)
        data_info = {**info, **(data_info or {})}
    elif isinstance(data, Tensor):
        data = _TensorData(data, None)
    elif isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
        data = _TensorData(data[0], None if data[1] is None else torch.as_tensor(data[1]))
    n = min(int(num_images), len(data))
    if n < 1:
        raise ValueError("the data set is empty")

    p = int(model.patch_size)
    N = int(model.num_patches)
    C = int(model.in_channels)
    size = tuple(int(s) for s in model.image_size)
    K = int(getattr(model, "num_classes", 0))
    device = _model_device(model)
    pixel = _is_pixel_model(model, autoencoder)
    was_training = model.training
    model.eval()

    T = len(ts)
    unc0 = np.zeros((T, n, N), dtype=np.float32)
    err0 = np.zeros((T, n, N), dtype=np.float32)
    unc1 = np.zeros((T, n, N), dtype=np.float32)
    err1 = np.zeros((T, n, N), dtype=np.float32)
    ctx = context_mask(range(n), N, context_share, seed)
    ae_cache: list[Any] = []
    labels_used = False

    bar = tqdm(total=n * T, desc="analyze", unit="img·t", disable=not progress, leave=False)
    with torch.no_grad():
        for lo in range(0, n, batch_size):
            idx = list(range(lo, min(lo + batch_size, n)))
            items = [data[i] for i in idx]
            x1 = torch.stack([torch.as_tensor(it[0]).float() for it in items])
            if x1.shape[1:] != (C, *size):
                if not pixel and x1.shape[1] == 3:
                    if not ae_cache:
                        ae = _get_autoencoder(autoencoder)
                        if ae is None:
                            raise ValueError("image items for a latent model: give the autoencoder to encode them")
                        ae_cache.append(ae)
                    x1 = ae_cache[0].encode(x1, sample=False).float().cpu()
                if x1.shape[1:] != (C, *size):
                    raise ValueError(f"data items have shape {tuple(x1.shape[1:])} but the model takes "
                                     f"{(C, *size)}")
            x1 = x1.to(device)
            y = None
            if use_labels and K > 0:
                lab = torch.tensor([int(it[1]) for it in items], dtype=torch.long)
                if bool((lab >= 0).all()):
                    if bool((lab >= K).any()):
                        raise ValueError(f"data label {int(lab.max())} is outside the model's {K} classes; "
                                         "use data with matching classes or use_labels=False")
                    y = lab.to(device)
                    labels_used = True
            x0 = _noise(seed, idx, (C, *size)).to(device)
            u = x1 - x0
            m = ctx[lo : lo + len(idx)].to(device)
            for j, t in enumerate(ts):
                tt = torch.full((len(idx), N), t, device=device)
                v, lv = model(interpolate(x0, x1, tt, p), tt, y)
                unc0[j, lo : lo + len(idx)] = patch_uncertainty(lv, p).cpu().numpy()
                err0[j, lo : lo + len(idx)] = patch_squared_error(v, u, p).cpu().numpy()
                tc = torch.where(m, torch.full_like(tt, t_ctx[j]), tt)
                v, lv = model(interpolate(x0, x1, tc, p), tc, y)
                unc1[j, lo : lo + len(idx)] = patch_uncertainty(lv, p).cpu().numpy()
                err1[j, lo : lo + len(idx)] = patch_squared_error(v, u, p).cpu().numpy()
                bar.update(len(idx))
    bar.close()
    if was_training:
        model.train()

    # (a) correlation over all patches
    corr: dict[str, list] = {k: [] for k in ("pearson_r", "spearman_r", "pearson_r_log", "mean_uncertainty",
                                             "mean_squared_error", "error_over_uncertainty")}
    for j in range(T):
        a = unc0[j].astype(np.float64).ravel()
        b = err0[j].astype(np.float64).ravel()
        corr["pearson_r"].append(_r(pearson_r(a, b)))
        corr["spearman_r"].append(_r(spearman_r(a, b)))
        ok = (a > 0) & (b > 0)
        corr["pearson_r_log"].append(_r(pearson_r(np.log(a[ok]), np.log(b[ok]))) if ok.sum() > 1 else None)
        corr["mean_uncertainty"].append(float(a.mean()))
        corr["mean_squared_error"].append(float(b.mean()))
        corr["error_over_uncertainty"].append(_r(float(b.mean() / a.mean())) if a.mean() > 0 else None)

    # (b) context, on the non-context patches only
    free = ~ctx.numpy()  # (n, N)
    cx: dict[str, list] = {k: [] for k in ("loss_without", "loss_with", "uncertainty_without", "uncertainty_with",
                                           "loss_lower_share", "uncertainty_lower_share")}
    for j in range(T):
        e0, e1 = err0[j][free].astype(np.float64), err1[j][free].astype(np.float64)
        s0, s1 = unc0[j][free].astype(np.float64), unc1[j][free].astype(np.float64)
        cx["loss_without"].append(float(e0.mean()))
        cx["loss_with"].append(float(e1.mean()))
        cx["uncertainty_without"].append(float(s0.mean()))
        cx["uncertainty_with"].append(float(s1.mean()))
        cx["loss_lower_share"].append(float((e1 < e0).mean()))
        cx["uncertainty_lower_share"].append(float((s1 < s0).mean()))

    # (c) histograms of the non-context patches' uncertainty
    pooled0 = np.concatenate([unc0[j][free] for j in range(T)]).astype(np.float64)
    pooled1 = np.concatenate([unc1[j][free] for j in range(T)]).astype(np.float64)
    both = np.concatenate([pooled0, pooled1])
    pos = both[np.isfinite(both) & (both > 0)]
    lo_e, hi_e = (float(pos.min()), float(pos.max())) if pos.size else (1e-3, 1.0)
    if hi_e <= lo_e * 1.0001:
        lo_e, hi_e = lo_e / 1.5, hi_e * 1.5
    edges = np.logspace(math.log10(lo_e), math.log10(hi_e), int(hist_bins) + 1)
    hist = {
        "edges": edges.tolist(),
        "without": _histogram(pooled0, edges).tolist(),
        "with": _histogram(pooled1, edges).tolist(),
        "median_without": float(np.median(pooled0)),
        "median_with": float(np.median(pooled1)),
        "geometric_mean_without": float(np.exp(np.mean(np.log(np.maximum(pooled0, 1e-300))))),
        "geometric_mean_with": float(np.exp(np.mean(np.log(np.maximum(pooled1, 1e-300))))),
        "per_t": [{"t": ts[j], "without": _histogram(unc0[j][free].astype(np.float64), edges).tolist(),
                   "with": _histogram(unc1[j][free].astype(np.float64), edges).tolist()} for j in range(T)],
    }

    k_ctx = int(ctx[0].sum())
    rule = (f"t_ctx = max(t, {context_t})" if context_t is not None
            else f"t_ctx = t + {context_move} * (1 - t)")
    grid = (size[0] // p, size[1] // p)
    result: dict[str, Any] = {
        "settings": {
            "num_images": n,
            "t": ts,
            "seed": int(seed),
            "batch_size": int(batch_size),
            "labels": "the items' labels" if labels_used else "null class (unconditional)",
            "space": "pixels" if pixel else "latents (maps on the latent patch grid)",
            "patch_size": p,
            "patch_grid": list(grid),
            "num_patches": N,
            "input_shape": [C, *size],
            "uncertainty": _UNCERTAINTY_DEF,
            "error": _ERROR_DEF,
            "noise": "x0 ~ N(0, I) fixed per (seed, item); the same x0 for every t and both context settings",
            "context_share": float(context_share),
            "context_patches_per_image": k_ctx,
            "context_rule": rule,
            "context_t": t_ctx,
            "context_choice": "the same random patches of each item for every t, fixed per (seed, item)",
            "data": data_info or {"source": type(data).__name__, "num_items": len(data)},
            "model": _model_info(model),
        },
        "reference": PAPER_REFERENCE,
        "correlation": {"t": ts, "num_pairs": n * N, **corr},
        "context": {"t": ts, "t_context": t_ctx, "measured_on": "the non-context patches only", **cx,
                    "loss_lower_at_every_t": all(b < a for a, b in zip(cx["loss_without"], cx["loss_with"])),
                    "uncertainty_lower_at_every_t": all(b < a for a, b in zip(cx["uncertainty_without"],
                                                                              cx["uncertainty_with"]))},
        "histogram": hist,
    }
    summary = {}
    for key in PAPER_REFERENCE["pearson_r"]:
        tk = float(key)
        j = min(range(T), key=lambda q: abs(ts[q] - tk))
        if abs(ts[j] - tk) < 1e-6:
            summary[f"pearson_r_at_t{key}"] = {"measured": corr["pearson_r"][j], "paper": PAPER_REFERENCE["pearson_r"][key]}
    summary["context_lowers_loss"] = result["context"]["loss_lower_at_every_t"]
    summary["context_lowers_uncertainty"] = result["context"]["uncertainty_lower_at_every_t"]
    result["summary"] = summary

    if out_dir is not None:
        result["files"] = _write(result, Path(out_dir), unc0, err0, scatter_t)
    return result


def _model_info(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "to_dict"):
        return dict(cfg.to_dict())
    return {"class": type(model).__name__}


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def _write(result: dict[str, Any], out: Path, unc0: np.ndarray, err0: np.ndarray,
           scatter_t: Sequence[float]) -> dict[str, str]:
    from . import plots
    from .checkpoints import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    s = result["settings"]
    ts = result["correlation"]["t"]
    latent = not s["space"].startswith("pixels")
    where = "latent patches" if latent else "patches"
    grid = f"{s['patch_grid'][0]}x{s['patch_grid'][1]}"
    files: dict[str, str] = {}
    n_img = s["num_images"]

    # (a) R vs t
    corr = result["correlation"]
    nan = float("nan")
    series = [
        plots.Series(ts, [nan if v is None else v for v in corr["pearson_r"]], "Pearson R (this model)",
                     plots.COLORS[0], "o", "solid"),
        plots.Series(ts, [nan if v is None else v for v in corr["spearman_r"]], "Spearman rank correlation",
                     plots.COLORS[4], "s", "dashed"),
        plots.Series([float(k) for k in PAPER_REFERENCE["pearson_r"]], list(PAPER_REFERENCE["pearson_r"].values()),
                     "paper, ImageNet 256 (Pearson R)", plots.COLORS[3], "x", None),
    ]
    vals = [v for v in corr["pearson_r"] + corr["spearman_r"] if v is not None]
    ymin = min([0.0] + vals)
    path = out / "correlation.png"
    plots.line_chart(
        series, title="Does the predicted uncertainty track the actual error?",
        subtitle=(f"Correlation over all {grid} {where} of {n_img} held-out images, every patch at the same t.\n"
                  "Uncertainty: mean exp(logvar) of a patch. Error: mean (v - u)^2 of the patch."),
        xlabel="time t of every patch (0 = noise, 1 = data)", ylabel="correlation of uncertainty and error",
        xlim=(0.0, 1.0), ylim=(ymin - 0.05 if ymin < 0 else -0.05, 1.0), hlines=[0.0], path=path)
    files["correlation"] = path.name

    # (a) scatter plots
    picks = sorted({min(range(len(ts)), key=lambda q: abs(ts[q] - float(w))) for w in scatter_t})
    for j in picks:
        path = out / f"scatter_t{ts[j]:.2f}.png"
        r, rs = corr["pearson_r"][j], corr["spearman_r"][j]
        notes = [f"Pearson R = {r:.3f}" if r is not None else "Pearson R: undefined (constant)",
                 f"Spearman = {rs:.3f}" if rs is not None else "Spearman: undefined",
                 f"{unc0[j].size:,} patches"]
        ref = PAPER_REFERENCE["pearson_r"].get(f"{ts[j]:.1f}") if abs(ts[j] * 10 - round(ts[j] * 10)) < 1e-9 else None
        if ref is not None:
            notes.append(f"paper (ImageNet): R = {ref}")
        plots.scatter_density(
            unc0[j].ravel(), err0[j].ravel(), title=f"Predicted uncertainty vs actual error at t = {ts[j]:.2f}",
            subtitle=f"One dot per {'latent patch' if latent else 'patch'} ({n_img} images x {s['num_patches']}), log scales",
            xlabel="predicted uncertainty: mean exp(logvar) of the patch",
            ylabel="actual error: mean (v - u)^2 of the patch",
            diagonal="predicted = actual (a calibrated head)", notes=notes, path=path)
        files[f"scatter_t{ts[j]:.2f}"] = path.name

    # (b) context
    c = result["context"]
    share = f"{100 * s['context_share']:.0f}%"
    without = "no context: every patch at t"
    with_ = f"with context: {share} of the patches at t_ctx ({s['context_rule']})"
    tc_note = ", ".join(f"{a:.1f}->{b:.2f}" for a, b in zip(ts, c["t_context"]))
    left = plots.line_chart(
        [plots.Series(ts, c["loss_without"], without, plots.COLORS[0], "o", "solid"),
         plots.Series(ts, c["loss_with"], with_, plots.COLORS[1], "s", "solid")],
        title="Loss of the non-context patches",
        subtitle="flow-matching MSE, measured only on the patches that stay at t",
        xlabel="time t of the measured patches", ylabel="validation loss (MSE of v)", xlim=(0.0, 1.0),
        size=(600, 430))
    right = plots.line_chart(
        [plots.Series(ts, c["uncertainty_without"], without, plots.COLORS[0], "o", "solid"),
         plots.Series(ts, c["uncertainty_with"], with_, plots.COLORS[1], "s", "solid")],
        title="Predicted uncertainty of the non-context patches",
        subtitle=f"mean exp(logvar) per patch, log scale; t -> t_ctx: {tc_note}" if len(tc_note) < 60 else
        "mean exp(logvar) per patch, log scale",
        xlabel="time t of the measured patches", ylabel="mean predicted uncertainty", xlim=(0.0, 1.0), ylog=True,
        size=(600, 430))
    path = out / "context.png"
    plots.hstack([left, right], gap=16, path=path)
    files["context"] = path.name

    # (c) histogram
    h = result["histogram"]
    w0 = np.asarray(h["without"], dtype=np.float64)
    w1 = np.asarray(h["with"], dtype=np.float64)
    path = out / "uncertainty_hist.png"
    plots.histogram_chart(
        h["edges"], {without: 100 * w0 / max(w0.sum(), 1), with_: 100 * w1 / max(w1.sum(), 1)},
        title="Uncertainty of the non-context patches, with and without clean context",
        subtitle=f"all t pooled ({', '.join(f'{t:g}' for t in ts)}); {n_img} images; log-spaced bins",
        xlabel="predicted uncertainty: mean exp(logvar) of the patch (log scale)", ylabel="share of patches (%)",
        vlines=[(h["median_without"], f"median without: {h['median_without']:.3g}"),
                (h["median_with"], f"median with: {h['median_with']:.3g}")],
        size=(700, 460), path=path)
    files["histogram"] = path.name

    result["files"] = files
    text = json.dumps(result, indent=2) + "\n"
    atomic_write(out / "analysis.json", lambda tmp: Path(tmp).write_text(text))
    files["json"] = "analysis.json"
    return files


def format_table(result: dict[str, Any]) -> str:
    """A short text table of the numbers (for the terminal)."""
    c, x = result["correlation"], result["context"]
    lines = [f"{'t':>5} {'R':>7} {'Spearman':>9} {'loss':>10} {'loss+ctx':>10} {'unc':>10} {'unc+ctx':>10}"]
    for j, t in enumerate(c["t"]):
        r, rs = c["pearson_r"][j], c["spearman_r"][j]
        lines.append(f"{t:5.2f} {'n/a' if r is None else f'{r:.3f}':>7} {'n/a' if rs is None else f'{rs:.3f}':>9} "
                     f"{x['loss_without'][j]:10.4g} {x['loss_with'][j]:10.4g} "
                     f"{x['uncertainty_without'][j]:10.4g} {x['uncertainty_with'][j]:10.4g}")
    ref = ", ".join(f"R = {v} at t = {k}" for k, v in PAPER_REFERENCE["pearson_r"].items())
    lines.append(f"paper (ImageNet 256): {ref}; loss/unc: non-context patches, +ctx: "
                 f"{100 * result['settings']['context_share']:.0f}% of patches at {result['settings']['context_rule']}")
    return "\n".join(lines)

