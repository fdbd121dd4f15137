"""Category accuracy of text-to-image samples: does an image show the category its prompt names?

The offline measure of prompt following (docs: the T2I recipe). Generate one image per prompt of
a set of held-out captions whose category is known (e.g. the emoji set's 9 categories), classify
the images with a classifier trained on the real images by ``patchforcing train-classifier``, and
count the images whose predicted category is their prompt's::

    accuracy = (1 / N) * sum_i [ pred_i == cat_i ]

Chance level (:attr:`CategoryAccuracy.chance`): the accuracy expected if the images ignored their
prompts, i.e. the mean accuracy over random re-assignments of the prompts to the images (the null
mean of a permutation test)::

    chance = sum_c p_c * q_c        p_c: share of prompts of category c, q_c: share of images predicted c

For a category-balanced prompt set (``p_c = 1 / K`` for all ``K`` categories) this is exactly
``1 / K`` whatever the generator draws; for an unbalanced set it weights by the prompt frequencies
(a generator that always draws the most frequent category scores ``max_c p_c``, not ``1 / K``).
:attr:`CategoryAccuracy.chance_uniform` is ``1 / K`` for reference.

The 95 % confidence interval of the accuracy is the Wilson score interval of a binomial proportion
(``k`` successes of ``n``), which stays inside [0, 1] and keeps its coverage for small ``n`` and
accuracies near 0 or 1.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .clip_score import as_uint8_images
from .features import ClassifierFeatures
from .reference import EvaluationError, open_images

__all__ = [
    "CategoryAccuracy",
    "wilson_interval",
    "category_accuracy_from_predictions",
    "predict_categories",
    "category_accuracy",
]

#: two-sided 95 % normal quantile
Z95 = 1.959963984540054


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``k / n`` (default: 95 %)::

        centre = (p + z^2 / 2n) / (1 + z^2 / n)
        half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2)

    Raises:
        EvaluationError: ``n < 1`` or ``k`` outside ``0..n``.
    """
    if n < 1 or not 0 <= k <= n:
        raise EvaluationError(f"a binomial interval needs 0 <= k <= n and n >= 1, got k={k}, n={n}")
    p, z2 = k / n, z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # (k = 0 and k = n give exactly 0 and 1 in exact arithmetic)
    return (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))


@dataclass
class CategoryAccuracy:
    """The result of :func:`category_accuracy`.

    Attributes:
        accuracy: share of images whose predicted category is their prompt's.
        correct, n: the counts behind it.
        num_categories: ``K``, the classifier's number of classes.
        chance: ``sum_c p_c q_c`` (module docstring): ``1 / K`` exactly for balanced prompts.
        chance_uniform: ``1 / K``.
        balanced: every one of the ``K`` categories has the same number of prompts.
        ci95: Wilson 95 % interval of ``accuracy``.
        per_category: ``{category: {"name", "n", "correct", "accuracy"}}`` over the categories
            that have prompts.
        predicted: ``(N,)`` the predicted category of every image.
    """

    accuracy: float
    correct: int
    n: int
    num_categories: int
    chance: float
    chance_uniform: float
    balanced: bool
    ci95: tuple[float, float]
    per_category: dict[int, dict[str, Any]] = field(default_factory=dict)
    predicted: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (``predicted`` as a list)."""
        d = asdict(self)
        d["ci95"] = list(self.ci95)
        d["predicted"] = self.predicted.tolist()
        d["per_category"] = {str(k): v for k, v in self.per_category.items()}
        d["chance_definition"] = "sum_c p_c q_c (prompt share x predicted share; 1/K for balanced prompts)"
        return d


def _category_ids(categories: Sequence[Any] | np.ndarray | Tensor, k: int, names: list[str] | None) -> np.ndarray:
    """``(N,)`` int64 category ids from ints in ``0..k-1`` or names in ``names``."""
    if isinstance(categories, Tensor):
        categories = categories.cpu().numpy()
    cats = np.asarray(list(categories) if not isinstance(categories, np.ndarray) else categories)
    if cats.ndim != 1:
        raise EvaluationError(f"categories must be one per image (1-D), got shape {cats.shape}")
    if cats.dtype.kind in "US":
        if not names:
            raise EvaluationError("categories given by name, but the classifier stores no class names: give indices")
        index = {n: i for i, n in enumerate(names)}
        unknown = sorted({str(c) for c in cats.tolist() if str(c) not in index})
        if unknown:
            raise EvaluationError(f"unknown categories {unknown[:5]}; the classifier's classes are {names}")
        return np.array([index[str(c)] for c in cats.tolist()], dtype=np.int64)
    if cats.dtype.kind not in "iu":
        raise EvaluationError(f"categories must be integer indices or class names, got {cats.dtype}")
    cats = cats.astype(np.int64)
    bad = cats[(cats < 0) | (cats >= k)]
    if bad.size:
        raise EvaluationError(f"category {int(bad[0])} is outside the classifier's 0..{k - 1}")
    return cats


def category_accuracy_from_predictions(
    predicted: Sequence[int] | np.ndarray | Tensor,
    categories: Sequence[Any] | np.ndarray | Tensor,
    num_categories: int,
    names: list[str] | None = None,
) -> CategoryAccuracy:
    """The statistics of :class:`CategoryAccuracy` from predicted and prompt categories.

    Args:
        predicted: ``(N,)`` predicted category ids in ``0..num_categories-1``.
        categories: ``(N,)`` the prompts' categories: ids, or names in ``names``.
        num_categories: ``K``.
        names: the category names (index = id), for names in ``categories`` and the report.
    """
    k = int(num_categories)
    if k < 2:
        raise EvaluationError(f"need at least 2 categories, got {k}")
    pred = _category_ids(predicted, k, None)
    cats = _category_ids(categories, k, names)
    n = len(cats)
    if len(pred) != n:
        raise EvaluationError(f"{len(pred)} predictions but {n} prompt categories: one per image")
    if n == 0:
        raise EvaluationError("no images to score")
    hit = pred == cats
    correct = int(hit.sum())
    p = np.bincount(cats, minlength=k) / n
    q = np.bincount(pred, minlength=k) / n
    counts = np.bincount(cats, minlength=k)
    per = {
        int(c): {
            "name": names[c] if names and c < len(names) else None,
            "n": int(counts[c]),
            "correct": int(hit[cats == c].sum()),
            "accuracy": float(hit[cats == c].mean()),
        }
        for c in range(k)
        if counts[c] > 0
    }
    return CategoryAccuracy(
        accuracy=correct / n,
        correct=correct,
        n=n,
        num_categories=k,
        chance=float((p * q).sum()),
        chance_uniform=1.0 / k,
        balanced=bool((counts == counts[0]).all()),
        ci95=wilson_interval(correct, n),
        per_category=per,
        predicted=pred,
    )


def _classifier(classifier: str | os.PathLike | ClassifierFeatures, device: Any) -> ClassifierFeatures:
    return classifier if isinstance(classifier, ClassifierFeatures) else ClassifierFeatures(classifier, device=device)


@torch.no_grad()
def predict_categories(
    samples: Any,
    classifier: str | os.PathLike | ClassifierFeatures,
    *,
    batch_size: int = 256,
    device: Any = "cpu",
) -> np.ndarray:
    """``(N,)`` int64: the classifier's category (argmax of its logits) of every image.

    Args:
        samples: a samples ``.npz`` / ``.npy`` / image folder / :class:`ImageSet`, a ``uint8
            (N, H, W, 3)`` array or a float ``(N, 3, H, W)`` tensor in [-1, 1].
        classifier: a ``patchforcing train-classifier`` checkpoint (or its loaded features);
            images are resized to its resolution as for ``FD_classifier``.
    """
    if int(batch_size) < 1:
        raise EvaluationError(f"batch size must be >= 1, got {batch_size}")
    clf = _classifier(classifier, device)
    if isinstance(samples, (Tensor, np.ndarray)):
        a = as_uint8_images(samples)
        blocks: Any = (a[s : s + batch_size] for s in range(0, len(a), batch_size))
    else:
        smp = open_images(samples, role="samples")
        blocks = smp.batches(batch_size, None if smp.kind != "folder" else clf.resolution)
    out = [clf(block)["logits"].argmax(1).numpy() for block in blocks]
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)


def category_accuracy(
    samples: Any,
    categories: Sequence[Any] | np.ndarray | Tensor,
    classifier: str | os.PathLike | ClassifierFeatures,
    *,
    batch_size: int = 256,
    device: Any = "cpu",
) -> CategoryAccuracy:
    """Category accuracy of ``samples`` (image ``i`` generated for a prompt of category
    ``categories[i]``) under ``classifier``; see the module docstring for the definitions.

    Args:
        samples: as :func:`predict_categories`.
        categories: ``(N,)`` category ids, or class names stored in the classifier checkpoint.
        classifier: a ``patchforcing train-classifier`` checkpoint trained on the real images.

    Raises:
        EvaluationError: counts that do not match, unknown categories, unreadable inputs.
    """
    clf = _classifier(classifier, device)
    names = clf.info.get("class_names")
    predicted = predict_categories(samples, clf, batch_size=batch_size, device=device)
    return category_accuracy_from_predictions(predicted, categories, clf.model.config.num_classes, names)
