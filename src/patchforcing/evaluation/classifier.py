"""A small CNN classifier: a feature space for data sets without Inception weights.

For small images (e.g. 16-64 px) and offline machines, ``patchforcing train-classifier`` trains
:class:`SmallClassifier` on a data set and ``patchforcing eval --features classifier:CKPT`` then
computes the same statistics as FID / sFID / IS / precision / recall in *its* feature space. Such
numbers are reported as ``FD_classifier``, ``sFD_classifier``, ``IS_classifier``, ... : they are
comparable between runs that use the same classifier checkpoint only, never with published FIDs.

Architecture: 4 conv blocks (3x3 conv, GroupNorm, SiLU; the last three halve the resolution),
global average pooling (the ``pool`` features, like Inception's pool3), a linear head (the
``logits``). The ``spatial`` features are the first ``spatial_channels`` channels of the third
block's output, flattened in ``(H, W, C)`` order (as ADM flattens Inception's mixed_6/conv).

Checkpoints are plain ``torch.save`` dicts (tensors, numbers, strings, lists) that load with
``torch.load(weights_only=True)``::

    {"format": "patchforcing-classifier", "config": {...}, "state_dict": {...},
     "class_names": [...] | None, "accuracy": float, "train": {...}}
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoints import CheckpointError, load_state_dict_strict, safe_torch_load
from ..utils.io import torch_save_atomic
from .reference import EvaluationError

__all__ = [
    "CLASSIFIER_FORMAT",
    "ClassifierConfig",
    "SmallClassifier",
    "TrainClassifierResult",
    "train_classifier",
    "save_classifier",
    "load_classifier",
]

CLASSIFIER_FORMAT = "patchforcing-classifier"


@dataclass
class ClassifierConfig:
    """Shape of a :class:`SmallClassifier`.

    ``resolution``: input side the classifier was trained at (inputs of another size are
    resized before feature extraction); ``width``: channels of the first block (then 2x, 4x, 4x);
    ``spatial_channels``: channels of the third block kept for the spatial features.
    """

    num_classes: int
    resolution: int = 32
    in_channels: int = 3
    width: int = 32
    groups: int = 8
    spatial_channels: int = 7

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClassifierConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown classifier config keys {unknown}; known: {sorted(known)}")
        return cls(**{k: (int(v) if v is not None else v) for k, v in d.items()})

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm = nn.GroupNorm(math.gcd(groups, cout), cout)

    def forward(self, x: Tensor) -> Tensor:
        return F.silu(self.norm(self.conv(x)))


class SmallClassifier(nn.Module):
    """4 conv blocks + global average pool + linear head.

    ``forward(x)`` takes float images ``(B, C, R, R)`` in ``[-1, 1]`` and returns the logits;
    :meth:`features` returns ``{"pool": (B, 4w), "spatial": (B, spatial_channels * (R/4)^2),
    "logits": (B, K)}``.
    """

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        c = config
        if c.resolution < 8 or c.num_classes < 2:
            raise ValueError(f"need resolution >= 8 and num_classes >= 2, got {c.resolution}, {c.num_classes}")
        w = c.width
        if c.spatial_channels < 1 or c.spatial_channels > 4 * w:
            raise ValueError(f"spatial_channels must be in 1..{4 * w}, got {c.spatial_channels}")
        self.config = c
        self.blocks = nn.ModuleList(
            [
                _Block(c.in_channels, w, 1, c.groups),
                _Block(w, 2 * w, 2, c.groups),
                _Block(2 * w, 4 * w, 2, c.groups),
                _Block(4 * w, 4 * w, 2, c.groups),
            ]
        )
        self.head = nn.Linear(4 * w, c.num_classes)

    def features(self, x: Tensor) -> dict[str, Tensor]:
        spatial = None
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i == 2:
                s = x[:, : self.config.spatial_channels]
                spatial = s.permute(0, 2, 3, 1).reshape(s.shape[0], -1)
        pool = x.mean(dim=(2, 3))
        return {"pool": pool, "spatial": spatial, "logits": self.head(pool)}

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)["logits"]


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def save_classifier(
    model: SmallClassifier,
    path: str | os.PathLike,
    *,
    class_names: list[str] | None = None,
    accuracy: float | None = None,
    train_info: Mapping[str, Any] | None = None,
) -> Path:
    """Write a ``weights_only``-loadable classifier checkpoint atomically."""
    obj = {
        "format": CLASSIFIER_FORMAT,
        "config": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "class_names": None if class_names is None else [str(n) for n in class_names],
        "accuracy": None if accuracy is None else float(accuracy),
        "train": dict(train_info or {}),
    }
    return torch_save_atomic(obj, path)


def load_classifier(path: str | os.PathLike, map_location: Any = "cpu") -> tuple[SmallClassifier, dict[str, Any]]:
    """Load a checkpoint written by :func:`save_classifier`; returns ``(model in eval mode, info)``
    where ``info`` holds ``config``, ``class_names``, ``accuracy`` and ``train``.

    Raises:
        CheckpointError: missing/unreadable file, or not a classifier checkpoint.
    """
    obj = safe_torch_load(path, map_location)
    if not isinstance(obj, Mapping) or obj.get("format") != CLASSIFIER_FORMAT:
        keys = sorted(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(
            f"{path} is not a classifier checkpoint (expected format {CLASSIFIER_FORMAT!r} as written by "
            f"`patchforcing train-classifier`; found {keys})"
        )
    try:
        config = ClassifierConfig.from_dict(obj["config"])
        model = SmallClassifier(config)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad classifier config: {e}") from None
    load_state_dict_strict(model, obj["state_dict"], str(path))
    info = {k: obj.get(k) for k in ("config", "class_names", "accuracy", "train")}
    return model.eval(), info


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@dataclass
class TrainClassifierResult:
    path: Path
    accuracy: float
    train_accuracy: float
    steps: int
    num_train: int
    num_val: int
    seconds: float


def _get_batch(dataset: Any, indices: list[int]) -> tuple[Tensor, Tensor]:
    if hasattr(dataset, "batch"):  # SyntheticShapes: vectorised rendering
        return dataset.batch(indices)
    items = [dataset[i] for i in indices]
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items], dtype=torch.long)


@torch.no_grad()
def _accuracy(model: nn.Module, dataset: Any, indices: list[int], batch_size: int, device: Any) -> float:
    model.eval()
    correct = 0
    for s in range(0, len(indices), batch_size):
        x, y = _get_batch(dataset, indices[s : s + batch_size])
        correct += int((model(x.to(device)).argmax(1).cpu() == y).sum())
    return correct / max(1, len(indices))


def train_classifier(
    dataset: Any,
    out: str | os.PathLike,
    *,
    epochs: int = 5,
    batch_size: int = 128,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    width: int = 32,
    val_fraction: float = 0.1,
    max_steps: int | None = None,
    seed: int = 0,
    device: Any = "cpu",
    data_spec: Mapping[str, Any] | None = None,
    log: Callable[[str], None] | None = print,
) -> TrainClassifierResult:
    """Train a :class:`SmallClassifier` on ``dataset`` and save it to ``out``.

    Args:
        dataset: a data set of ``(image float (3, R, R) in [-1, 1], label)`` with ``num_classes``
            and ``resolution`` (any of :mod:`patchforcing.data`).
        out: checkpoint path (written atomically).
        epochs: passes over the training split (``max_steps`` stops earlier).
        val_fraction: share of the items held out (seeded random split) to report accuracy on.
        data_spec: the data set's spec, stored in the checkpoint for reference.

    Returns:
        :class:`TrainClassifierResult` (held-out accuracy in ``accuracy``).
    """
    t0 = time.time()
    if int(epochs) < 1 or int(batch_size) < 1 or (max_steps is not None and int(max_steps) < 1):
        raise EvaluationError(
            f"epochs, batch_size and max_steps must be >= 1 (got {epochs}, {batch_size}, {max_steps})"
        )
    n = len(dataset)
    num_classes = int(dataset.num_classes)
    resolution = int(dataset.resolution)
    if num_classes < 2:
        raise EvaluationError(f"the data set has {num_classes} class(es); a classifier needs at least 2")
    n_val = int(round(n * float(val_fraction)))
    if not 0 <= val_fraction < 1 or n - n_val < 2:
        raise EvaluationError(f"val_fraction={val_fraction} leaves too few of the {n} items to train on")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g).tolist()
    val_idx, train_idx = sorted(perm[:n_val]), perm[n_val:]

    torch.manual_seed(seed)
    config = ClassifierConfig(num_classes=num_classes, resolution=resolution, width=width)
    try:
        model = SmallClassifier(config).to(device)
    except ValueError as e:
        raise EvaluationError(str(e)) from None
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = max(1, math.ceil(len(train_idx) / batch_size))
    total = epochs * steps_per_epoch if max_steps is None else min(int(max_steps), epochs * steps_per_epoch)
    total = max(1, total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))

    step, correct, seen = 0, 0, 0
    for epoch in range(epochs):
        if step >= total:
            break
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        order = torch.randperm(len(train_idx), generator=g).tolist()
        model.train()
        correct, seen, loss_sum = 0, 0, 0.0
        for s in range(0, len(order), batch_size):
            if step >= total:
                break
            x, y = _get_batch(dataset, [train_idx[i] for i in order[s : s + batch_size]])
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            loss_sum += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
        if log is not None and seen:
            log(
                f"epoch {epoch + 1}/{epochs}: step {step}/{total}, loss {loss_sum / seen:.4f}, "
                f"train accuracy {correct / seen:.3f}"
            )
    train_acc = correct / max(1, seen)
    acc = _accuracy(model, dataset, val_idx, 256, device) if val_idx else float("nan")
    model = model.cpu().eval()
    info = {
        "data": dict(data_spec or {}),
        "epochs": int(epochs),
        "steps": int(step),
        "batch_size": int(batch_size),
        "lr": float(lr),
        "seed": int(seed),
        "num_train": len(train_idx),
        "num_val": len(val_idx),
    }
    names = getattr(dataset, "class_names", None)
    path = save_classifier(
        model,
        out,
        class_names=list(names) if names is not None else None,
        accuracy=None if math.isnan(acc) else acc,
        train_info=info,
    )
    return TrainClassifierResult(
        path=path,
        accuracy=acc,
        train_accuracy=train_acc,
        steps=step,
        num_train=len(train_idx),
        num_val=len(val_idx),
        seconds=time.time() - t0,
    )
