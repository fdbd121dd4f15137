"""``patchforcing study``: statistics with known answers, the random-context control, fair arms,
a toy study end to end, and resume of an interrupted study."""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import patchforcing as pf
import patchforcing.study.compare as compare_mod
import patchforcing.study.runner as runner_mod
from conftest import AnalyticModel
from patchforcing.analysis.stats import (
    bootstrap_interval,
    centered_interval,
    combined_interval,
    paired_bootstrap_difference,
    percentile_interval,
    replicate_indices,
    student_t_quantile,
    t_interval,
    welch_interval,
)
from patchforcing.cli import main
from patchforcing.evaluation import feature_statistics, frechet_distance
from patchforcing.sampling import GuidedModel, make_sampler, steps_for_nfe
from patchforcing.sampling.generate import GenerationSpec, sample_noise
from patchforcing.study import (
    StudyError,
    StudySpec,
    arm_config,
    bootstrap_fd,
    check_fair,
    check_shared_inputs,
    parse_arm,
    parse_arms,
    run_study,
)
from patchforcing.study.compare import _cache_notes, _vs_dense_curve, dense_curve_weights, pareto_front
from patchforcing.study.evaluate import FrechetTo, fd
from patchforcing.study.report import check_commands, write_flops_figure, write_report
from patchforcing.training.config import apply_overrides, load_config
from patchforcing.utils import RunLock, RunLockedError

# --------------------------------------------------------------------------------------------
# statistics with a known answer
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["centered", "percentile"])
def test_paired_bootstrap_constant_shift_and_identical_arrays(method):
    rng = np.random.default_rng(0)
    b = rng.normal(size=200)
    shift = paired_bootstrap_difference(b + 0.7, b, replicates=300, seed=1, method=method)
    # every paired replicate is exactly the shift: an unpaired resampling would spread it out
    assert shift.estimate == pytest.approx(0.7, abs=1e-12)
    assert shift.low == pytest.approx(0.7, abs=1e-12) and shift.high == pytest.approx(0.7, abs=1e-12)
    assert shift.excludes_zero
    same = paired_bootstrap_difference(b, b, replicates=300, seed=1, method=method)
    assert (same.low, same.estimate, same.high) == (0.0, 0.0, 0.0) and not same.excludes_zero
    # a noisy shift: the interval holds the shift and excludes 0
    noisy = paired_bootstrap_difference(b + 0.5 + 0.1 * rng.normal(size=200), b, replicates=500, seed=2)
    assert noisy.low < 0.5 < noisy.high and noisy.excludes_zero and noisy.high - noisy.low < 0.1


@pytest.mark.parametrize("method", ["centered", "percentile"])
def test_bootstrap_interval_covers_a_known_mean_95_percent_of_the_time(method):
    """Catches a wrong quantile (e.g. 0.05/0.95: ~90 %) or a mis-centred interval (far below 95 %)."""
    hits, trials = 0, 200
    for k in range(trials):
        x = np.random.default_rng(1000 + k).normal(3.0, 2.0, size=60)
        iv = bootstrap_interval(x, np.mean, replicates=300, seed=k, method=method)
        hits += iv.low <= 3.0 <= iv.high
    assert 0.91 <= hits / trials <= 0.985, hits / trials


def test_student_t_interval_known_quantiles_and_coverage():
    for df, q in [(1, 12.7062), (2, 4.3027), (4, 2.7764), (30, 2.0423)]:
        assert student_t_quantile(0.975, df) == pytest.approx(q, abs=1e-4)
    assert student_t_quantile(0.025, 4) == pytest.approx(-2.7764, abs=1e-4)
    rng = np.random.default_rng(5)
    hits, trials = 0, 4000
    for _ in range(trials):
        iv = t_interval(rng.normal(1.0, 3.0, size=3))  # 3 "seeds": 1.96 instead of 4.30 would cover ~80 %
        hits += iv.low <= 1.0 <= iv.high
    assert 0.935 <= hits / trials <= 0.965, hits / trials
    one = t_interval([2.0])
    assert one.estimate == 2.0 and math.isnan(one.low) and math.isnan(one.high)


def test_welch_interval_known_answers_and_coverage():
    # equal spreads and sizes: df = 2 (n - 1) = 4, half-width t_{.975,4} * sqrt(2/3)
    iv = welch_interval([0.0, 1.0, 2.0], [10.0, 11.0, 12.0])
    assert iv.estimate == -10.0 and iv.excludes_zero
    assert iv.high - iv.estimate == pytest.approx(2.7764 * math.sqrt(2 / 3), abs=1e-3)
    # unequal: se^2 = 1/3 + (5/3)/4 = 0.75, df = 0.75^2 / ((1/3)^2/2 + (5/12)^2/3) = 4.959
    iv = welch_interval([1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0])
    assert iv.estimate == -3.5
    assert iv.high - iv.estimate == pytest.approx(student_t_quantile(0.975, 4.959) * math.sqrt(0.75), abs=1e-3)
    assert not welch_interval([1.0, 2.0, 3.0], [1.5, 2.5, 2.0]).excludes_zero
    assert math.isnan(welch_interval([1.0], [2.0, 3.0]).low) and math.isnan(welch_interval([1.0, 1.0], [2.0, 2.0]).high)
    rng = np.random.default_rng(7)
    hits, trials = 0, 3000
    for _ in range(trials):  # 3 seeds each, spreads 1 and 3: the interval covers the true difference ~95 %
        iv = welch_interval(rng.normal(1.0, 1.0, size=3), rng.normal(0.0, 3.0, size=3))
        hits += iv.low <= 1.0 <= iv.high
    assert 0.93 <= hits / trials <= 0.985, hits / trials


def test_centered_interval_is_not_displaced_by_resampling_bias():
    """Replicates all above the estimate (as a bootstrapped FD's are): the percentile interval misses
    the estimate, the centred one holds it with the same width."""
    reps = np.linspace(1.2, 1.6, 101)
    pct, cen = percentile_interval(1.0, reps), centered_interval(1.0, reps)
    assert pct.low > 1.0
    assert cen.low < 1.0 < cen.high and cen.high - cen.low == pytest.approx(pct.high - pct.low)
    both = combined_interval(0.0, centered_interval(0.0, [-3.0, 3.0] * 50), t_interval([-4.0, 4.0]))
    assert both.low < -3.0 and both.high > 3.0  # two error sources: wider than either


def test_fd_bootstrap_is_paired_and_deterministic():
    rng = np.random.default_rng(0)
    ref, a = rng.normal(size=(80, 4)), rng.normal(size=(50, 4))
    reps = bootstrap_fd({"a": a, "a again": a.copy(), "b": a + 0.3}, ref, replicates=20, seed=3)
    assert np.array_equal(reps["a"], reps["a again"])  # identical sets: identical replicates (paired draws)
    assert np.array_equal(reps["a"], bootstrap_fd({"a": a}, ref, replicates=20, seed=3)["a"])
    assert not np.array_equal(reps["a"], bootstrap_fd({"a": a}, ref, replicates=20, seed=4)["a"])
    assert np.all(reps["b"] > reps["a"])  # a shifted mean is farther in every replicate
    assert np.array_equal(replicate_indices(50, 7, 3), replicate_indices(50, 7, 3))
    # the cached-root distance is the library's Fréchet distance
    (ma, sa), (mr, sr) = feature_statistics(a), feature_statistics(ref)
    assert FrechetTo(mr, sr)(ma, sa) == pytest.approx(frechet_distance(ma, sa, mr, sr), rel=1e-10)
    assert fd(a, ref) == pytest.approx(frechet_distance(ma, sa, mr, sr), rel=1e-12)


# --------------------------------------------------------------------------------------------
# the random-context control
# --------------------------------------------------------------------------------------------


def _noise(model, B=3, seed=0):
    return torch.randn(B, model.in_channels, *model.image_size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cfg", [1.0, 2.0])
def test_random_context_makes_the_calls_of_look_ahead(cfg):
    y = torch.tensor([0, 1, 2])
    for steps in (1, 2, 5, 12):
        la, rc = AnalyticModel(), AnalyticModel()
        a = pf.sample(la, _noise(la), "look_ahead", steps=steps, y=y, cfg_scale=cfg, record=True)
        b = pf.sample(rc, _noise(rc), "random_context", steps=steps, y=y, cfg_scale=cfg, record=True)
        assert (b.calls, b.nfe) == (a.calls, a.nfe) and len(rc.calls) == len(la.calls)
        # the same per-patch times at every call, up to which patches carry the context time
        for (ta, _), (tb, _) in zip(la.calls, rc.calls):
            assert ta.shape == tb.shape and torch.equal(ta.sort(-1).values, tb.sort(-1).values)
        for ra, rb in zip(a.record, b.record):  # same size of mask, other patches
            assert (ra.mask is None) == (rb.mask is None)
            if ra.mask is not None:
                assert torch.equal(ra.mask.sum(1), rb.mask.sum(1))
    guided = GuidedModel(AnalyticModel(), y, cfg)

    def fit(name, budget):
        try:
            return steps_for_nfe(make_sampler(name), budget, guided)
        except ValueError:  # too small a budget: the same for both
            return None

    assert [fit("random_context", b) for b in range(1, 60)] == [fit("look_ahead", b) for b in range(1, 60)]


def test_random_context_mask_is_random_deterministic_and_batch_invariant(tiny_pft):
    m = AnalyticModel(size=8, patch=2)  # fixed, patch-varying log-variance: look-ahead's mask never changes
    noise, y = _noise(m, B=4), torch.tensor([0, 1, 2, 0])
    la = pf.sample(m, noise, "look_ahead", steps=8, y=y, record=True)
    rc = pf.sample(m, noise, "random_context", steps=8, y=y, record=True)
    masks = [r.mask for r in rc.record if r.mask is not None]
    la_masks = [r.mask for r in la.record if r.mask is not None]
    assert all(torch.equal(mk.sum(1), lm.sum(1)) for mk, lm in zip(masks, la_masks))
    assert not all(torch.equal(mk, lm) for mk, lm in zip(masks, la_masks))  # not the uncertainty mask
    assert not torch.equal(masks[0], masks[2])  # redrawn every step
    assert not torch.equal(masks[0][0], masks[0][1])  # and per image
    again = pf.sample(m, noise, "random_context", steps=8, y=y)
    assert torch.equal(again.x, rc.x)  # deterministic given the seed and the noise
    other = pf.sample(m, noise, "random_context", steps=8, y=y, seed=1, record=True)
    assert not all(torch.equal(a.mask, b.mask) for a, b in zip(other.record, rc.record) if a.mask is not None)
    # on a network whose patches interact, the random context changes the samples
    x, yy = _noise(tiny_pft, B=2), torch.tensor([0, 1])
    outs = [pf.sample(tiny_pft, x, s, steps=6, y=yy, **o).x for s, o in [("look_ahead", {}), ("random_context", {})]]
    outs.append(pf.sample(tiny_pft, x, "random_context", steps=6, y=yy, seed=1).x)
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])
    alone = torch.cat([pf.sample(m, noise[i : i + 1], "random_context", steps=8, y=y[i : i + 1]).x for i in range(4)])
    assert torch.equal(alone, rc.x)  # an image's mask does not depend on its batch-mates
    with pytest.raises(ValueError, match="seed must be an integer"):
        make_sampler("random_context", seed=0.5)


# --------------------------------------------------------------------------------------------
# arms: fair by construction
# --------------------------------------------------------------------------------------------


def test_arms_differ_only_in_family_and_timestep_sampler():
    base = load_config("emoji32")
    arms = parse_arms("sit,pft,pft-srm,pft-truncnorm,pft-uniform")
    cfgs = {a.name: arm_config(base, a, j) for a in arms for j in (0, 1)}
    check_fair(cfgs.values())  # passes
    sit, pft = arm_config(base, arms[0]), arm_config(base, arms[1])
    assert sit.model.name.startswith("SiT-") and pft.model.name.startswith("PFT-")
    assert sit.model.name.split("-", 1)[1] == pft.model.name.split("-", 1)[1] == base.model.name.split("-", 1)[1]
    assert (sit.objective.timestep_sampler, sit.objective.uncertainty_weight, sit.sample.sampler) == (
        "uniform",
        0.0,
        "euler",
    )
    assert pft.objective.timestep_sampler == "ltg" and pft.objective.uncertainty_weight > 0
    samplers = [arm_config(base, a).objective.timestep_sampler for a in arms]
    assert samplers == ["uniform", "ltg", "srm", "truncated_gaussian", "per_patch_uniform"]
    assert arm_config(base, arms[1], 2).train.seed == base.train.seed + 2
    for key in ("optim", "ema", "data"):  # the same data order, batch, optimiser and EMA
        assert getattr(sit, key) == getattr(pft, key)
    unfair = apply_overrides(pft, ["optim.lr=1e-2"])
    with pytest.raises(StudyError, match="optim.lr"):
        check_fair([sit, unfair])
    with pytest.raises(StudyError, match="backbone"):
        check_fair([sit, apply_overrides(pft, ["model.name=PFT-S/4"])])
    for bad, match in [("sit-ltg", "one time per image"), ("pft-bogus", "unknown timestep sampler"), ("vit", "start")]:
        with pytest.raises(StudyError, match=match):
            parse_arm(bad)
    with pytest.raises(StudyError, match="same recipe"):
        parse_arms("pft,pft-ltg")


def test_every_cell_gets_the_same_noise_and_labels():
    specs = [
        GenerationSpec(10, seed=0, sampler=s, nfe=n, classes=[1, 2]) for s in ("euler_pf", "look_ahead") for n in (4, 8)
    ]
    check_shared_inputs(specs)
    with pytest.raises(StudyError, match="seed"):
        check_shared_inputs(specs + [GenerationSpec(10, seed=1, sampler="euler_pf", nfe=4, classes=[1, 2])])
    with pytest.raises(StudyError, match="classes"):
        check_shared_inputs(specs + [GenerationSpec(10, seed=0, sampler="euler_pf", nfe=4, classes=[2, 1])])


# --------------------------------------------------------------------------------------------
# the study end to end, and resume
# --------------------------------------------------------------------------------------------

#: a toy study: 16x16 synthetic shapes, a 1-block model, 2 training steps
TOY = [
    "train.device=cpu",
    "train.max_steps=2",
    "train.ckpt_every=2",
    "train.sample_every=2",
    "model.depth=1",
    "data.val_size=24",
]


def _spec(**kw):
    kw.setdefault("samplers", ["euler_pf", "look_ahead", "random_context"])
    kw.setdefault("nfe", [4])
    return StudySpec(
        arms=parse_arms("sit,pft"),
        num_samples=24,
        batch_size=24,
        classifier_epochs=1,
        classifier_width=8,
        bootstrap=30,
        grid_size=4,
        **kw,
    )


def _without_timing(path):
    s = json.loads(path.read_text())
    s.pop("timing")
    return s


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "a"
    run_study(load_config("tiny-test", TOY), _spec(), out, progress=False, log=lambda m: None)
    return out


def test_toy_study_end_to_end(finished_study):
    out = finished_study
    for f in ["study.md", "study.json", "figures/fd_vs_nfe.png", "figures/val_loss_vs_t.png", "figures/grid_nfe4.png"]:
        assert (out / f).is_file(), f
    for rid in ("sit-s0", "pft-s0"):
        assert (out / "runs" / rid / "checkpoints" / "last.pt").is_file()
        assert pf.load_model(out / "runs" / rid).per_patch_time == rid.startswith("pft")
    s = json.loads((out / "study.json").read_text())
    rows = {(r["arm"], r["sampler"]): r for r in s["table"]}
    assert set(rows) == {("sit", "euler"), ("pft", "euler_pf"), ("pft", "look_ahead"), ("pft", "random_context")}
    for r in rows.values():
        assert r["low"] <= r["fd"] <= r["high"] and r["nfe"][0] <= 4
    assert rows[("pft", "look_ahead")]["nfe"] == rows[("pft", "random_context")]["nfe"] == [3]
    assert "vs_sampler" in rows[("pft", "look_ahead")] and "vs_sampler" not in rows[("pft", "euler_pf")]
    assert rows[("pft", "euler_pf")]["vs_arm"]["significant"] is None  # one seed: arms are not tested
    assert s["floor"]["fd"] > 0 and s["floor"]["n"] == 24 and s["real"]["reference_images"] == 24
    assert all(len(r["val_loss_by_t"]) == 8 for r in s["runs"].values())
    # every cell: the same labels, and noise from the same seed (fair by construction)
    labels = None
    for c in s["cells"]:
        with np.load(out / c["path"]) as z:
            assert z["arr_0"].shape == (24, 16, 16, 3)
            labels = z["labels"] if labels is None else labels
            assert np.array_equal(z["labels"], labels)
        assert json.loads((out / c["path"]).with_suffix(".json").read_text())["settings"]["seed"] == 0
    md = (out / "study.md").read_text()
    assert "| sit | euler |" in md and "| pft | random_context |" in md and "real-vs-real floor" in md.lower()
    assert "not tested (1 seed)" in md


def test_study_on_an_image_folder_scores_against_its_held_out_files(tmp_path):
    """A real image set the project has never seen: a class folder of files in mixed formats and
    sizes (RGBA PNG, grey PNG, JPEG). The reference must be exactly the held-out files, the floor
    training files with the samples' labels, and the classifier trained on the folder's classes.
    Catches a reference drawn from the training split, floor images whose labels are not the
    samples', and class counts taken from the preset instead of the data."""
    from PIL import Image

    from patchforcing.training.trainer import build_data, split_train_val

    rng = np.random.default_rng(0)
    root = tmp_path / "unseen"
    for name, tint in [("ant", (200, 40, 40)), ("bee", (40, 200, 40)), ("cat", (40, 40, 200))]:
        (root / name).mkdir(parents=True)
        for j in range(14):
            h, w = [(20, 24), (16, 16), (28, 20)][j % 3]
            noise = rng.integers(0, 60, size=(h, w, 3))
            img = Image.fromarray(np.clip(np.array(tint) + noise, 0, 255).astype(np.uint8))
            if j % 3 == 0:
                img.convert("RGBA").save(root / name / f"{j}.png")
            elif j % 3 == 1:
                img.save(root / name / f"{j}.jpg", quality=95)
            else:
                img.convert("L").save(root / name / f"{j}.png")
    data = ["data.kind=folder", f"data.path={root}", "data.resolution=16", "data.val_size=12"]
    cfg = load_config("tiny-test", TOY + data)
    out = tmp_path / "study"
    run_study(cfg, _spec(samplers=["euler_pf"]), out, progress=False, log=lambda m: None)
    s = json.loads((out / "study.json").read_text())
    assert s["real"]["num_classes"] == 3 and s["real"]["train_items"] == 30 and s["features"]["held_out_accuracy"] > 0
    train, val = split_train_val(build_data(apply_overrides(cfg, ["data.flip=false"])), 12)
    with np.load(out / "real" / "reference.npz") as z:
        reference = z["arr_0"]
    with np.load(out / "real" / "floor.npz") as z:
        floor, floor_labels = z["arr_0"], z["labels"]
    held_out = np.stack([pf.data.to_uint8(val[i][0]).permute(1, 2, 0).numpy() for i in range(len(val))])
    assert reference.shape == (12, 16, 16, 3) and np.array_equal(reference, held_out)
    by_bytes = {pf.data.to_uint8(x).permute(1, 2, 0).numpy().tobytes(): y for x, y in (train[i] for i in range(30))}
    assert not any(r.tobytes() in by_bytes for r in reference)  # disjoint from training
    assert [by_bytes[f.tobytes()] for f in floor] == floor_labels.tolist()  # floor: training files, their labels
    labels = [int(v) for v in (out / "real" / "labels.txt").read_text().split(",")]
    assert labels[: len(floor)] == floor_labels.tolist() and set(labels) <= {0, 1, 2}
    with np.load(out / s["cells"][0]["path"]) as z:
        assert z["arr_0"].shape == (24, 16, 16, 3) and z["labels"].tolist() == labels


def test_classifier_features_on_one_class_data_are_refused_before_training(tmp_path):
    """The study's classifier needs >= 2 classes: the error must come before hours of training."""
    out = tmp_path / "one-class"
    with pytest.raises(StudyError, match="this data has 1 class"):
        run_study(
            load_config("tiny-test", TOY + ["data.num_classes=1"]), _spec(), out, progress=False, log=lambda m: None
        )
    assert not (out / "runs").exists()


def test_cells_check_out_with_the_ordinary_commands(finished_study, tmp_path, monkeypatch):
    """The independent check ``study.md`` prints: ``patchforcing eval`` of a cell against
    ``real/reference.npz`` gives the table's FD, and ``patchforcing sample`` of the run with
    ``real/labels.txt`` remakes the cell's images exactly. Catches a reference file that is not the
    study's reference (e.g. the floor), labels written off by one or cycled wrongly, a study that
    samples or scores differently from the CLI, and a printed command that does not run."""
    study = tmp_path / "study"
    shutil.copytree(finished_study, study)
    monkeypatch.chdir(study)
    s = json.loads((study / "study.json").read_text())
    md = (study / "study.md").read_text()
    checks = check_commands(s)
    assert [c["cell"] for c in checks] == ["samples/sit-s0/euler-nfe4.npz", "samples/pft-s0/euler_pf-nfe4.npz"]
    labels = (study / "real" / "labels.txt").read_text().strip()
    assert "## Check a cell outside the study" in md

    def run(command, name):
        assert command in md
        argv = shlex.split(command.replace('"$(cat real/labels.txt)"', labels))
        assert argv[0] == "patchforcing"
        assert main(argv[1:] + (["--out", name] if argv[1] == "eval" else [])) == 0
        return json.loads((study / name).read_text()) if argv[1] == "eval" else None

    for i, c in enumerate(checks):
        assert run(c["eval"], f"e{i}.json")["metrics"]["FD_classifier"] == pytest.approx(c["fd"], rel=1e-5, abs=1e-6)
        run(c["sample"], None)
        with np.load(c["cell"]) as a, np.load(c["out"]) as b:
            assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["labels"], b["labels"])
        assert run(c["eval_sample"], f"s{i}.json")["metrics"]["FD_classifier"] == pytest.approx(
            c["fd"], rel=1e-5, abs=1e-6
        )
    with np.load(study / "real" / "floor.npz") as z:
        assert z["arr_0"].shape == (24, 16, 16, 3)
        assert ",".join(map(str, z["labels"])) == labels  # the floor has the samples' labels


def test_check_commands_name_feature_files_from_anywhere(finished_study, tmp_path, monkeypatch):
    """The check commands run in the study folder, so a relative ``classifier:PATH`` or Inception
    weights file given at the study's start is printed absolute. Catches a printed path that only
    works from the directory the study was started in."""
    s = json.loads((finished_study / "study.json").read_text())
    monkeypatch.chdir(tmp_path)
    s["spec"]["features"] = "classifier:models/clf.pt"
    assert f"--features classifier:{tmp_path / 'models' / 'clf.pt'} " in check_commands(s)[0]["eval"]
    s["spec"] |= {"features": "inception", "inception_weights": "w/inception.pth"}
    ev = check_commands(s)[0]["eval"]
    assert f"--features inception --inception-weights {tmp_path / 'w' / 'inception.pth'} " in ev


def test_interrupted_study_resumes_skipping_finished_runs(finished_study, tmp_path, monkeypatch):
    out = tmp_path / "b"

    def stop(run):
        raise KeyboardInterrupt("stopped after the first run")

    with pytest.raises(KeyboardInterrupt):
        run_study(load_config("tiny-test", TOY), _spec(), out, progress=False, log=lambda m: None, after_run=stop)
    assert (out / "runs" / "sit-s0" / "checkpoints" / "last.pt").is_file()
    assert not (out / "runs" / "pft-s0").exists() and not (out / "study.json").exists()
    first = (out / "runs" / "sit-s0" / "checkpoints" / "last.pt").stat().st_mtime_ns
    (out / "runs" / "pft-s0").mkdir()  # as left by a kill before the run's first checkpoint
    (out / "runs" / "pft-s0" / "config.yaml").write_text("name: killed\n")
    with RunLock(out, ".study.lock"), pytest.raises(RunLockedError):  # one study process per folder
        run_study(load_config("tiny-test", TOY), _spec(), out, progress=False, log=lambda m: None)

    trained = []
    real_trainer = runner_mod.Trainer

    def spy(cfg, run_dir, **kw):
        trained.append(run_dir.name)
        return real_trainer(cfg, run_dir, **kw)

    monkeypatch.setattr(runner_mod, "Trainer", spy)
    run_study(load_config("tiny-test", TOY), _spec(), out, progress=False, log=lambda m: None)
    assert trained == ["pft-s0"]  # the finished arm is skipped
    assert (out / "runs" / "sit-s0" / "checkpoints" / "last.pt").stat().st_mtime_ns == first
    assert _without_timing(out / "study.json") == _without_timing(finished_study / "study.json")
    trained.clear()  # a third invocation trains and samples nothing, and reports the same
    run_study(load_config("tiny-test", TOY), _spec(), out, progress=False, log=lambda m: None)
    assert trained == [] and _without_timing(out / "study.json") == _without_timing(finished_study / "study.json")


def _torchrun_study_worker(out: Path) -> None:
    """One rank of :func:`test_torchrun_study_reports_once_and_scores_outside_the_group`: the toy
    study, recording whether the process group is still open when the classifier is trained and
    the feature extractor made (rank 0's single-process work, hours at ImageNet scale)."""
    import torch.distributed as dist

    seen = []
    train_classifier, make_extractor = runner_mod.train_classifier, runner_mod.make_extractor

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            seen.append([name, dist.is_initialized()])
            return fn(*args, **kwargs)

        return wrapped

    runner_mod.train_classifier = spy("classifier", train_classifier)
    runner_mod.make_extractor = spy("features", make_extractor)
    run_study(load_config("tiny-test", TOY), _spec(), out, progress=False)  # logs with print
    (out.parent / f"seen-rank{os.environ['RANK']}.json").write_text(json.dumps(seen))


def test_torchrun_study_reports_once_and_scores_outside_the_group(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29557"]
    r = subprocess.run([*cmd, __file__, str(out)], cwd=Path(__file__).parents[1], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    for line in ("[1/4] training", "[2/4] sampling", "[3/4] real images", "[4/4] scoring", "done: "):
        assert r.stdout.count(line) == 1, r.stdout  # rank 1 says nothing
    # rank 0 trains the classifier and scores after the group is closed (no collective can time
    # out waiting for it); rank 1 does neither
    assert json.loads((tmp_path / "seen-rank0.json").read_text()) == [["classifier", False], ["features", False]]
    assert json.loads((tmp_path / "seen-rank1.json").read_text()) == []
    assert (out / "study.md").is_file() and (out / "real" / "reference.npz").is_file()
    # the samples do not depend on the number of processes: the same checkpoints in one process
    one = tmp_path / "one"
    shutil.copytree(out / "runs", one / "runs")
    run_study(load_config("tiny-test", TOY), _spec(), one, progress=False, log=lambda m: None)
    a, b = (json.loads((d / "study.json").read_text()) for d in (out, one))
    assert [(c["arm"], c["sampler"]) for c in a["table"]] == [(c["arm"], c["sampler"]) for c in b["table"]]
    for ca, cb in zip(a["cells"], b["cells"]):
        with np.load(out / ca["path"]) as za, np.load(one / cb["path"]) as zb:
            diff = np.abs(za["arr_0"].astype(int) - zb["arr_0"].astype(int))
            assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, ca["path"]
    for ca, cb in zip(a["table"], b["table"]):
        assert ca["fd"] == pytest.approx(cb["fd"], rel=1e-3)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--arms", "sit,vit"], "arm 'vit'"),
        (["--nfe", "4,0"], "--nfe"),
        (["--samplers", "euler_pf,nope"], "unknown sampler 'nope'"),
        (["--confidence", "1.5"], "confidence"),
        (["--features", "resnet"], "features"),
        (["--quantile", "2"], "quantile"),
        (["data.val_size=0"], "data.val_size"),
        (["--cache-active", "0"], "--cache-active"),
        (["--cache-active", "0.5,1.5"], "1.5 is not a share"),
        (["--cache-active", "0.5", "--cache-select", "uncertainty,entropy"], "unknown selection 'entropy'"),
        (
            ["--cache-active", "0.5", "--samplers", "euler_pf", "--cache-samplers", "look_ahead"],
            "'look_ahead' is not among",
        ),
        (["--cache-active", "0.5", "--samplers", "dual_loop"], "--cache-samplers"),
        (["--cache-select", "random"], "--cache-select needs --cache-active"),
        (["--cache-active", "half"], "--cache-active 'half'"),
        (["--sample-precision", "fp16"], "--sample-precision"),
    ],
)
def test_cli_refuses_bad_input_before_training(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.setattr(runner_mod, "Trainer", lambda *a, **k: pytest.fail("training started"))
    rc = main(["study", "tiny-test", "--out", str(tmp_path / "s"), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err, err


def test_emoji32_study_preset_loads():
    cfg = load_config("emoji32")
    assert cfg.name == "emoji32" and cfg.data.kind == "npz" and cfg.model.name.startswith("PFT-")
    assert cfg.data.val_size >= 256  # a reference big enough for FD in a 128-d feature space


@pytest.mark.parametrize("preset,size", [("imagenet256-b", "B/2"), ("imagenet256-xl", "XL/2")])
def test_imagenet_study_presets_are_the_papers_recipe(preset, size):
    """``patchforcing study imagenet256-b`` (the issue's command): arms of the paper's backbone and
    recipe, fair, with the LTG options only on the LTG arm and a held-out reference of 10,000."""
    cfg = load_config(preset)
    assert cfg.name == preset and cfg.model.name == f"PFT-{size}" and cfg.data.kind == "latents"
    assert cfg.data.val_size == 10_000
    assert (cfg.optim.lr, cfg.optim.batch_size, cfg.ema.decay, cfg.train.max_steps) == (1e-4, 256, 0.9999, 400_000)
    arms = {a: arm_config(cfg, parse_arm(a)) for a in ("sit", "pft", "pft-srm")}
    check_fair(list(arms.values()))
    assert [c.model.name for c in arms.values()] == [f"SiT-{size}", f"PFT-{size}", f"PFT-{size}"]
    assert arms["pft"].objective.timestep_options == {"loc": 0.7, "scale": 1.0, "std": 0.6}
    assert arms["pft-srm"].objective.timestep_options == {} and arms["sit"].objective.uncertainty_weight == 0


# --------------------------------------------------------------------------------------------
# token-cached samplers: FD against FLOPs
# --------------------------------------------------------------------------------------------

#: the cells of a study without caching, as they were before caching came (plus their cost)
_DENSE_CELL_KEYS = {
    "run", "arm", "seed", "sampler", "nfe_budget", "nfe", "steps", "options", "path",
    "fd", "precision", "recall", "model_sha256", "gflops_per_image",
}  # fmt: skip


def _cache_spec():
    return _spec(samplers=["euler_pf", "look_ahead"], cache_active=[1.0, 0.5], cache_select=["uncertainty", "random"])


@pytest.fixture(scope="module")
def cached_study(tmp_path_factory, finished_study):
    """A toy study with cached variants; it reuses the trained runs and classifier of
    ``finished_study`` (the same config: the study skips their training), so only sampling runs."""
    out = tmp_path_factory.mktemp("study") / "cache"
    out.mkdir()
    shutil.copytree(finished_study / "runs", out / "runs")
    shutil.copy2(finished_study / "classifier.pt", out / "classifier.pt")
    run_study(load_config("tiny-test", TOY), _cache_spec(), out, progress=False, log=lambda m: None)
    return out


def test_bf16_study_samples_every_cell_in_bf16(tmp_path, finished_study):
    """``--sample-precision bf16``: every cell's samples are made (and recorded) in bf16, from the same
    noise and labels. Catches the precision not reaching the sampler, a bf16 file passing for an fp32
    one on resume, or a record changed for fp32 studies."""
    out = tmp_path / "bf16"
    out.mkdir()
    shutil.copytree(finished_study / "runs", out / "runs")
    shutil.copy2(finished_study / "classifier.pt", out / "classifier.pt")
    shutil.copytree(finished_study / "samples", out / "samples")  # fp32 files: must be re-made, not reused
    run_study(load_config("tiny-test", TOY), _spec(sample_precision="bf16"), out, progress=False, log=lambda m: None)
    s = json.loads((out / "study.json").read_text())
    assert s["spec"]["sample_precision"] == "bf16"
    assert "sample_precision" not in json.loads((finished_study / "study.json").read_text())["spec"]
    for c in s["cells"]:
        info = json.loads((out / c["path"]).with_suffix(".json").read_text())
        assert info["settings"]["precision"] == "bf16"
        with np.load(out / c["path"]) as z16, np.load(finished_study / c["path"]) as z32:
            assert np.array_equal(z16["labels"], z32["labels"])
            a, b = z16["arr_0"].astype(int), z32["arr_0"].astype(int)
            assert not np.array_equal(a, b) and np.abs(a - b).mean() < 8  # rounded outputs, same noise


def _cells(out):
    s = json.loads((out / "study.json").read_text())
    return s, {(c["arm"], c.get("variant") or c["sampler"]): c for c in s["cells"]}


def _arrays(out, cell):
    with np.load(out / cell["path"]) as z:
        return z["arr_0"], z["labels"]


def test_cached_variants_at_active_1_are_the_dense_cells(cached_study):
    """active=1.0 recomputes every token: the cached cells must equal the dense ones bit for bit.
    Catches a variant sampled from other noise or labels (another seed, a shifted index) or a
    cache that is not dense at active=1."""
    s, cells = _cells(cached_study)
    names = {k[1] for k in cells if k[0] == "pft"}
    assert names == {
        f"{sm}{suffix}"
        for sm in ("euler_pf", "look_ahead")
        for suffix in ("", "+cache1", "+cache1-random", "+cache0.5", "+cache0.5-random")
    }
    assert not any("+cache" in k[1] for k in cells if k[0] == "sit")  # SiT arms stay dense euler
    for sm in ("euler_pf", "look_ahead"):
        dense_x, dense_y = _arrays(cached_study, cells[("pft", sm)])
        for name in (f"{sm}+cache1", f"{sm}+cache1-random"):
            c = cells[("pft", name)]
            x, y = _arrays(cached_study, c)
            assert np.array_equal(x, dense_x) and np.array_equal(y, dense_y), name
            assert c["path"] == f"samples/pft-s0/{name}-nfe4.npz" and c["sampler"] == sm
            assert c["cache"]["active"] == 1.0 and c["fd"] == cells[("pft", sm)]["fd"]
            assert c["gflops_per_image"] == c["dense_gflops_per_image"] == cells[("pft", sm)]["gflops_per_image"]
    rows = {(r["variant"], r["nfe_budget"]): r for r in s["cache"]["rows"]}
    assert rows[("euler_pf+cache1", 4)]["vs_dense"]["estimate"] == 0.0  # paired: identical cells, zero difference
    # the notes leave the all-full cells out: a dense duplicate must not count as a cached result
    assert [rows[(f"euler_pf+cache{a}", 4)]["partial"] for a in ("1", "0.5")] == [False, True]
    assert rows[("euler_pf", 4)]["partial"] is None and rows[("euler_pf", 4)]["pareto"] is not None
    notes = s["cache"]["notes"]
    assert notes[0].startswith("4 cached cell(s) made no partial call") and "of 4 cached cells are on it" in notes[1]
    md = (cached_study / "study.md").read_text()
    assert "## FD against compute (token caching)" in md and "| euler_pf+cache0.5-random | 4 |" in md
    assert (cached_study / "figures" / "fd_vs_flops.png").is_file()


def test_cached_gflops_per_image_are_the_token_flops_of_the_run(cached_study):
    """The recorded cost of a cell is the FLOPs the sampler spent per image, by hand: euler_pf at
    4 NFE makes 4 unguided calls; with active 0.5 and refresh 4, call 0 is full and calls 1-3
    recompute ceil(0.5 * 16) = 8 of the 16 tokens; all 24 images in one batch (the count is per
    batch: small batches pay padded conditioning rows). Catches dividing by the wrong count,
    recording the dense cost for a cached cell, or a cache that is not passed to the sampler."""
    _, cells = _cells(cached_study)
    model = pf.load_model(cached_study / "runs" / "pft-s0")
    full, part = pf.forward_flops(model, 24) / 24, pf.forward_flops(model, 24, active=8) / 24
    assert part < full
    dense, cached = cells[("pft", "euler_pf")], cells[("pft", "euler_pf+cache0.5")]
    assert dense["steps"] == cached["steps"] == 4 and dense["nfe"] == cached["nfe"] == 4
    assert dense["gflops_per_image"] == pytest.approx(4 * full / 1e9, rel=1e-12)
    assert cached["gflops_per_image"] == pytest.approx((full + 3 * part) / 1e9, rel=1e-12)
    assert cached["dense_gflops_per_image"] == pytest.approx(dense["gflops_per_image"], rel=1e-12)
    # and what pf.sample reports for the same inputs
    x, y = _arrays(cached_study, cached)
    noise = sample_noise(0, list(range(24)), (model.in_channels, *model.image_size))
    res = pf.sample(model, noise, "euler_pf", nfe=4, y=torch.as_tensor(y), cache=pf.TokenCache(active=0.5, seed=0))
    assert cached["gflops_per_image"] == pytest.approx(res.token_flops / 24 / 1e9, rel=1e-12)
    assert res.full_flops / 24 / 1e9 == pytest.approx(dense["gflops_per_image"], rel=1e-12)


def test_random_and_uncertainty_variants_share_inputs_not_samples(cached_study):
    """The two selections must differ only in which tokens are recomputed: same labels and every
    sampling setting but the cache's equal to the dense cell's. Catches a random control whose
    noise or labels differ (a confounded comparison) or a selection that is ignored."""
    _, cells = _cells(cached_study)
    info = {n: json.loads((cached_study / cells[("pft", n)]["path"]).with_suffix(".json").read_text()) for n in
            ("euler_pf", "euler_pf+cache0.5", "euler_pf+cache0.5-random")}  # fmt: skip
    xu, yu = _arrays(cached_study, cells[("pft", "euler_pf+cache0.5")])
    xr, yr = _arrays(cached_study, cells[("pft", "euler_pf+cache0.5-random")])
    assert np.array_equal(yu, yr) and not np.array_equal(xu, xr)
    dense = info["euler_pf"]["settings"]
    for n in ("euler_pf+cache0.5", "euler_pf+cache0.5-random"):
        st = info[n]["settings"]
        assert {k: v for k, v in st.items() if k != "cache"} == dense and "cache" not in dense
    assert info["euler_pf+cache0.5"]["settings"]["cache"]["select"] == "uncertainty"
    assert info["euler_pf+cache0.5-random"]["settings"]["cache"]["select"] == "random"
    s, _ = _cells(cached_study)
    sel = {(d["sampler"], d["active"]): d for d in s["cache"]["selection"]}
    assert set(sel) == {("euler_pf", 1.0), ("euler_pf", 0.5), ("look_ahead", 1.0), ("look_ahead", 0.5)}
    assert sel[("euler_pf", 1.0)]["estimate"] == 0.0  # both dense at active 1: no difference
    fds = {r["variant"]: r["fd"] for r in s["cache"]["rows"]}
    assert sel[("euler_pf", 0.5)]["estimate"] == pytest.approx(
        fds["euler_pf+cache0.5"] - fds["euler_pf+cache0.5-random"]
    )


def test_pareto_front_known_points_and_ties():
    """Catches a reversed comparison, a point dominating itself, ties dropped, or unknown costs counted."""
    pts = [
        (1.0, 5.0),  # cheapest: on
        (2.0, 3.0),  # on
        (2.0, 3.0),  # the same point again: on (neither is lower)
        (3.0, 3.0),  # same FD as the cheaper (2, 3): dominated, off
        (3.0, 4.0),  # (2, 3) is cheaper and lower: off
        (4.0, 1.0),  # best FD: on
        (4.0, 1.5),  # same cost, higher FD than (4, 1): off
        (None, 0.1),  # unknown cost: None, dominates nothing
        (5.0, float("nan")),  # unknown FD: None
    ]
    assert pareto_front(pts) == [True, True, True, False, False, True, False, None, None]
    assert pareto_front([]) == [] and pareto_front([(1.0, 1.0)]) == [True]


def test_dense_curve_weights_interpolate_in_log_flops_and_never_extrapolate():
    """Catches linear instead of log-linear weights, a weight on the wrong neighbour, a match missed, or
    extrapolation past the curve's ends."""
    costs = [4.0, 1.0, 2.0]  # NFE 40, 10, 20 in any order
    i, j, w = dense_curve_weights(3.0, costs)
    assert (i, j) == (2, 0) and w == pytest.approx(math.log(1.5) / math.log(2.0))
    assert dense_curve_weights(1.0, costs) == (1, 1, 0.0) and dense_curve_weights(4.0, costs) == (0, 0, 0.0)
    assert dense_curve_weights(0.5, costs) is None and dense_curve_weights(4.5, costs) is None
    assert dense_curve_weights(1.0, []) is None


def test_cached_cell_against_the_dense_curve_is_paired_and_exact():
    """A cached cell at the log-midpoint of two dense cells is compared with their mean, seed by seed and
    replicate by replicate. Catches an unpaired difference (replicates not interpolated alike), a wrong
    sign, or the curve of another sampler."""
    rng = np.random.default_rng(0)
    noise = rng.normal(size=200)

    def cell(fd, shift):
        return {"fd": fd, "replicates": fd + shift * noise}

    dense = [
        ({"variant": "euler_pf", "gflops_per_image": 2.0, "nfe_budget": 10}, [cell(4.0, 0.3)]),
        ({"variant": "euler_pf", "gflops_per_image": 8.0, "nfe_budget": 40}, [cell(2.0, 0.1)]),
        ({"variant": "look_ahead", "gflops_per_image": 1.0, "nfe_budget": 10}, [cell(0.1, 0.0)]),
    ]
    row = {"sampler": "euler_pf", "gflops_per_image": 4.0}  # log-midpoint of 2 and 8: weight 1/2
    cached = [cell(2.5, 0.2)]  # replicates move with the same noise: the paired interval is exact
    d = _vs_dense_curve(row, cached, dense, True, 0.95)
    assert d["weight"] == pytest.approx(0.5) and d["curve_fd"] == pytest.approx(3.0)
    assert d["estimate"] == pytest.approx(-0.5) and d["low"] == pytest.approx(-0.5) == pytest.approx(d["high"])
    assert d["significant"] and d["baseline"] == "euler_pf between 10 and 40 NFE"
    assert _vs_dense_curve({"sampler": "euler_pf", "gflops_per_image": 9.0}, cached, dense, True, 0.95) is None


@pytest.mark.parametrize("corrected", [False, True])
def test_equal_flop_verdict_needs_a_gain_that_survives_the_correction(corrected):
    """The recommendation sentence: one uncorrected gain among many comparisons is not a win. Catches a
    verdict from uncorrected marks, or a flipped sign (a significant loss read as a gain)."""
    spec = _spec(cache_active=[0.5])

    def row(nfe, est, sig, strict):
        d = {"estimate": est, "low": est - 0.05, "high": est + 0.05, "significant": sig}
        d["significant_corrected"] = strict
        return {
            "arm": "pft",
            "variant": "euler_pf+cache0.5",
            "nfe_budget": nfe,
            "cached": True,
            "partial": True,
            "pareto": False,
            "vs_best_cheaper_dense": None,
            "vs_dense_curve": d,
        }

    rows = [row(10, -0.2, True, corrected), row(20, +0.3, True, True), row(40, -0.01, False, False)]
    notes = " ".join(_cache_notes(spec, rows, []))
    assert "1 of 3 cached cells have a significantly lower FD, 1 a significantly higher" in notes
    if corrected:
        assert "1 stay significant after a Bonferroni correction" in notes and "@ 10 NFE" in notes
        assert "better at equal FLOPs here" in notes and "stay the default" not in notes
    else:
        assert "none stays significant" in notes and "the dense samplers stay the default" in notes


@pytest.mark.parametrize("seeds", [1, 3])
def test_random_context_is_compared_with_look_ahead_directly(tmp_path, seeds):
    """The paper's control: random_context minus look_ahead of the same arm and NFE, paired. Cells
    with known FDs and replicates: random context is worse by exactly 0.5 at NFE 4 (every replicate
    shifted) and equal at NFE 8. Catches the difference taken against euler_pf or with the wrong sign,
    an unpaired interval (it would not be exact), a missing mark and a miscounted note."""
    spec = _spec(samplers=["euler_pf", "look_ahead", "random_context"], nfe=[4, 8], seeds=seeds)
    rng = np.random.default_rng(0)
    cells = []
    for seed in range(seeds):
        for nfe in (4, 8):
            noise = rng.normal(0.0, 0.1, size=30)
            sampler_fd = {"euler": 3.0, "euler_pf": 2.0, "look_ahead": 1.5, "random_context": 2.0 if nfe == 4 else 1.5}
            for arm, sampler in [
                ("sit", "euler"),
                ("pft", "euler_pf"),
                ("pft", "look_ahead"),
                ("pft", "random_context"),
            ]:
                fd_value = sampler_fd[sampler] + 0.1 * seed
                cells.append(
                    {"run": f"{arm}-s{seed}", "arm": arm, "seed": seed, "sampler": sampler, "nfe_budget": nfe}
                    | {"path": f"samples/{arm}-s{seed}/{sampler}-nfe{nfe}.npz", "options": {}}
                    | {"nfe": nfe - 1, "steps": 2, "fd": fd_value, "replicates": fd_value + noise}
                    | {"precision": 0.5, "recall": 0.5}
                )
    floor = {"fd": 0.5, "replicates": 0.5 + rng.normal(0.0, 0.05, size=30), "n": 24}
    s = compare_mod.summarize(
        spec=spec,
        base=load_config("tiny-test", TOY),
        cells=cells,
        floor=floor,
        runs={},
        features={"name": "classifier", "held_out_accuracy": 0.9},
        real={"reference_images": 24},
        timing={"runs": {}},
    )
    rows = {(r["arm"], r["sampler"], r["nfe_budget"]): r for r in s["table"]}
    d4, d8 = rows[("pft", "random_context", 4)]["vs_context"], rows[("pft", "random_context", 8)]["vs_context"]
    assert d4["baseline"] == "look_ahead" and d4["estimate"] == pytest.approx(0.5)
    assert d4["low"] == pytest.approx(0.5) and d4["high"] == pytest.approx(0.5) and d4["significant"]
    assert d8["estimate"] == pytest.approx(0.0) and not d8["significant"]
    assert d4["by_seed"] == pytest.approx([0.5] * seeds)
    assert not any("vs_context" in r for k, r in rows.items() if k[1] != "random_context")
    assert s["comparisons"]["context"] == 2
    notes = " ".join(s["notes"])
    assert "1 of 2 significant at 95% (1 with random context worse, the paper's direction; 0 with it better)" in notes
    md = write_report(tmp_path, s | {"runs": {}}).read_text()
    nfe4, nfe8 = md.split("| pft | random_context |")[1].split("\n")[0].split("|")[:2]
    marks4, marks8 = nfe4.rsplit("]", 1)[1], nfe8.rsplit("]", 1)[1]
    assert "‡" in marks4 and "†" not in marks4 and "†" in marks8 and "‡" not in marks8  # ‡ look_ahead, † euler_pf
    assert "| pft | 4 | +0.5 | [0.5, 0.5] | yes |" in md and "| pft | 8 | +0 |" in md


def test_study_without_cache_flags_keeps_its_record(finished_study):
    """No --cache-active: no variants, the old cell keys (plus their cost), the old file names and
    spec record. Catches caching leaking into ordinary studies."""
    s = json.loads((finished_study / "study.json").read_text())
    assert "cache" not in s and not any(k.startswith("cache") for k in s["spec"])
    for c in s["cells"]:
        assert set(c) == _DENSE_CELL_KEYS, sorted(set(c) ^ _DENSE_CELL_KEYS)
        assert c["path"] == f"samples/{c['run']}/{c['sampler']}-nfe{c['nfe_budget']}.npz"
        assert c["gflops_per_image"] > 0
    assert not (finished_study / "figures" / "fd_vs_flops.png").exists()
    assert "token caching" not in (finished_study / "study.md").read_text()


def test_cached_study_resumes_without_resampling(cached_study, monkeypatch):
    """A second invocation reuses every cached cell's file. Catches variants whose settings or file
    names change between invocations (they would be sampled again)."""
    before = {p: p.stat().st_mtime_ns for p in (cached_study / "samples").rglob("*.npz")}
    assert sum("+cache" in p.name for p in before) == 8
    monkeypatch.setattr(runner_mod, "generate", lambda *a, **k: pytest.fail("re-sampled"))
    first = _without_timing(cached_study / "study.json")
    run_study(load_config("tiny-test", TOY), _cache_spec(), cached_study, progress=False, log=lambda m: None)
    assert _without_timing(cached_study / "study.json") == first
    assert {p: p.stat().st_mtime_ns for p in (cached_study / "samples").rglob("*.npz")} == before


def test_cache_settings_are_checked_and_recorded():
    """Catches an unchecked share, selection or sampler reaching the sampling loop."""
    spec = _cache_spec()
    assert [v.name for v in spec.cache_variants()][:2] == ["euler_pf+cache1", "euler_pf+cache1-random"]
    assert spec.to_dict()["cache_samplers"] == ["euler_pf", "look_ahead"] and spec.to_dict()["cache_refresh"] == 4
    for kw, match in [
        ({"cache_active": [0.0]}, "0.0 is not a share"),
        ({"cache_active": [True]}, "True is not a share"),
        ({"cache_active": [0.5], "cache_select": ["best"]}, "unknown selection 'best'"),
        ({"cache_active": [0.5], "cache_samplers": ["dual_loop"]}, "'dual_loop' is not among"),
        ({"cache_active": [0.5], "cache_refresh": 0}, "cache_refresh"),
        ({"cache_active": [0.5, 0.5]}, "listed twice"),
        ({"cache_samplers": ["euler_pf"]}, "needs cache_active"),
    ]:
        with pytest.raises(StudyError, match=match):
            _spec(**kw)


def test_gflops_per_image_of_a_record_and_unknown_costs(cached_study, tmp_path):
    """The per-image cost divides the run's FLOPs by the images that run made (a resumed file's
    record counts only its new images), and an unknown model cost stays None through the notes,
    the report and the figure. Catches a division by num_samples after a resume, or a crash on None."""
    rec = {"token_flops": 24e9, "full_flops": 48e9, "images_generated_this_run": 12, "num_samples": 24}
    assert runner_mod.gflops_per_image(rec) == 2.0 and runner_mod.gflops_per_image(rec, "full_flops") == 4.0
    assert runner_mod.gflops_per_image({"token_flops": 48e9, "num_samples": 24}) == 2.0
    assert runner_mod.gflops_per_image({"token_flops": None, "images_generated_this_run": 24}) is None
    s = json.loads((cached_study / "study.json").read_text())
    for r in s["cache"]["rows"]:
        r.update(gflops_per_image=None, dense_gflops_per_image=None, pareto=None, partial=None)
    assert compare_mod._cache_notes(_cache_spec(), s["cache"]["rows"], []) == [
        "The model's FLOPs are unknown: no FD-against-compute comparison is possible."
    ]
    assert write_flops_figure(tmp_path / "f.png", s) is None and not (tmp_path / "f.png").exists()
    md = write_report(tmp_path, s).read_text()
    assert "| euler_pf+cache0.5 | 4 | n/a |" in md and "| n/a |" in md


if __name__ == "__main__":  # torchrun tests/test_study.py OUT_DIR (the torchrun study test's ranks)
    _torchrun_study_worker(Path(sys.argv[1]))
