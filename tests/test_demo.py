"""The demo end to end at toy scale: every file a person opens is written."""

import json
import math

import pytest

from patchforcing import demo
from patchforcing.cli import main
from patchforcing.demo import DEMO_SAMPLERS, run_demo

# a toy-scale demo: 3 steps of a 1-block model on 300 synthetic images
TINY_DEMO = [
    "train.max_steps=3",
    "model.depth=1",
    "data.length=300",
    "data.val_size=16",
    "optim.batch_size=8",
    "sample.num=4",
    "sample.steps=2",
    "train.progress=false",
    "train.sample_every=3",
    "train.precision=fp32",
]


def test_demo_writes_its_folder(tmp_path):
    out = run_demo(tmp_path / "demo", TINY_DEMO, nfe=6, num_eval=24, progress=False, classifier_steps=3)
    names = {p.name for p in out.iterdir()}
    for f in [
        "summary.md",
        "summary.json",
        "samplers.png",
        "uncertainty_and_time.png",
        "trajectory_look_ahead.png",
        "trajectory_dual_loop.png",
        "data.png",
        "classifier.pt",
        "run",
    ]:
        assert f in names
    for s in DEMO_SAMPLERS:
        assert f"samples_{s}.png" in names
    summary = (out / "summary.md").read_text()
    assert (
        "| look_ahead | 3 | 5 |" in summary and "| dual_loop | 1 | 4 |" in summary and "| euler_pf | 6 | 6 |" in summary
    )
    assert "not** FID" in summary and "FD_classifier" in summary and "*real images (floor)*" in summary
    assert "What this run can and cannot show" in summary and "cannot show whether Patch Forcing beats SiT" in summary
    s = json.loads((out / "summary.json").read_text())
    q = s["quality"]
    assert q["reference_images"] == 16 and q["floor"]["n"] == 24 and q["floor"]["fd"] > 0
    for row in s["samplers"]:  # a finite FD inside its interval, and the paired difference to euler_pf
        assert math.isfinite(row["fd"]) and row["fd_low"] <= row["fd"] <= row["fd_high"]
        assert (row["vs_euler_pf"] is None) == (row["sampler"] == "euler_pf")
    clf = (out / "classifier.pt").stat().st_mtime_ns
    # a second call reuses the finished run and the classifier instead of training again
    again = run_demo(tmp_path / "demo", TINY_DEMO, nfe=6, num_eval=24, progress=False, classifier_steps=3)
    assert "continued from an earlier run" in (again / "summary.md").read_text()
    assert (out / "classifier.pt").stat().st_mtime_ns == clf
    fds = [(r["sampler"], r["fd"], r["fd_low"], r["fd_high"]) for r in s["samplers"]]
    assert [
        (r["sampler"], r["fd"], r["fd_low"], r["fd_high"])
        for r in json.loads((again / "summary.json").read_text())["samplers"]
    ] == fds


@pytest.mark.parametrize(
    "kwargs,option",
    [({"nfe": 0}, "--nfe"), ({"nfe": 2}, "--nfe"), ({"num_eval": 0}, "--num-eval"), ({"num_eval": 1}, "--num-eval")],
)
def test_demo_rejects_bad_options_before_training(tmp_path, monkeypatch, kwargs, option):
    def no_training(*args, **kw):
        pytest.fail("training started despite an invalid option")

    monkeypatch.setattr(demo, "train", no_training)
    with pytest.raises(ValueError, match=option):
        run_demo(tmp_path / "demo", ["train.max_steps=3"], progress=False, **kwargs)
    assert not (tmp_path / "demo").exists()  # nothing written either


def test_cli_demo_nfe_zero_is_a_usage_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(demo, "train", lambda *a, **k: pytest.fail("training started"))
    assert main(["demo", "--out", str(tmp_path / "d"), "--nfe", "0"]) == 2
    assert "argument --nfe: expected a positive integer, got 0" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
