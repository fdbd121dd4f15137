"""Evaluation suite: IS, k-NN precision/recall, reference loading, classifier features, CLI.

(Fréchet-distance identities are in test_frechet.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from patchforcing.checkpoints import safe_torch_load
from patchforcing.cli import main
from patchforcing.data import SyntheticShapes
from patchforcing.evaluation import (
    EvaluationError,
    FeatureExtractor,
    InceptionFeatures,
    build_feature_extractor,
    evaluate,
    feature_statistics,
    frechet_distance,
    inception_score,
    knn_radii,
    open_images,
    parse_metrics,
    precision_recall,
    random_inception_weights,
    within_manifold,
)

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def shapes_uint8(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    imgs = SyntheticShapes(size=size, length=n, seed=seed).render(range(n))
    return np.clip(imgs * 255 + 0.5, 0, 255).astype(np.uint8)


class PixelFeatures(FeatureExtractor):
    """A cheap deterministic stand-in for Inception: block-averaged pixels."""

    name = "pixels"
    accepts_adm_statistics = True  # lets tests exercise the ADM stored-statistics path

    def __call__(self, images):
        x = torch.as_tensor(np.array(images)).permute(0, 3, 1, 2).float() / 255
        pool = torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)  # 48-d
        spatial = torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)  # 12-d
        logits = 10 * x.mean(dim=(2, 3))  # 3 "classes"
        return {"pool": pool, "spatial": spatial, "logits": logits}


def brute_radii(f: np.ndarray, k: int) -> np.ndarray:
    d = np.sqrt(((f[:, None, :] - f[None, :, :]) ** 2).sum(-1))
    return np.sort(d, axis=1)[:, k]


# --------------------------------------------------------------------------------------------
# Inception Score
# --------------------------------------------------------------------------------------------


def test_inception_score_uniform_predictions_is_one():
    mean, std = inception_score(torch.zeros(100, 10))
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("k", [2, 5, 10])
def test_inception_score_confident_even_predictions_is_k(k):
    labels = torch.arange(20 * k) % k
    logits = 200.0 * torch.nn.functional.one_hot(labels, k).double()
    assert inception_score(logits)[0] == pytest.approx(k, rel=1e-9)
    # each split of k consecutive samples covers every class once -> K in every split
    assert inception_score(logits, split_size=k)[0] == pytest.approx(k, rel=1e-9)
    assert inception_score(logits, splits=4)[0] == pytest.approx(k, rel=1e-9)


def test_inception_score_splits_follow_adm_convention():
    # two halves: the first all class 0 (IS 1 on its own), the second spread over 4 classes (IS 4)
    labels = torch.cat([torch.zeros(8, dtype=torch.long), torch.arange(8) % 4])
    logits = 200.0 * torch.nn.functional.one_hot(labels, 4).double()
    mean, std = inception_score(logits, split_size=8)
    assert mean == pytest.approx(2.5) and std == pytest.approx(1.5)
    assert inception_score(logits, split_size=None)[0] > 1.0  # one split over everything


# --------------------------------------------------------------------------------------------
# k-NN precision / recall
# --------------------------------------------------------------------------------------------


def test_chunked_knn_radii_equal_brute_force():
    g = np.random.default_rng(0)
    f = g.normal(size=(41, 5))
    f[7] = f[3]  # a duplicate counts as a neighbour at distance 0
    for k in (1, 3, 5):
        want = brute_radii(f, k)
        got = knn_radii(torch.tensor(f), k, row_chunk=6, col_chunk=4, dtype=torch.float64).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
        whole = knn_radii(torch.tensor(f), k, dtype=torch.float64).numpy()
        np.testing.assert_allclose(whole, want, rtol=1e-10, atol=1e-10)


def test_chunked_manifold_membership_equals_brute_force():
    g = np.random.default_rng(1)
    m, p = g.normal(size=(30, 4)), g.normal(size=(23, 4)) * 1.5
    r = brute_radii(m, 3)
    d = np.sqrt(((p[:, None] - m[None]) ** 2).sum(-1))
    want = (d <= r[None]).any(1)
    got = within_manifold(p, m, r, row_chunk=5, col_chunk=7, dtype=torch.float64).numpy()
    np.testing.assert_array_equal(got, want)
    assert 0 < want.sum() < len(want)  # a non-trivial case


def test_precision_recall_identical_sets():
    f = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    assert precision_recall(f, f.clone()) == {"precision": 1.0, "recall": 1.0}


def test_precision_recall_disjoint_sets():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(100, 8, generator=g), torch.randn(120, 8, generator=g) + 100.0
    assert precision_recall(a, b, row_chunk=32, col_chunk=16) == {"precision": 0.0, "recall": 0.0}


def test_precision_recall_half_of_the_modes():
    g = torch.Generator().manual_seed(2)
    centres = torch.eye(4) * 50.0
    ref = torch.cat([c + 0.5 * torch.randn(100, 4, generator=g) for c in centres])
    # the reference points of 2 of the 4 modes: exactly precision 1, recall 1/2
    assert precision_recall(ref, ref[:200].clone(), row_chunk=128, col_chunk=150) == {"precision": 1.0, "recall": 0.5}
    # fresh draws from 2 of the 4 modes (k-NN balls miss a few tail points)
    smp = torch.cat([c + 0.5 * torch.randn(150, 4, generator=g) for c in centres[:2]])
    pr = precision_recall(ref, smp, k=3, row_chunk=128, col_chunk=150)
    assert pr["precision"] > 0.8
    assert 0.4 < pr["recall"] <= 0.5  # the 2 missing modes are never covered


# --------------------------------------------------------------------------------------------
# Reading samples and references
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_is_streamed_in_batches(tmp_path, compressed):
    imgs = shapes_uint8(23, 16)
    path = tmp_path / "s.npz"
    (np.savez_compressed if compressed else np.savez)(path, arr_0=imgs, labels=np.arange(23) % 8)
    s = open_images(path)
    assert (s.kind, s.num_images, s.size) == ("npz", 23, (16, 16))
    np.testing.assert_array_equal(s.labels, np.arange(23) % 8)
    batches = list(s.batches(5))
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
    np.testing.assert_array_equal(np.concatenate(batches), imgs)


def test_npz_images_key_grey_and_rgba(tmp_path):
    grey = np.arange(4 * 8 * 8, dtype=np.uint8).reshape(4, 8, 8)
    np.savez(tmp_path / "g.npz", images=grey)
    (b,) = open_images(tmp_path / "g.npz").batches(10)
    assert b.shape == (4, 8, 8, 3) and (b[..., 0] == grey).all() and (b[..., 2] == grey).all()
    rgba = np.zeros((2, 8, 8, 4), np.uint8)  # fully transparent -> white
    np.savez(tmp_path / "a.npz", arr_0=rgba)
    (b,) = open_images(tmp_path / "a.npz").batches(10)
    assert (b == 255).all()


def test_folder_of_any_layout_is_centre_cropped(tmp_path):
    g = np.random.default_rng(0)
    (tmp_path / "ref" / "a" / "deep").mkdir(parents=True)
    for i, (h, w) in enumerate([(40, 60), (32, 32), (50, 20)]):
        sub = "a/deep" if i == 0 else ("a" if i == 1 else "")
        Image.fromarray(g.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / "ref" / sub / f"{i}.png")
    (tmp_path / "ref" / "notes.txt").write_text("not an image")
    s = open_images(tmp_path / "ref")
    assert (s.kind, s.num_images, s.size) == ("folder", 3, None)
    (b,) = list(s.batches(8, resolution=16))
    assert b.shape == (3, 16, 16, 3) and b.dtype == np.uint8


def test_adm_reference_stored_statistics_are_used(tmp_path):
    smp, ref = shapes_uint8(40, 16, seed=1), shapes_uint8(50, 16, seed=2)
    np.savez(tmp_path / "samples.npz", arr_0=smp)
    fx = PixelFeatures()
    f_ref = fx(ref)
    mu, sigma = (t.numpy() for t in feature_statistics(f_ref["pool"]))
    mu_s, sigma_s = (t.numpy() for t in feature_statistics(f_ref["spatial"]))
    shift = np.zeros_like(mu)
    shift[0] = 3.0  # a deliberately shifted mean: adds exactly 9 to FID if the stored stats are used
    np.savez(tmp_path / "adm.npz", arr_0=ref, mu=mu + shift, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    assert open_images(tmp_path / "adm.npz").kind == "adm-reference"

    stored = evaluate(tmp_path / "samples.npz", tmp_path / "adm.npz", "fid,sfid", fx)
    recomputed = evaluate(tmp_path / "samples.npz", tmp_path / "adm.npz", "fid,sfid", fx, use_reference_stats=False)
    assert stored["reference"]["statistics"] == {
        "pool": "stored in the reference file",
        "spatial": "stored in the reference file",
    }
    assert stored["reference"]["images_used"] is False
    assert recomputed["reference"]["statistics"]["pool"] == "computed from the reference images"
    mu_f, sigma_f = feature_statistics(fx(smp)["pool"])
    want = frechet_distance(mu_f, sigma_f, mu + shift, sigma)
    assert stored["metrics"]["FD"] == pytest.approx(want, rel=1e-9)
    assert stored["metrics"]["FD"] > recomputed["metrics"]["FD"] + 5.0
    assert stored["metrics"]["sFD"] == pytest.approx(recomputed["metrics"]["sFD"], rel=1e-6)

    # an extractor in another feature space ignores the stored (Inception) statistics
    class OtherSpace(PixelFeatures):
        accepts_adm_statistics = False

    other = evaluate(tmp_path / "samples.npz", tmp_path / "adm.npz", "fid", OtherSpace())
    assert other["metrics"]["FD"] == pytest.approx(recomputed["metrics"]["FD"], rel=1e-9)
    assert any("not used" in n for n in other["notes"])


def test_evaluate_all_metrics_resizing_and_cache(tmp_path):
    smp, ref = shapes_uint8(30, 16, seed=1), shapes_uint8(36, 32, seed=2)
    np.savez(tmp_path / "samples.npz", arr_0=smp)
    np.savez(tmp_path / "ref.npz", images=ref)
    cache = tmp_path / "cache" / "ref-feats.npz"
    r1 = evaluate(tmp_path / "samples.npz", tmp_path / "ref.npz", None, PixelFeatures(), batch_size=7, cache=cache)
    assert set(r1["metrics"]) == {"FD", "sFD", "IS", "precision", "recall"}
    assert all(np.isfinite(v) for v in r1["metrics"].values())
    assert any("resized from 32 to 16" in n for n in r1["notes"]) and cache.is_file()
    r2 = evaluate(tmp_path / "samples.npz", tmp_path / "ref.npz", None, PixelFeatures(), batch_size=7, cache=cache)
    assert any("read from the cache" in n for n in r2["notes"])
    assert r2["metrics"] == r1["metrics"]
    # same images against themselves: FD 0, precision = recall = 1
    same = evaluate(tmp_path / "samples.npz", tmp_path / "samples.npz", "fid,pr", PixelFeatures())
    assert same["metrics"]["FD"] == pytest.approx(0.0, abs=1e-9)
    assert same["metrics"]["precision"] == same["metrics"]["recall"] == 1.0


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "does not exist"),
        (lambda p: np.savez(p, arr_0=np.zeros((4, 8, 8, 3), np.float32)), "dtype float32; expected uint8"),
        (lambda p: np.savez(p, arr_0=np.zeros((4, 8, 8, 5), np.uint8)), "expected uint8 images"),
        (lambda p: np.savez(p, pictures=np.zeros((4, 8, 8, 3), np.uint8)), "no image array arr_0 or images"),
        (lambda p: np.savez(p, arr_0=np.zeros((1, 8, 8, 3), np.uint8)), "at least 2"),
        (lambda p: p.write_text("not a zip"), "cannot read"),
        (
            lambda p: np.savez(p, arr_0=np.zeros((4, 8, 8, 3), np.uint8), mu=np.zeros(3), sigma=np.eye(2)),
            "square covariance",
        ),
    ],
)
def test_bad_inputs_raise_clear_errors(tmp_path, make, message):
    p = tmp_path / "x.npz"
    make(p)
    with pytest.raises(EvaluationError, match=message):
        open_images(p)


def test_unknown_names_raise():
    assert parse_metrics("FID, pr") == ("fid", "precision", "recall")
    with pytest.raises(EvaluationError, match="unknown metric 'kid'"):
        parse_metrics("fid,kid")
    with pytest.raises(EvaluationError, match="unknown features 'clip'"):
        build_feature_extractor("clip")
    with pytest.raises(EvaluationError, match="does not exist"):
        build_feature_extractor("classifier:/no/such/file.pt")


def test_classifier_features_from_a_directory_say_so(tmp_path):
    with pytest.raises(EvaluationError) as err:
        build_feature_extractor(f"classifier:{tmp_path}")
    assert str(err.value) == (
        f"classifier checkpoint {str(tmp_path)!r} is a directory, expected a classifier checkpoint file "
        "(from `patchforcing train-classifier`)"
    )


def test_inception_without_torch_fidelity_names_the_install(monkeypatch):
    try:
        import torch_fidelity  # noqa: F401

        pytest.skip("torch-fidelity is installed here")
    except ImportError:
        pass
    with pytest.raises(EvaluationError, match="pip install torch-fidelity"):
        InceptionFeatures()


# --------------------------------------------------------------------------------------------
# Classifier features, end to end through the CLI
# --------------------------------------------------------------------------------------------


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="2")
    return subprocess.run(
        [sys.executable, "-m", "patchforcing", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def classifier_ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clf") / "clf.pt"
    code = main(
        [
            "train-classifier",
            "synthetic",
            "--resolution",
            "16",
            "--length",
            "240",
            "--epochs",
            "1",
            "--max-steps",
            "4",
            "--batch-size",
            "32",
            "--width",
            "16",
            "--out",
            str(out),
        ]
    )
    assert code == 0 and out.is_file()
    return out


def test_classifier_checkpoint_is_weights_only(classifier_ckpt):
    obj = safe_torch_load(classifier_ckpt)
    assert obj["format"] == "patchforcing-classifier"
    assert obj["config"]["resolution"] == 16 and obj["config"]["num_classes"] == 8
    assert len(obj["class_names"]) == 8 and 0.0 <= obj["accuracy"] <= 1.0
    assert obj["train"]["data"]["kind"] == "synthetic" and obj["train"]["steps"] == 4


def test_cli_eval_with_classifier_features(tmp_path, classifier_ckpt):
    np.savez(tmp_path / "samples.npz", arr_0=shapes_uint8(40, 16, seed=5), labels=np.arange(40) % 8)
    np.savez(tmp_path / "ref.npz", arr_0=shapes_uint8(48, 32, seed=6))  # resized to the classifier's 16 px
    r = run_cli(
        "eval",
        "samples.npz",
        "--ref",
        "ref.npz",
        "--features",
        f"classifier:{classifier_ckpt}",
        "--batch-size",
        "16",
        "--is-split-size",
        "20",
        "--out",
        "res.json",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "res.json").read_text())
    assert set(res["metrics"]) == {
        "FD_classifier",
        "sFD_classifier",
        "IS_classifier",
        "precision_classifier",
        "recall_classifier",
    }
    assert all(isinstance(v, float) and np.isfinite(v) for v in res["metrics"].values())
    assert "FID" not in r.stdout and "FD_classifier" in r.stdout
    assert res["details"]["IS_classifier_splits"] == 2
    assert res["features"]["name"] == "classifier" and res["reference"]["resolution"] == 16


def test_cli_bad_inputs_exit_2_without_traceback(tmp_path, classifier_ckpt, capsys):
    np.savez(tmp_path / "ok.npz", arr_0=shapes_uint8(8, 16))
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((8, 16, 16, 3), np.float32))
    feats = f"classifier:{classifier_ckpt}"
    ok, ref = str(tmp_path / "ok.npz"), str(tmp_path / "ok.npz")
    cases = [
        (["eval", str(tmp_path / "missing.npz"), "--ref", ref, "--features", feats], "does not exist"),
        (["eval", str(tmp_path / "float.npz"), "--ref", ref, "--features", feats], "expected uint8"),
        (["eval", ok, "--ref", ref, "--features", feats, "--metrics", "fid,kid"], "unknown metric"),
        (["eval", ok, "--ref", ref, "--features", "resnet"], "unknown features"),
        (["eval", ok, "--ref", ref, "--features", f"classifier:{tmp_path / 'ok.npz'}"], "cannot read"),
        (
            ["eval", ok, "--ref", ref, "--features", f"classifier:{tmp_path}"],
            "is a directory, expected a classifier checkpoint file (from `patchforcing train-classifier`)",
        ),
        (["train-classifier", "--out", str(tmp_path / "c.pt")], "give DATA"),
        (
            [
                "train-classifier",
                "--data-kind",
                "npz",
                "--data-path",
                str(tmp_path / "nope.npz"),
                "--out",
                str(tmp_path / "c.pt"),
            ],
            "does not exist",
        ),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
    # and as a separate process
    r = run_cli("eval", "missing.npz", "--ref", "ok.npz", "--features", feats, cwd=tmp_path)
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_inception_features_shapes_with_random_weights(tmp_path):
    """Runs where torch-fidelity is installed (e.g. the venv of scripts/check-inception-stack.sh)."""
    pytest.importorskip("torch_fidelity")
    fx = InceptionFeatures(random_inception_weights(tmp_path / "w.pth"))
    f = fx(shapes_uint8(3, 32))
    assert f["pool"].shape == (3, 2048) and f["logits"].shape == (3, 1008)
    assert f["spatial"].shape == (3, 7 * 17 * 17)  # ADM's mixed_6/conv[..., :7]
    assert all(torch.isfinite(v).all() for v in f.values())
