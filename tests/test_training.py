"""Training: end-to-end on a tiny model, exact resume, interruption, non-finite loss, configs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import patchforcing as pf
from patchforcing.checkpoints import safe_torch_load
from patchforcing.training import NonFiniteLossError, Trainer, TrainingError, load_config, train
from patchforcing.training.data_order import StepBatchSampler

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
    steps = [int(l.split(",")[0]) for l in (tmp_path / "split" / "metrics.csv").read_text().splitlines()[1:]]
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


def test_resume_with_incompatible_config_is_refused(tmp_path):
    train(_cfg("train.max_steps=2"), tmp_path / "run")
    with pytest.raises(TrainingError, match=r"optim.lr: run has 0.001, now 0.002"):
        train(_cfg("train.max_steps=4", "optim.lr=2e-3"), tmp_path / "run", resume=True)
    with pytest.raises(TrainingError, match="already holds a run"):
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
    return subprocess.run([sys.executable, "-m", "patchforcing", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def test_cli_bad_config_is_a_clear_error(tmp_path):
    r = _cli("train", "tiny-test", "optim.lrr=1", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "optim.lrr" in r.stderr and "Traceback" not in r.stderr
    r = _cli("train", "tiny-test", "train.max_steps=abc", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "train.max_steps" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "imgs" / "cls"
    bad.mkdir(parents=True)
    for i in range(30):
        (bad / f"{i}.png").write_bytes(os.urandom(100))
    r = _cli("train", "tiny-test", "data.kind=folder", f"data.path={tmp_path / 'imgs'}", "data.val_size=0",
             "--out", str(tmp_path / "y"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "imgs" in r.stderr, r.stderr


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "patchforcing", "train", "tiny-test", "train.max_steps=100000",
                             "train.ckpt_every=100000", "train.sample_every=100000", "--out", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    metrics = out / "metrics.csv"
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 4):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "interrupted at step" in stdout
    state = _state(out)
    assert 3 <= state["step"] < 100000


def test_torchrun_two_processes(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
           "-m", "patchforcing", "train", "tiny-test", "train.device=cpu", "train.max_steps=4", "--out", str(out)]
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
    cfg = load_config(preset, [f"data.path={EMOJI}", "train.max_steps=2", "optim.batch_size=8", "sample.num=4",
                               "sample.steps=2", "train.sample_every=2", "train.progress=false", "data.val_size=16",
                               "model.depth=1"])
    res = train(cfg, tmp_path / "run")
    assert res.step == 2
    model = pf.load_model(tmp_path / "run")
    assert model.num_classes == 9 and model.image_size == (32, 32)
