"""The maths of the training loop against hand-computed values: EMA (decay, warm-up, blend),
learning-rate warm-up, gradient accumulation, label dropout, clipping, validation segments.

Each test is meant to fail for one family of bugs (named in its docstring)."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from torch import nn

import patchforcing.training.trainer as trainer_mod
from patchforcing.flow import patch_flow_loss
from patchforcing.training import EMA, Trainer, ema_decay, load_config
from patchforcing.training.trainer import apply_label_dropout, lr_factor, step_generator


def _cfg(*overrides):
    return load_config("tiny-test", ["train.device=cpu", *overrides])


@pytest.fixture
def make_trainer(tmp_path):
    """``make_trainer(*overrides)``: a tiny-test Trainer in a fresh directory, closed afterwards."""
    made = []

    def make(*overrides):
        tr = Trainer(_cfg(*overrides), tmp_path / f"run{len(made)}")
        made.append(tr)
        return tr

    yield make
    for tr in made:
        if tr.model is not None:
            tr.close()


def _full_batch(trainer: Trainer, n: int = 8):
    items = [trainer.train_data[i] for i in range(n)]
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])


def _deterministic_loss(model, x1, y, timestep_sampler=None, uncertainty_weight=0.01, generator=None):
    """The real objective with per-item noise and per-patch times (no generator draws), so that a
    batch split into micro-batches sees exactly the same terms as the whole batch."""
    x0 = torch.sin(3.0 * x1 + 0.5)
    p = model.patch_size
    t = torch.sigmoid(4 * nn.functional.avg_pool2d(x1.mean(1, keepdim=True), p).flatten(1))
    return patch_flow_loss(model, x1, y, x0=x0, t=t, uncertainty_weight=uncertainty_weight)


# --------------------------------------------------------------------------------------------
# EMA
# --------------------------------------------------------------------------------------------


def test_ema_decay_formula_values():
    """Catches a changed warm-up formula (``min(decay, (1 + k) / (10 + k))``) or ignored flag."""
    assert ema_decay(0, 0.999) == 0.1
    assert ema_decay(1, 0.999) == 2 / 11
    assert ema_decay(5, 0.999) == 0.4
    assert ema_decay(90, 0.999) == 91 / 100
    assert ema_decay(8000, 0.999) == 8001 / 8010
    assert ema_decay(9000, 0.999) == 0.999  # 9001/9010 > 0.999: capped
    assert ema_decay(10**6, 0.9999) == 0.9999
    assert ema_decay(0, 0.999, warmup=False) == 0.999


def test_ema_decay_small_target_is_capped_by_warmup():
    assert ema_decay(3, 0.5) == 4 / 13
    assert ema_decay(20, 0.5) == 0.5


class _TwoParams(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, 2.0]))
        self.frozen = nn.Parameter(torch.tensor([7.0]), requires_grad=False)


def test_ema_blend_hand_computed():
    """Catches an inverted blend weight (``d * model + (1 - d) * ema``), a wrong warm-up, or
    frozen parameters being averaged."""
    m = _TwoParams()
    ema = EMA(m, decay=0.9, warmup=True)
    with torch.no_grad():
        m.w.copy_(torch.tensor([3.0, 4.0]))
        m.frozen.fill_(-1.0)
    assert ema.update(m, 0) == 0.1
    torch.testing.assert_close(ema.model.w, torch.tensor([0.1 * 1 + 0.9 * 3, 0.1 * 2 + 0.9 * 4]))  # [2.8, 3.8]
    with torch.no_grad():
        m.w.copy_(torch.tensor([5.0, 0.0]))
    assert ema.update(m, 1) == 2 / 11
    e1 = torch.tensor([2 / 11 * 2.8 + 9 / 11 * 5, 2 / 11 * 3.8 + 9 / 11 * 0])
    torch.testing.assert_close(ema.model.w, e1)
    # far into the run the target decay applies
    assert ema.update(m, 1000) == 0.9
    torch.testing.assert_close(ema.model.w, 0.9 * e1 + 0.1 * torch.tensor([5.0, 0.0]))
    assert ema.model.frozen.item() == 7.0  # not trainable: never blended
    # without warm-up the target decay applies from step 0
    m2 = _TwoParams()
    ema2 = EMA(m2, decay=0.75, warmup=False)
    with torch.no_grad():
        m2.w.copy_(torch.tensor([5.0, 6.0]))
    assert ema2.update(m2, 0) == 0.75
    torch.testing.assert_close(ema2.model.w, torch.tensor([0.75 * 1 + 0.25 * 5, 0.75 * 2 + 0.25 * 6]))


def test_trainer_ema_tracks_post_step_weights_and_logs_schedule(make_trainer):
    """Through ``fit``: the EMA blends the weights *after* each optimiser step with the warm-up
    decay of that step, and metrics.csv logs the warm-up learning rates and decays. Catches an
    EMA update before the optimiser step, a missing/doubled scheduler step, a removed warm-up."""
    tr = make_trainer("train.max_steps=5", "optim.warmup_steps=4", "train.ckpt_every=100", "train.sample_every=100")
    expected = {k: v.detach().clone().double() for k, v in tr.model.named_parameters()}
    decays = []

    def record(t, step):
        d = ema_decay(step - 1, 0.999)
        decays.append(d)
        for k, v in t.model.named_parameters():
            expected[k] = d * expected[k] + (1 - d) * v.detach().double()

    tr.add_step_callback(record)
    tr.fit()
    for k, v in tr.ema.model.named_parameters():
        torch.testing.assert_close(v.double(), expected[k], rtol=1e-5, atol=1e-6, msg=k)
    with open(tr.run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5]
    assert [float(r["lr"]) for r in rows] == [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3]
    assert [float(r["ema_decay"]) for r in rows] == pytest.approx([0.1, 2 / 11, 3 / 12, 4 / 13, 5 / 14], rel=1e-12)
    assert decays == [0.1, 2 / 11, 3 / 12, 4 / 13, 5 / 14]


# --------------------------------------------------------------------------------------------
# learning rate
# --------------------------------------------------------------------------------------------


def test_lr_factor_values():
    """Catches a removed or off-by-one warm-up (step 0 must already train, at lr / warmup)."""
    assert [lr_factor(k, 4) for k in range(7)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]
    assert [lr_factor(k, 1) for k in range(3)] == [1.0, 1.0, 1.0]
    assert [lr_factor(k, 0) for k in range(3)] == [1.0, 1.0, 1.0]


def test_scheduler_follows_lr_at_step_by_step(make_trainer):
    """Catches a scheduler stepped twice (or not at all) per optimiser step."""
    tr = make_trainer("optim.warmup_steps=4", "optim.lr=2e-3")
    assert [tr.lr_at(k) for k in range(6)] == [5e-4, 1e-3, 1.5e-3, 2e-3, 2e-3, 2e-3]
    tr.optimizer.zero_grad(set_to_none=True)  # no gradients: the steps only move the schedule
    used = []
    for k in range(6):
        assert tr.optimizer.param_groups[0]["lr"] == pytest.approx(tr.lr_at(k), rel=1e-12)
        _, lr, decay = tr._apply_gradients()
        used.append(lr)
        assert decay == ema_decay(k, 0.999)
        assert tr.step == k + 1
    assert used == pytest.approx([5e-4, 1e-3, 1.5e-3, 2e-3, 2e-3, 2e-3], rel=1e-12)


# --------------------------------------------------------------------------------------------
# gradient accumulation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("accum", [2, 4])
def test_grad_accumulation_equals_full_batch(make_trainer, monkeypatch, accum):
    """Catches a missing ``/ accum``, a micro-batch counted twice or skipped, gradients zeroed
    between micro-batches, and wrong logged totals."""
    monkeypatch.setattr(trainer_mod, "patch_flow_loss", _deterministic_loss)
    full = make_trainer("objective.label_dropout=0")
    split = make_trainer("objective.label_dropout=0", f"optim.grad_accum={accum}")
    for a, b in zip(full.model.parameters(), split.model.parameters()):
        assert torch.equal(a, b)  # same initial weights
    x, y = _full_batch(full)
    ref = _deterministic_loss(full.model, x, y)
    totals_full = full._train_step([(x, y)])
    totals_split = split._train_step(list(zip(x.chunk(accum), y.chunk(accum))))
    for k in ("loss", "fm", "nll"):
        torch.testing.assert_close(totals_full[k], ref[k].detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(totals_split[k], ref[k].detach(), rtol=1e-5, atol=1e-7)
    named = dict(split.model.named_parameters())
    for k, p in full.model.named_parameters():
        if p.grad is None:
            assert named[k].grad is None
            continue
        torch.testing.assert_close(named[k].grad, p.grad, rtol=1e-4, atol=1e-7, msg=k)
    n_full, _, _ = full._apply_gradients()
    n_split, _, _ = split._apply_gradients()
    torch.testing.assert_close(n_split, n_full, rtol=1e-5, atol=1e-7)
    for k, p in full.model.named_parameters():
        torch.testing.assert_close(named[k], p, rtol=1e-4, atol=1e-6, msg=k)


# --------------------------------------------------------------------------------------------
# label dropout
# --------------------------------------------------------------------------------------------


def test_label_dropout_rate_and_null_class():
    """Catches an inverted dropout (90 % dropped instead of 10 %), none dropped, or dropped
    labels that are not the null class ``num_classes``."""
    n, k = 20_000, 4
    y = torch.arange(n) % k
    out = apply_label_dropout(y, 0.1, k, torch.Generator().manual_seed(0))
    dropped = out == k
    # the exact draw: label i is dropped where rand_i < p
    assert torch.equal(dropped, torch.rand(n, generator=torch.Generator().manual_seed(0)) < 0.1)
    assert abs(int(dropped.sum()) - 2000) < 200  # binomial sd 42
    assert torch.equal(out[~dropped], y[~dropped])
    assert set(out.unique().tolist()) == {0, 1, 2, 3, 4}
    assert int((apply_label_dropout(y, 0.9, k, torch.Generator().manual_seed(1)) == k).sum()) in range(17_800, 18_200)
    # p = 0 or an unconditional model: unchanged and nothing drawn from the generator
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    assert torch.equal(apply_label_dropout(y, 0.0, k, g), y)
    assert torch.equal(
        apply_label_dropout(torch.zeros(3, dtype=torch.long), 0.5, 0, g), torch.zeros(3, dtype=torch.long)
    )
    assert torch.equal(g.get_state(), state)


def test_trainer_applies_label_dropout_with_step_generator(make_trainer, monkeypatch):
    """The trainer drops labels with the step's generator, before the objective's draws."""
    seen = []

    def recording_loss(model, x1, y, **kw):
        seen.append(y.clone())
        return _deterministic_loss(model, x1, y)

    monkeypatch.setattr(trainer_mod, "patch_flow_loss", recording_loss)
    tr = make_trainer("objective.label_dropout=0.5")
    tr.step = 3
    x, y = _full_batch(tr)
    tr._train_step([(x, y)])
    expected = apply_label_dropout(y, 0.5, 4, step_generator(tr.cfg.train.seed, 3, 0, tr.device))
    assert torch.equal(seen[0], expected)
    assert 0 < int((expected == 4).sum()) < 8  # this seed drops some labels and keeps others


# --------------------------------------------------------------------------------------------
# clipping
# --------------------------------------------------------------------------------------------


def _set_grads(model: nn.Module, value: float) -> float:
    total = 0
    for p in model.parameters():
        p.grad = torch.full_like(p, value)
        total += p.numel()
    return value * math.sqrt(total)


@pytest.mark.parametrize("clip", [0.5, 0.0])
def test_grad_clip_bounds_the_l2_norm_and_reports_the_pre_clip_norm(make_trainer, clip):
    """Catches disabled clipping, a wrong norm type (inf/L1), a post-clip norm in the log, and
    ``grad_clip=0`` (documented as off) wiping the gradients."""
    tr = make_trainer(f"optim.grad_clip={clip}")
    norm = _set_grads(tr.model, 0.01)
    assert norm > 1.0
    grad_norm, _, _ = tr._apply_gradients()
    assert grad_norm.item() == pytest.approx(norm, rel=1e-5)
    after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in tr.model.parameters()]))
    if clip > 0:
        assert after.item() == pytest.approx(clip, rel=1e-4)
        for p in tr.model.parameters():  # one common factor clip / norm
            torch.testing.assert_close(p.grad, torch.full_like(p, 0.01 * clip / norm), rtol=1e-4, atol=0)
    else:
        assert after.item() == pytest.approx(norm, rel=1e-5)
    # a gradient under the bound is left alone
    small = make_trainer("optim.grad_clip=1e6")
    norm = _set_grads(small.model, 0.01)
    grad_norm, _, _ = small._apply_gradients()
    assert grad_norm.item() == pytest.approx(norm, rel=1e-5)
    for p in small.model.parameters():
        assert torch.all(p.grad == 0.01)


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def test_validation_is_segment_losses_of_the_ema_model(make_trainer):
    """``val_seg*`` are the EMA model's segment losses over the held-out set (noise seed 1234)."""
    tr = make_trainer()
    with torch.no_grad():
        for p in tr.ema.model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    out = tr.validation()
    xs, ys = zip(*[tr.val_data[i] for i in range(len(tr.val_data))])
    x, y = torch.stack(xs), torch.tensor([int(v) for v in ys])
    g = torch.Generator().manual_seed(1234)
    x0 = torch.randn(x.shape, generator=g)
    tr.ema.model.eval()
    for j in range(8):
        t = torch.full((x.shape[0],), (j + 0.5) / 8)
        xt = t.view(-1, 1, 1, 1) * x + (1 - t.view(-1, 1, 1, 1)) * x0
        with torch.no_grad():
            v, _ = tr.ema.model(xt, t, y)
        assert out[f"val_seg{j}"] == pytest.approx(float(((v - (x - x0)) ** 2).mean()), rel=1e-5)
    assert out["val_loss"] == pytest.approx(sum(out[f"val_seg{j}"] for j in range(8)) / 8, rel=1e-6)
