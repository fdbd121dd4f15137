"""Category accuracy of T2I samples: exact values on hand-made cases, the chance level, the
Wilson interval, and the classifier path end to end (a random SmallClassifier checkpoint)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from patchforcing.evaluation import (
    ClassifierConfig,
    EvaluationError,
    SmallClassifier,
    category_accuracy,
    category_accuracy_from_predictions,
    save_classifier,
    wilson_interval,
)
from patchforcing.evaluation.category import predict_categories
from patchforcing.utils.images import to_float


def test_balanced_case_exact_values():
    pred = [0, 0, 1, 2, 1, 0]
    cats = [0, 1, 1, 2, 2, 0]  # two prompts per category
    r = category_accuracy_from_predictions(pred, cats, 3, names=["a", "b", "c"])
    assert (r.correct, r.n, r.accuracy) == (4, 6, 4 / 6)
    assert r.balanced and r.chance == pytest.approx(1 / 3) and r.chance_uniform == pytest.approx(1 / 3)
    # Wilson 95 % for 4/6: the textbook (0.300, 0.903)
    assert r.ci95 == pytest.approx((0.29999, 0.90323), abs=1e-4)
    assert r.per_category == {
        0: {"name": "a", "n": 2, "correct": 2, "accuracy": 1.0},
        1: {"name": "b", "n": 2, "correct": 1, "accuracy": 0.5},
        2: {"name": "c", "n": 2, "correct": 1, "accuracy": 0.5},
    }
    d = r.to_dict()
    assert d["predicted"] == pred and d["ci95"] == list(r.ci95) and "per_category" in d


def test_chance_is_the_permutation_mean_and_weights_by_prompt_frequency():
    cats = np.array([0, 0, 0, 1, 2])
    pred = np.array([0, 1, 1, 1, 0])
    r = category_accuracy_from_predictions(pred, cats, 4)
    assert not r.balanced and r.accuracy == pytest.approx(2 / 5)
    # p = (3, 1, 1, 0) / 5, q = (2, 3, 0, 0) / 5
    assert r.chance == pytest.approx((3 * 2 + 1 * 3) / 25) and r.chance_uniform == 0.25
    perms = list(itertools.permutations(range(5)))
    assert r.chance == pytest.approx(np.mean([(pred == cats[list(p)]).mean() for p in perms]))
    # a generator that always draws the most frequent category scores max_c p_c, not 1/K
    always0 = category_accuracy_from_predictions(np.zeros(5, int), cats, 4)
    assert always0.accuracy == always0.chance == pytest.approx(3 / 5)


def test_wilson_interval_edges():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.27753, abs=1e-4)
    lo, hi = wilson_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(0.72247, abs=1e-4)
    lo, hi = wilson_interval(500, 1000)
    z = 1.959963984540054
    half = z * math.sqrt(0.25 / 1000 + z * z / 4e6) / (1 + z * z / 1000)
    assert (lo + hi) / 2 == pytest.approx(0.5) and (hi - lo) / 2 == pytest.approx(half, rel=1e-9)
    assert half == pytest.approx(z * math.sqrt(0.25 / 1000), rel=3e-3)  # ~ the normal interval at large n
    with pytest.raises(EvaluationError, match="0 <= k <= n"):
        wilson_interval(3, 2)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(EvaluationError, match="3 predictions but 2 prompt categories"):
        category_accuracy_from_predictions([0, 1, 1], [0, 1], 2)
    with pytest.raises(EvaluationError, match="category 5 is outside"):
        category_accuracy_from_predictions([0, 1], [0, 5], 3)
    with pytest.raises(EvaluationError, match="stores no class names"):
        category_accuracy_from_predictions([0, 1], ["a", "b"], 2)
    with pytest.raises(EvaluationError, match=r"unknown categories \['z'\]"):
        category_accuracy_from_predictions([0, 1], ["a", "z"], 2, names=["a", "b"])


def test_classifier_path_end_to_end(tmp_path):
    torch.manual_seed(0)
    clf = SmallClassifier(ClassifierConfig(num_classes=3, resolution=16, width=8)).eval()
    with torch.no_grad():  # a head that tells the random images apart
        clf.head.weight.mul_(50)
    ckpt = save_classifier(clf, tmp_path / "clf.pt", class_names=["animals", "food", "flags"])
    images = np.random.default_rng(0).integers(0, 256, (12, 16, 16, 3), dtype=np.uint8)
    with torch.no_grad():  # independent: the network on the [-1, 1] images
        want = clf(to_float(torch.from_numpy(images)).permute(0, 3, 1, 2)).argmax(1).numpy()
    assert len(set(want.tolist())) > 1
    pred = predict_categories(images, ckpt, batch_size=5)
    np.testing.assert_array_equal(pred, want)
    cats = np.array([0, 1, 2] * 4)
    r = category_accuracy(images, cats, ckpt)
    assert r.correct == int((want == cats).sum()) and r.balanced and r.chance == pytest.approx(1 / 3)
    # by name, and from an .npz of samples: the same numbers
    npz = tmp_path / "samples.npz"
    np.savez(npz, arr_0=images)
    names = np.array(["animals", "food", "flags"])[cats]
    assert category_accuracy(npz, names, ckpt, batch_size=7).to_dict() == r.to_dict()
    # float images in [-1, 1] (N, 3, H, W) classify as their uint8 quantisation
    as_float = to_float(torch.from_numpy(images)).permute(0, 3, 1, 2)
    np.testing.assert_array_equal(predict_categories(as_float, ckpt), want)
    with pytest.raises(EvaluationError, match="12 predictions but 3 prompt categories"):
        category_accuracy(images, [0, 1, 2], ckpt)
