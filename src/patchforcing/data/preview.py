"""Eyeballing helpers: real examples of each class of any data set, as a batch or a PNG grid."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import Dataset

from .convert import save_image_grid

__all__ = ["class_examples", "save_class_grid"]


def class_examples(
    dataset: Dataset, per_class: int = 8, num_classes: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``per_class`` items of each class, class-major.

    Uses ``dataset.labels`` (``(N,)`` ints) when present, else reads items in order until every
    class has enough. Classes with fewer items contribute what they have.

    Args:
        dataset: yields ``(image (C, H, W), label)``; ``num_classes`` defaults to ``dataset.num_classes``.
    Returns:
        images ``(M, C, H, W)`` and labels int64 ``(M,)``, ``M <= num_classes * per_class``.
    """
    k = int(num_classes if num_classes is not None else getattr(dataset, "num_classes", 1))
    labels = getattr(dataset, "labels", None)
    chosen: list[list[int]] = [[] for _ in range(k)]
    if labels is not None:
        labels = np.asarray(labels)
        for c in range(k):
            chosen[c] = np.flatnonzero(labels == c)[:per_class].tolist()
    else:
        for i in range(len(dataset)):  # type: ignore[arg-type]
            c = int(dataset[i][1])
            if 0 <= c < k and len(chosen[c]) < per_class:
                chosen[c].append(i)
            if all(len(v) >= per_class for v in chosen):
                break
    order = [i for c in range(k) for i in chosen[c]]
    if not order:
        raise ValueError("class_examples: the data set has no items of the requested classes")
    items = [dataset[i] for i in order]
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items], dtype=torch.int64)


def save_class_grid(
    dataset: Dataset,
    path: str | os.PathLike,
    per_class: int = 8,
    num_classes: int | None = None,
    scale: int = 1,
) -> torch.Tensor:
    """Write :func:`class_examples` as a PNG, one class per row (``per_class`` columns).

    Returns:
        the images written, ``(M, C, H, W)`` in ``[-1, 1]``.
    """
    x, _ = class_examples(dataset, per_class=per_class, num_classes=num_classes)
    save_image_grid(x, path, nrow=per_class, scale=scale)
    return x
