"""``checked_compile`` (utils/compile.py): the gradient comparison, the fallback order, the eager
fallback, and that the caller's module, gradients and RNG are left alone; the trainer's use of it."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import patchforcing as pf
from patchforcing.checkpoints import safe_torch_load
from patchforcing.training import Trainer, load_config
from patchforcing.utils.compile import CPU_FALLBACK_OPTIONS, checked_compile, gradient_error, randomize_parameters_


def test_gradient_error_known_values():
    a = [torch.ones(3), torch.full((2,), 2.0)]
    assert gradient_error(a, a) == 0.0
    assert gradient_error([a[0] * 1.1, a[1]], a) == pytest.approx(0.1, rel=1e-5)  # the worst parameter
    assert gradient_error([a[0], a[1] * 0.7], a) == pytest.approx(0.3, rel=1e-5)
    assert gradient_error([a[0], a[1] * float("nan")], a) == math.inf
    assert gradient_error([a[0], torch.tensor([1.0, float("inf")])], a) == math.inf
    assert gradient_error([a[0], None], a) == math.inf  # a gradient went missing
    assert gradient_error([a[0], None], [a[0], None]) == 0.0
    assert gradient_error(a[:1], a) == math.inf
    # a parameter with a ~0 reference gradient is measured against 1e-6 of the largest norm
    tiny = [torch.tensor([1.0]), torch.tensor([1e-12])]
    assert gradient_error([tiny[0], torch.tensor([2e-12])], tiny) < 1e-5


def _mlp() -> nn.Module:
    torch.manual_seed(3)
    m = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2))
    nn.init.zeros_(m[2].weight)  # zero-initialised head, as in the models: hides wrong gradients
    return m


def _probe(fn):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, generator=g)
    fn(x).square().mean().backward()


class _Broken(nn.Module):
    """A 'compiled' module whose backward is wrong (scaled) or non-finite."""

    def __init__(self, inner: nn.Module, scale: float):
        super().__init__()
        self.inner, self.scale = inner, scale

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        for o in out if isinstance(out, tuple) else (out,):  # same values, gradients x scale
            if isinstance(o, torch.Tensor) and o.requires_grad:
                o.register_hook(lambda g: g * self.scale)
        return out


def _fake_compiler(outcomes: dict):
    """``compile_fn`` whose result per options key is broken (a scale), raising, or right (None)."""
    calls = []

    def compile_fn(module, options=None):
        key = tuple(sorted((options or {}).items()))
        calls.append((module, key))
        scale = outcomes.get(key)
        if scale == "raise":
            raise RuntimeError("compiler crashed")
        return module if scale is None else _Broken(module, scale)

    return compile_fn, calls


def test_a_compilation_that_agrees_is_used_and_nothing_else_changes():
    m = _mlp()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    rng = torch.get_rng_state()
    compile_fn, calls = _fake_compiler({})
    fn, check = checked_compile(m, _probe, fallbacks=CPU_FALLBACK_OPTIONS, compile_fn=compile_fn)
    assert check.compiled and check.options == {} and not check.fell_back
    assert [e for _, e in check.tried] == [0.0]
    assert calls[-1] == (m, ()) and fn is m  # the caller's module compiled with the default options
    assert all(c[0] is not m for c in calls[:-1])  # the check itself ran on a copy
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert all(p.grad is None for p in m.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("broken", [1.5, float("nan"), "raise"])
def test_a_disagreeing_default_falls_back_to_the_next_options(broken):
    m = _mlp()
    compile_fn, calls = _fake_compiler({(): broken})
    fn, check = checked_compile(m, _probe, fallbacks=CPU_FALLBACK_OPTIONS, compile_fn=compile_fn)
    assert check.compiled and check.fell_back and check.options == CPU_FALLBACK_OPTIONS[0]
    first = check.tried[0][1]
    if broken == 1.5:  # gradients x 1.5: error 0.5 (the random weights make every gradient non-zero)
        assert first == pytest.approx(0.5, rel=1e-4)
    elif broken == "raise":
        assert math.isnan(first)
    else:
        assert first == math.inf
    assert check.tried[1] == (CPU_FALLBACK_OPTIONS[0], 0.0)
    assert calls[-1] == (m, (("cpp.simdlen", 256),))
    assert "cpp.simdlen=256" in check.describe() and "compiled with cpp.simdlen=256" in check.describe()


def test_an_error_just_under_the_tolerance_passes_and_just_over_fails():
    m = _mlp()
    compile_fn, _ = _fake_compiler({(): 1.09})
    _, check = checked_compile(m, _probe, compile_fn=compile_fn, tolerance=0.1)
    assert check.compiled and check.options == {}
    compile_fn, _ = _fake_compiler({(): 1.11})
    fn, check = checked_compile(m, _probe, compile_fn=compile_fn, tolerance=0.1)
    assert not check.compiled and fn is m


def test_nothing_agrees_so_the_module_runs_eagerly():
    m = _mlp()
    compile_fn, calls = _fake_compiler({(): float("nan"), (("cpp.simdlen", 256),): 2.0})
    fn, check = checked_compile(m, _probe, fallbacks=CPU_FALLBACK_OPTIONS, compile_fn=compile_fn)
    assert fn is m and not check.compiled and check.options is None
    assert [o for o, _ in check.tried] == [{}, {"cpp.simdlen": 256}]
    assert all(c[0] is not m for c in calls)  # the caller's module was never compiled
    assert "eager" in check.describe()


def test_randomize_parameters_is_deterministic_private_and_spares_frozen_weights():
    a, b = _mlp(), _mlp()
    b[0].bias.requires_grad_(False)
    rng = torch.get_rng_state()
    randomize_parameters_(a, seed=5)
    randomize_parameters_(b, seed=5)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(a[0].weight, b[0].weight) and a[2].weight.abs().min() > 0  # the zero head too
    assert torch.equal(b[0].bias, _mlp()[0].bias)  # frozen: unchanged
    c = randomize_parameters_(_mlp(), seed=6)
    assert not torch.equal(a[0].weight, c[0].weight)


def test_trainer_uses_the_fallback_when_the_default_compilation_is_wrong(tmp_path, monkeypatch, capsys):
    """``train.compile=true`` on a machine whose default compiled backward is wrong (as on one AMX Xeon
    under torch 2.13): the run uses the fallback options, says so, and trains exactly as eager does."""
    compile_fn, calls = _fake_compiler({(): float("nan")})
    monkeypatch.setattr(torch, "compile", compile_fn)
    cfg = load_config("tiny-test", ["train.device=cpu", "train.max_steps=3", "train.compile=true"])
    tr = Trainer(cfg, tmp_path / "c")
    assert tr.compile_check.options == {"cpp.simdlen": 256} and tr.compile_check.tried[0][1] == math.inf
    assert "note: torch.compile checked against eager" in capsys.readouterr().out
    assert calls[-1] == (tr.model, (("cpp.simdlen", 256),))
    tr.fit()
    tr.close()
    eager = load_config("tiny-test", ["train.device=cpu", "train.max_steps=3"])
    ref = Trainer(eager, tmp_path / "e")
    assert ref.compile_check is None
    ref.fit()
    ref.close()
    a, b = (safe_torch_load(tmp_path / r / "checkpoints" / "last.pt") for r in ("c", "e"))
    for key in ("model", "ema"):  # the probe changed nothing: the same run as eager, bit for bit
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key


def test_trainer_compile_check_runs_the_real_inductor_on_the_training_loss(tmp_path):
    """The real ``torch.compile`` on the tiny preset: the check passes with some options (inductor
    is right with the default or with AVX2 code) and the compiled run's first loss equals eager's."""
    pytest.importorskip("torch._inductor")
    cfg = load_config("tiny-test", ["train.device=cpu", "train.max_steps=1", "train.compile=true"])
    tr = Trainer(cfg, tmp_path / "c")
    check = tr.compile_check
    assert check is not None and check.compiled, check.describe()
    assert check.tried[-1][1] <= check.tolerance
    res = tr.fit()
    tr.close()
    ref = pf.training.train(load_config("tiny-test", ["train.device=cpu", "train.max_steps=1"]), tmp_path / "e")
    assert res.metrics["loss"] == pytest.approx(ref.metrics["loss"], rel=1e-2)  # (bf16 where the CPU has it)
