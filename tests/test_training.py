"""Training: end-to-end on a tiny model, exact resume, interruption, non-finite loss, configs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import patchforcing as pf
import patchforcing.training.trainer as trainer_mod
from patchforcing.checkpoints import safe_torch_load, save_released_format
from patchforcing.training import NonFiniteLossError, Trainer, TrainingError, load_config, train
from patchforcing.training.data_order import StepBatchSampler
from patchforcing.training.distributed import init_distributed
from patchforcing.utils import DeviceError, RunLock

ROOT = Path(__file__).resolve().parents[1]
EMOJI = Path(os.environ.get("PATCHFORCING_EMOJI_NPZ", ROOT.parent / "shared/datasets/emoji-google-64.npz"))


def _cfg(*overrides):
    return load_config("tiny-test", ["train.device=cpu", *overrides])


def _state(run_dir: Path) -> dict:
    return safe_torch_load(run_dir / "checkpoints" / "last.pt")


def _assert_same_training_state(a: dict, b: dict):
    assert a["step"] == b["step"]
    for key in ("model", "ema"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), f"{key}.{k} differs"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    for i in sa:
        for k in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k])), f"optimizer {i}.{k} differs"
    assert a["scheduler"] == b["scheduler"]


def test_tiny_run_end_to_end(tmp_path):
    res = train(_cfg(), tmp_path / "run")
    assert res.step == 6 and not res.interrupted
    run = tmp_path / "run"
    assert (run / "config.yaml").exists() and (run / "metrics.csv").exists()
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*.pt")) == ["step_0000003.pt", "step_0000006.pt"]
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == ["step_0000003.png", "step_0000006.png"]
    lines = (run / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("step,loss,fm,nll") and len(lines) == 7
    assert "val_loss" in res.metrics and all(torch.isfinite(torch.tensor(v)) for v in res.metrics.values())
    pytest.importorskip("tensorboard")
    assert any((run / "tb").glob("events.out.tfevents.*"))
    # pf.load_model on a run directory returns the EMA model, in eval mode
    model = pf.load_model(run)
    state = _state(run)
    assert not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, state["ema"][k])
    # export -> load gives the same network
    out = pf.checkpoints.export_run(run, tmp_path / "m.safetensors")
    exported = pf.load_model(out)
    x = torch.randn(2, 3, 16, 16)
    t = torch.full((2, 16), 0.3)
    assert torch.equal(exported(x, t, None)[0], model(x, t, None)[0])


def test_resume_is_exact(tmp_path):
    train(_cfg("train.max_steps=5", "train.ckpt_every=2"), tmp_path / "full")
    train(_cfg("train.max_steps=2", "train.ckpt_every=2"), tmp_path / "split")
    train(_cfg("train.max_steps=5", "train.ckpt_every=2"), tmp_path / "split", resume=True)
    _assert_same_training_state(_state(tmp_path / "full"), _state(tmp_path / "split"))
    # the metrics file continues without duplicated rows
    steps = [int(line.split(",")[0]) for line in (tmp_path / "split" / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == [1, 2, 3, 4, 5]


def test_stop_request_checkpoints_and_resumes_exactly(tmp_path):
    cfg = _cfg("train.max_steps=5", "train.ckpt_every=100", "train.sample_every=100")
    trainer = Trainer(cfg, tmp_path / "a")
    trainer.add_step_callback(lambda tr, step: tr.request_stop() if step == 3 else None)
    res = trainer.fit()
    trainer.close()
    assert res.interrupted and res.step == 3 and _state(tmp_path / "a")["step"] == 3
    train(cfg, tmp_path / "a", resume=True)
    train(cfg, tmp_path / "b")
    _assert_same_training_state(_state(tmp_path / "a"), _state(tmp_path / "b"))


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = _cfg("train.max_steps=6", "train.ckpt_every=2")
    trainer = Trainer(cfg, tmp_path / "run")

    def poison(tr, step):
        if step == 3:
            with torch.no_grad():
                tr.model.blocks[0].mlp.fc1.weight.fill_(float("nan"))

    trainer.add_step_callback(poison)
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss .* at step 4.*step 2"):
        trainer.fit()
    trainer.close()
    state = _state(tmp_path / "run")
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert sorted(p.name for p in last.parent.glob("step_*.pt")) == ["step_0000002.pt"]


def test_nonfinite_gradients_stop_before_the_optimiser_step(tmp_path):
    """A finite loss with NaN gradients (what a miscompiled backward gives) stops the run before the
    optimiser step: the weights in memory and in the last checkpoint stay finite."""
    cfg = _cfg("train.max_steps=6", "train.ckpt_every=2")
    trainer = Trainer(cfg, tmp_path / "run")

    def poison(tr, step):
        if step == 3:
            tr.model.blocks[0].mlp.fc1.weight.register_hook(lambda g: g * float("nan"))

    trainer.add_step_callback(poison)
    with pytest.raises(NonFiniteLossError, match=r"non-finite gradients \(norm nan\) at step 4.*step 2"):
        trainer.fit()
    assert trainer.step == 3 and all(torch.isfinite(p).all() for p in trainer.model.parameters())
    trainer.close()
    state = _state(tmp_path / "run")
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_resume_with_incompatible_config_is_refused(tmp_path):
    train(_cfg("train.max_steps=2"), tmp_path / "run")
    with pytest.raises(TrainingError, match=r"optim.lr: run has 0.001, now 0.002"):
        train(_cfg("train.max_steps=4", "optim.lr=2e-3"), tmp_path / "run", resume=True)
    with pytest.raises(
        TrainingError, match=r"already holds a run \(config.yaml, metrics.csv, checkpoints\); pass --resume"
    ):
        train(_cfg("train.max_steps=4"), tmp_path / "run")
    with pytest.raises(TrainingError, match="no checkpoint"):
        train(_cfg(), tmp_path / "nothing-here", resume=True)


def test_grad_accumulation_and_bf16_run(tmp_path):
    res = train(_cfg("optim.grad_accum=2", "train.max_steps=2", "train.precision=bf16"), tmp_path / "run")
    assert res.step == 2 and torch.isfinite(torch.tensor(res.metrics["loss"]))


def test_data_order_partitions_global_batches():
    single = StepBatchSampler(100, 8, 1, 0, 1, seed=3, start_step=0, max_steps=30)
    ranks = [StepBatchSampler(100, 8, 2, r, 2, seed=3, start_step=0, max_steps=30) for r in range(2)]
    for step in range(30):
        whole = single.micro_batch(step, 0)
        parts = [x for m in range(2) for r in range(2) for x in ranks[r].micro_batch(step, m)]
        assert sorted(parts) == sorted(whole)
    # every epoch visits 96 distinct items (the last incomplete global batch is dropped)
    items = [i for step in range(12) for _, i in single.micro_batch(step, 0)]
    assert len(set(items[:96])) == 96
    assert single.micro_batch(12, 0)[0][0] == 1  # step 12 starts epoch 1
    resumed = StepBatchSampler(100, 8, 1, 0, 1, seed=3, start_step=7, max_steps=30)
    assert list(resumed)[0] == single.micro_batch(7, 0)


def _cli(*args, cwd=ROOT, timeout=240):
    return subprocess.run(
        [sys.executable, "-m", "patchforcing", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def test_cli_bad_config_is_a_clear_error(tmp_path):
    r = _cli("train", "tiny-test", "optim.lrr=1", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "optim.lrr" in r.stderr and "Traceback" not in r.stderr
    r = _cli("train", "tiny-test", "train.max_steps=abc", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "train.max_steps" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "imgs" / "cls"
    bad.mkdir(parents=True)
    for i in range(30):
        (bad / f"{i}.png").write_bytes(os.urandom(100))
    r = _cli(
        "train",
        "tiny-test",
        "data.kind=folder",
        f"data.path={tmp_path / 'imgs'}",
        "data.val_size=0",
        "--out",
        str(tmp_path / "y"),
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr and "imgs" in r.stderr, r.stderr


def _popen_train(out: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "patchforcing", "train", "tiny-test", "train.device=cpu", *args, "--out", str(out)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_rows(metrics: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < n + 1):
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.1)


def test_second_writer_is_refused_and_sigterm_checkpoints(tmp_path):
    """A second ``train`` on a run directory in use fails at once (exit 2, clear message) and the
    first one carries on; SIGTERM then writes a checkpoint and exits 0."""
    out = tmp_path / "run"
    proc = _popen_train(out, "train.max_steps=100000", "train.ckpt_every=100000", "train.sample_every=100000")
    try:
        _wait_for_rows(out / "metrics.csv", 3, proc)
        r = _cli("train", "tiny-test", "train.device=cpu", "--max-steps", "5", "--out", str(out))
        assert r.returncode == 2, r.stderr
        assert "in use by another process" in r.stderr and f"pid {proc.pid}" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        assert proc.poll() is None  # the first run was not disturbed
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    assert "interrupted at step" in stdout
    state = _state(out)
    assert 3 <= state["step"] < 100000
    rows = (out / "metrics.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, len(rows) + 1)) and len(rows) >= state["step"]


def test_locked_run_directory_is_refused_in_process(tmp_path):
    out = tmp_path / "run"
    with RunLock(out):
        with pytest.raises(TrainingError, match="in use by another process"):
            Trainer(_cfg(), out)
    trainer = Trainer(_cfg(), out)  # free again once the holder let go
    with pytest.raises(TrainingError, match="in use"):
        Trainer(_cfg(), out, resume=True)
    trainer.close()
    Trainer(_cfg(), out).close()


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory):
    """A finished 2-step run, to be copied by tests that damage it."""
    run = tmp_path_factory.mktemp("base") / "run"
    train(_cfg("train.max_steps=2", "train.ckpt_every=2", "train.sample_every=2"), run)
    return run


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def test_resumed_metrics_survive_an_immediate_kill(tmp_path, two_step_run):
    """The kept rows are on disk the moment the log is reopened (no truncate-then-buffer)."""
    run = _copy_run(two_step_run, tmp_path / "run")
    trainer = Trainer(_cfg("train.max_steps=4", "train.ckpt_every=2", "train.sample_every=2"), run, resume=True)
    f, _, tb = trainer._open_logs()
    try:
        on_disk = (run / "metrics.csv").read_text().splitlines()
        assert on_disk[0].startswith("step,loss") and [int(r.split(",")[0]) for r in on_disk[1:]] == [1, 2]
    finally:
        f.close()
        if tb is not None:
            tb.close()
        trainer.close()


def test_metrics_survive_sigkill_after_resume(tmp_path, two_step_run):
    run = _copy_run(two_step_run, tmp_path / "run")
    metrics = run / "metrics.csv"
    before = metrics.read_text()
    st = metrics.stat()
    proc = _popen_train(run, "train.max_steps=100000", "train.ckpt_every=2", "train.sample_every=2", "--resume")
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:  # kill as soon as the log is touched
            now = metrics.stat() if metrics.exists() else None
            if now is None or (now.st_ino, now.st_size, now.st_mtime_ns) != (st.st_ino, st.st_size, st.st_mtime_ns):
                break
            time.sleep(0.002)
        proc.kill()
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = metrics.read_text()
    assert text.startswith(before), text  # the rows of steps 1-2 are all there


@pytest.mark.parametrize("leftover", ["config.yaml", "metrics.csv", "checkpoints"])
def test_existing_run_directory_is_not_overwritten(tmp_path, monkeypatch, leftover):
    out = tmp_path / "run"
    out.mkdir()
    target = out / leftover
    if leftover == "checkpoints":
        target.mkdir()
    else:
        target.write_text("keep me\n")
    monkeypatch.setattr(trainer_mod, "build_data", _no_data)
    with pytest.raises(TrainingError, match=rf"already holds a run \({leftover}\); it has no checkpoint to --resume"):
        Trainer(_cfg(), out)
    if leftover != "checkpoints":
        assert target.read_text() == "keep me\n"
    assert sorted(p.name for p in out.iterdir()) == sorted([leftover, ".lock"])


def _no_data(cfg):
    raise AssertionError("the data set was built before the run directory was checked")


def test_temp_files_of_a_killed_write_are_removed(tmp_path, two_step_run):
    run = _copy_run(two_step_run, tmp_path / "run")
    junk = [
        run / "checkpoints" / ".step_0000004.pt.abc123.tmp",
        run / "checkpoints" / ".last.pt.x.tmp",
        run / ".metrics.csv.q1.tmp",
    ]
    for p in junk:
        p.write_bytes(b"partial")
    keep = run / "checkpoints" / "notes.tmp"  # not one of atomic_write's names
    keep.write_text("mine")
    Trainer(_cfg("train.max_steps=4"), run, resume=True).close()
    assert not any(p.exists() for p in junk) and keep.exists()
    assert sorted(p.name for p in (run / "checkpoints").glob("*.pt")) == ["last.pt", "step_0000002.pt"]


def test_resume_from_a_damaged_or_foreign_checkpoint_is_one_clear_error(tmp_path, two_step_run):
    run = _copy_run(two_step_run, tmp_path / "run")
    last = run / "checkpoints" / "last.pt"
    good = safe_torch_load(last)
    cfg = _cfg("train.max_steps=4")

    def resume_with(state, match):
        last.unlink()  # last.pt may be a hard link to step_*.pt: never write through it
        torch.save(state, last)
        with pytest.raises(TrainingError, match=match) as info:
            Trainer(cfg, run, resume=True)
        assert str(last) in str(info.value)
        return str(info.value)

    bad = {**good, "model": dict(good["model"])}
    key = "blocks.0.mlp.fc1.weight"
    bad["model"][key] = torch.zeros(3, 5)
    msg = resume_with(bad, r"mis-shaped keys")
    assert key in msg and "(3, 5)" in msg
    bad = {**good, "ema": {k: v for k, v in good["ema"].items() if k != key}}
    assert key in resume_with(bad, r"(?s)\[ema\].*missing keys")
    resume_with({k: v for k, v in good.items() if k != "optimizer"}, r"(?s)incomplete training checkpoint.*optimizer")
    # a released .ckpt copied to last.pt
    model = pf.create_model(
        "PFT-T/4", input_size=16, in_channels=3, num_classes=4, depth=2, hidden_size=64, num_heads=4
    )
    released = save_released_format(model, tmp_path / "released.ckpt")
    msg = resume_with(safe_torch_load(released), r"not a patchforcing training checkpoint \(format None")
    assert "unknown key" not in msg
    # and through the CLI: exit 2, one line of explanation, no traceback
    r = _cli("train", "tiny-test", "train.device=cpu", "--max-steps", "4", "--out", str(run), "--resume")
    assert r.returncode == 2 and "not a patchforcing training checkpoint" in r.stderr and "Traceback" not in r.stderr


def test_unwritable_run_directory_is_refused_before_building(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_mod, "build_data", _no_data)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(TrainingError, match="exists and is not a directory"):
        Trainer(_cfg(), a_file)
    with pytest.raises(TrainingError, match="cannot write to run directory"):
        Trainer(_cfg(), a_file / "run")
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(TrainingError, match="not writable"):
                Trainer(_cfg(), ro / "run")
        finally:
            ro.chmod(0o700)


def test_bad_device_is_a_clear_error(tmp_path):
    with pytest.raises(DeviceError, match="unknown device 'bogus'"):
        init_distributed("bogus")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            Trainer(_cfg("train.device=cuda"), tmp_path / "gpu")
        assert not (tmp_path / "gpu").exists()
    r = _cli("train", "tiny-test", "train.device=bogus", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "unknown device 'bogus'" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_torchrun_two_processes(tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29533",
        "-m",
        "patchforcing",
        "train",
        "tiny-test",
        "train.device=cpu",
        "train.max_steps=4",
        "--out",
        str(out),
    ]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    state = _state(out)
    assert state["step"] == 4 and state["world_size"] == 2
    assert r.stdout.count("finished at step 4") == 1  # only rank 0 reports and writes
    model = pf.load_model(out)
    assert model.num_classes == 4


@pytest.mark.skipif(not EMOJI.exists(), reason="emoji data set not present")
@pytest.mark.parametrize("preset", ["emoji32-pft", "emoji32-sit"])
def test_emoji_presets_train(tmp_path, preset):
    cfg = load_config(
        preset,
        [
            f"data.path={EMOJI}",
            "train.max_steps=2",
            "optim.batch_size=8",
            "sample.num=4",
            "sample.steps=2",
            "train.sample_every=2",
            "train.progress=false",
            "data.val_size=16",
            "model.depth=1",
        ],
    )
    res = train(cfg, tmp_path / "run")
    assert res.step == 2
    model = pf.load_model(tmp_path / "run")
    assert model.num_classes == 9 and model.image_size == (32, 32)


def test_held_out_split_is_fixed_disjoint_and_bounded():
    """Bugs: a split that changes between calls (the study's reference would leak into training
    on resume), overlapping halves, or a val_size that leaves nothing to train on."""
    from patchforcing.training.trainer import split_train_val

    data = list(range(10))
    train_a, val_a = split_train_val(data, 4)
    train_b, val_b = split_train_val(data, 4)
    ids = lambda ds: [ds[i] for i in range(len(ds))]  # noqa: E731
    assert ids(train_a) == ids(train_b) and ids(val_a) == ids(val_b)
    assert len(val_a) == 4 and sorted(ids(train_a) + ids(val_a)) == data
    assert split_train_val(data, 0) == (data, None)
    with pytest.raises(TrainingError, match=r"data.val_size=5 leaves too little to train on \(10 items\).*val_size=1"):
        split_train_val(data, 5)
