"""FSDP2 (``train.strategy=fsdp``) on 2 CPU processes with gloo.

Found with torch 2.13 (CPU build): ``fully_shard`` works on CPU over gloo (all-gather and
reduce-scatter, fp32 and bf16 mixed precision), and so do the full-state-dict gather/scatter of
``torch.distributed.checkpoint.state_dict``. So nothing here is skipped.

* :func:`test_fsdp_step_equals_single_process`: this file run as a torchrun worker shards a tiny
  PFT, trains 3 steps on half a batch per rank (AdamW, clipping, EMA) and compares everything with
  an unsharded copy trained on the whole batch in the same process; then reloads the gathered
  checkpoint state into freshly sharded modules and checks the next step still matches.
* :func:`test_fsdp_trainer_matches_ddp_and_resumes`: ``patchforcing train`` under torchrun with
  ``train.strategy=fsdp`` (stopped after 2 steps and resumed to 4) ends with the weights, EMA and
  optimizer state of a DDP run, in the same checkpoint format, loadable by ``pf.load_model``.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import patchforcing as pf
from patchforcing.checkpoints import load_state_dict_strict, safe_torch_load
from patchforcing.flow.loss import patch_flow_loss
from patchforcing.training import ConfigError, load_config
from patchforcing.training.distributed import (
    DistEnv,
    fsdp_units,
    full_model_state,
    full_optimizer_state,
    init_distributed,
    load_optimizer_state,
    loadable,
    local_value,
    shard_model,
    shutdown_distributed,
)
from patchforcing.training.ema import EMA

ROOT = Path(__file__).resolve().parents[1]
BATCH, STEPS, CLIP = 8, 3, 0.1


def _torchrun(args: list[str], port: int, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------------------------
# in-process checks (no process group)
# --------------------------------------------------------------------------------------------


def _tiny_model() -> nn.Module:
    return pf.create_model("PFT-T/4", input_size=16, in_channels=3, num_classes=4, depth=2, hidden_size=32, num_heads=2)


def test_fsdp_units_are_the_blocks():
    model = _tiny_model()
    assert fsdp_units(model) == list(model.blocks)

    class Nested(nn.Module):  # a refiner stack, the blocks, and lists nested inside other modules
        def __init__(self):
            super().__init__()
            self.refiner = nn.ModuleList([nn.Linear(2, 2)])
            self.t_embedder = nn.Module()
            self.t_embedder.layers = nn.ModuleList([nn.Linear(2, 2)])
            self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(2, 2), nn.ModuleList([nn.Linear(2, 2)]))])

    n = Nested()
    assert fsdp_units(n) == [n.refiner[0], n.blocks[0]]  # nested lists stay with the root

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(2, 2), nn.ModuleList([nn.Linear(2, 2)])

        def fsdp_units(self):
            return [self.a]

    c = Custom()
    assert fsdp_units(c) == [c.a]


def test_single_process_helpers_are_plain_state_dicts():
    model = _tiny_model()
    opt = torch.optim.AdamW(model.parameters())
    assert full_model_state(model).keys() == model.state_dict().keys()
    assert full_optimizer_state(model, opt) == opt.state_dict()
    assert loadable(model) is model
    with pytest.raises(ValueError, match="needs more than one process"):
        shard_model(model, DistEnv())


def test_strategy_is_validated():
    assert load_config("tiny-test").train.strategy == "ddp"
    assert load_config("tiny-test", ["train.strategy=fsdp"]).train.strategy == "fsdp"
    with pytest.raises(ConfigError, match="train.strategy must be one of ddp, fsdp.*got 'zero3'"):
        load_config("tiny-test", ["train.strategy=zero3"])


# --------------------------------------------------------------------------------------------
# the math: FSDP on 2 ranks == one process on the whole batch
# --------------------------------------------------------------------------------------------


def _batch(step: int, model: nn.Module) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(100 + step)
    x1 = torch.randn(BATCH, 3, 16, 16, generator=g)
    x0 = torch.randn(BATCH, 3, 16, 16, generator=g)
    t = torch.rand(BATCH, model.num_patches, generator=g)
    y = torch.randint(0, 5, (BATCH,), generator=g)  # 4 = the null class
    return x1, x0, t, y


def _step(model, opt, ema, batch, step, part: slice) -> tuple[torch.Tensor, torch.Tensor]:
    x1, x0, t, y = (b[part] for b in batch)
    opt.zero_grad(set_to_none=True)
    terms = patch_flow_loss(model, x1, y, x0=x0, t=t, uncertainty_weight=0.5)
    terms["loss"].backward()
    norm = local_value(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP))
    opt.step()
    ema.update(model, step)
    return terms["loss"].detach(), norm.detach()


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _opt_diff(a: dict, b: dict) -> float:
    assert a["state"].keys() == b["state"].keys()
    for ga, gb in zip(a["param_groups"], b["param_groups"], strict=True):  # (betas: a tuple or a list)
        plain = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in (ga, gb)]
        assert plain[0] == plain[1], (ga, gb)
    return max(_max_diff(a["state"][i], b["state"][i]) for i in a["state"])


def _worker(out: Path) -> None:
    """One rank of :func:`test_fsdp_step_equals_single_process` (run by torchrun)."""
    env = init_distributed("cpu")
    rank, half = env.rank, BATCH // env.world_size
    part = slice(rank * half, (rank + 1) * half)
    torch.manual_seed(0)
    model = _tiny_model()
    with torch.no_grad():  # away from the zero-output initialisation: every weight gets a gradient
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    ref_ema = EMA(ref, 0.9, warmup=False)

    ema = EMA(model, 0.9, warmup=False)
    shard_model(model, env)
    shard_model(ema.model, env, training=False)
    assert all(isinstance(p, torch.distributed.tensor.DTensor) for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    report: dict = {"loss": [], "grad_norm": [], "ema_forward": []}
    probe = _batch(99, ref)
    for step in range(STEPS):
        batch = _batch(step, ref)
        ref_loss, ref_norm = _step(ref, ref_opt, ref_ema, batch, step, slice(None))
        loss, norm = _step(model, opt, ema, batch, step, part)
        torch.distributed.all_reduce(loss)
        report["loss"].append([(loss / env.world_size).item(), ref_loss.item()])
        report["grad_norm"].append([norm.item(), ref_norm.item()])
        with torch.no_grad():  # the sharded EMA's forward (collective) sees this step's update
            v = ema.model(probe[0][:2], probe[2][:2], probe[3][:2])[0]
            report["ema_forward"].append(
                (v - ref_ema.model(probe[0][:2], probe[2][:2], probe[3][:2])[0]).abs().max().item()
            )

    weights, ema_w, opt_state = full_model_state(model), full_model_state(ema.model), full_optimizer_state(model, opt)
    if rank == 0:
        report["weights"] = _max_diff(weights, ref.state_dict())
        report["ema"] = _max_diff(ema_w, ref_ema.state_dict())
        report["optimizer"] = _opt_diff(opt_state, ref_opt.state_dict())
        report["layout"] = sorted(weights) == sorted(ref.state_dict()) and all(
            v.device.type == "cpu" and not isinstance(v, torch.distributed.tensor.DTensor) for v in weights.values()
        )
    else:
        report["other_ranks_empty"] = weights == {} and opt_state == {}

    # reload the (single-process) state into freshly sharded modules, as --resume does
    torch.manual_seed(1)
    model2 = _tiny_model()
    ema2 = EMA(model2, 0.9, warmup=False)
    shard_model(model2, env)
    shard_model(ema2.model, env, training=False)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    load_state_dict_strict(loadable(model2), ref.state_dict(), "ref [model]")
    load_state_dict_strict(loadable(ema2.model), ref_ema.state_dict(), "ref [ema]")
    load_optimizer_state(model2, opt2, ref_opt.state_dict())
    loaded = full_model_state(model2), full_model_state(ema2.model), full_optimizer_state(model2, opt2)
    if rank == 0:
        report["loaded"] = [_max_diff(loaded[0], ref.state_dict()), _max_diff(loaded[1], ref_ema.state_dict())]
        report["loaded"].append(_opt_diff(loaded[2], ref_opt.state_dict()))
    batch = _batch(STEPS, ref)
    ref_loss, _ = _step(ref, ref_opt, ref_ema, batch, STEPS, slice(None))
    loss, _ = _step(model2, opt2, ema2, batch, STEPS, part)
    torch.distributed.all_reduce(loss)
    report["resumed_loss"] = [(loss / env.world_size).item(), ref_loss.item()]
    weights, ema_w = full_model_state(model2), full_model_state(ema2.model)
    if rank == 0:
        report["resumed_weights"] = _max_diff(weights, ref.state_dict())
        report["resumed_ema"] = _max_diff(ema_w, ref_ema.state_dict())
    try:  # a mis-shaped state is refused with the checkpoint error, not a deep stack trace
        bad = {k: v[..., :1] if k == "final_layer.linear.weight" else v for k, v in ref.state_dict().items()}
        load_state_dict_strict(loadable(model2), bad, "bad")
        report["refused"] = ""
    except pf.checkpoints.CheckpointError as e:
        report["refused"] = str(e)
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    del model, model2, ema, ema2, opt, opt2
    shutdown_distributed()


def test_fsdp_step_equals_single_process(tmp_path):
    r = _torchrun([__file__, str(tmp_path)], port=29541)
    assert r.returncode == 0, r.stderr[-4000:]
    reps = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    for rep in reps:
        for got, want in rep["loss"] + [rep["resumed_loss"]]:
            assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
        for got, want in rep["grad_norm"]:
            assert got == pytest.approx(want, rel=1e-5)
            assert want > CLIP  # clipping was active
        assert max(rep["ema_forward"]) < 1e-5
        assert "mis-shaped keys" in rep["refused"] and "final_layer.linear.weight" in rep["refused"]
    rep0 = reps[0]
    assert rep0["layout"] and reps[1]["other_ranks_empty"]
    assert rep0["loaded"] == [0.0, 0.0, 0.0]  # the reload is exact
    for key in ("weights", "ema", "optimizer"):
        assert rep0[key] < 1e-5, (key, rep0[key])
    # one AdamW step (lr 1e-3) from the reloaded state: parameters whose second moment is ~1e-20
    # turn float noise of their gradient into update noise (seen: 6e-5); a lost optimizer state
    # would move them by ~lr
    assert rep0["resumed_weights"] < 2e-4 and rep0["resumed_ema"] < 2e-5


# --------------------------------------------------------------------------------------------
# the trainer: train.strategy=fsdp == ddp, resume, checkpoint format
# --------------------------------------------------------------------------------------------


def _train(out: Path, port: int, *overrides: str) -> subprocess.CompletedProcess:
    args = ["-m", "patchforcing", "train", "tiny-test", "train.device=cpu", "optim.grad_accum=2", *overrides]
    r = _torchrun([*args, "--out", str(out)], port=port)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def test_fsdp_trainer_matches_ddp_and_resumes(tmp_path):
    _train(tmp_path / "ddp", 29542, "train.max_steps=4")
    _train(tmp_path / "fsdp", 29543, "train.max_steps=2", "train.strategy=fsdp")
    r = _train(tmp_path / "fsdp", 29544, "train.max_steps=4", "train.strategy=fsdp", "--resume")
    assert r.stdout.count("finished at step 4") == 1  # only rank 0 reports and writes
    a = safe_torch_load(tmp_path / "ddp" / "checkpoints" / "last.pt")
    b = safe_torch_load(tmp_path / "fsdp" / "checkpoints" / "last.pt")
    assert a.keys() == b.keys() and b["step"] == 4 and b["world_size"] == 2
    assert b["config"]["train"]["strategy"] == "fsdp"
    for key in ("model", "ema"):
        assert all(type(v) is torch.Tensor for v in b[key].values())
        assert _max_diff(a[key], b[key]) < 1e-5, key
    assert _opt_diff(a["optimizer"], b["optimizer"]) < 1e-5
    assert a["scheduler"] == b["scheduler"]
    # samples and validation rows come from rank 0, as with DDP
    assert sorted(p.name for p in (tmp_path / "fsdp" / "samples").glob("*.png")) == [
        "step_0000002.png",
        "step_0000003.png",
        "step_0000004.png",
    ]
    rows = (tmp_path / "fsdp" / "metrics.csv").read_text().splitlines()
    assert [int(r.split(",")[0]) for r in rows[1:]] == [1, 2, 3, 4]
    model = pf.load_model(tmp_path / "fsdp")
    for k, v in model.state_dict().items():
        assert torch.equal(v, b["ema"][k])


if __name__ == "__main__":  # torchrun tests/test_fsdp.py OUT_DIR
    _worker(Path(sys.argv[1]))
