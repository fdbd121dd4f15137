"""``torch.compile``, checked against eager before it is trusted with a training run.

A compiler bug does not announce itself: on one CPU of the machines this project runs on (an Intel
Xeon, family 6 model 207, AMX), torch 2.13's inductor generates AVX-512 code for the bf16 training
step whose backward returns NaN gradients, while the forward pass and the same graph generated as
AVX2 code are right. :func:`checked_compile` therefore runs one forward/backward through the compiled
module and through the eager one, on a copy with random weights (a zero-initialised output layer
would make most gradients 0 and hide wrong ones), and compares the gradients. If they disagree it
tries the next inductor setting (on a CPU: AVX2 code, ``cpp.simdlen=256``), and if none agrees it
returns the eager module. The caller's module, its gradients and the global RNG are left as they
were.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["CPU_FALLBACK_OPTIONS", "CompileCheck", "checked_compile", "gradient_error", "randomize_parameters_"]

#: inductor settings tried after the default one on a CPU: AVX2 instead of AVX-512 code
CPU_FALLBACK_OPTIONS: tuple[dict[str, Any], ...] = ({"cpp.simdlen": 256},)


@dataclass
class CompileCheck:
    """What :func:`checked_compile` tried and chose.

    Attributes:
        compiled: whether the returned callable is compiled (``False``: the eager module).
        options: the inductor options of the chosen compilation (``{}``: the defaults; ``None``: eager).
        tried: ``(options, error)`` per compilation tried, in order; ``error`` is :func:`gradient_error`
            (``inf`` for non-finite gradients, ``nan`` when the compiled call raised).
        tolerance: the largest error accepted.
    """

    compiled: bool
    options: dict[str, Any] | None
    tried: list[tuple[dict[str, Any], float]] = field(default_factory=list)
    tolerance: float = 0.1

    @property
    def fell_back(self) -> bool:
        """The default compilation was rejected."""
        return bool(self.tried) and self.options != self.tried[0][0]

    def describe(self) -> str:
        """One line for the log: what was rejected, and what runs."""
        parts = [f"{_fmt(o)}: {'failed' if math.isnan(e) else f'gradient error {e:.3g}'}" for o, e in self.tried]
        chosen = f"compiled with {_fmt(self.options)}" if self.compiled else "eager (no compilation agreed with it)"
        return f"torch.compile checked against eager (tolerance {self.tolerance:g}; {'; '.join(parts)}) -> {chosen}"


def _fmt(options: dict[str, Any] | None) -> str:
    if not options:
        return "the default inductor options"
    return ", ".join(f"{k}={v}" for k, v in options.items())


def randomize_parameters_(module: nn.Module, seed: int = 0, std: float = 0.05) -> nn.Module:
    """Overwrite every trainable floating-point parameter of ``module`` (the zero-initialised ones too)
    with ``N(0, std^2)`` draws from a private generator, in parameter order (the global RNG is not
    used); frozen ones (``requires_grad=False``) keep their values. Returns ``module``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad and p.is_floating_point():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * std)
    return module


def gradient_error(got: Sequence[Tensor | None], want: Sequence[Tensor | None]) -> float:
    """The worst relative difference ``||got - want|| / ||want||`` over parameters; ``inf`` if any
    gradient is not finite, or if one side has a gradient where the other has none.

    Parameters whose reference gradient is below ``1e-6`` of the largest one are compared against
    that floor instead (their relative error says nothing in bf16).
    """
    if len(got) != len(want):
        return math.inf
    norms = [float(w.float().norm()) if w is not None else 0.0 for w in want]
    floor = 1e-6 * max(norms, default=0.0)
    worst = 0.0
    for a, b, nb in zip(got, want, norms):
        if (a is None) != (b is None):
            return math.inf
        if a is None or b is None:
            continue
        if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
            return math.inf
        diff = float((a.float() - b.float()).norm())
        worst = max(worst, diff / max(nb, floor, 1e-30))
    return worst


def _gradients(module: nn.Module, fn: Callable[..., Any], probe: Callable[[Callable[..., Any]], None]):
    for p in module.parameters():
        p.grad = None
    probe(fn)
    return [p.grad.detach().clone() if p.grad is not None else None for p in module.parameters()]


def checked_compile(
    module: nn.Module,
    probe: Callable[[Callable[..., Any]], None],
    *,
    fallbacks: Sequence[dict[str, Any]] = (),
    tolerance: float = 0.1,
    seed: int = 0,
    compile_fn: Callable[..., Callable[..., Any]] | None = None,
) -> tuple[Callable[..., Any], CompileCheck]:
    """``torch.compile(module)`` whose gradients agree with eager, or ``module`` itself.

    Args:
        module: the network to compile (left untouched: the check runs on a copy).
        probe: ``probe(fn)`` runs one training-like forward and backward through ``fn`` (the copy,
            compiled or not), e.g. a loss on a batch of the real shapes and dtypes under the real
            autocast. It must draw its randomness from private generators of fixed seed, so that every
            call sees the same inputs.
        fallbacks: inductor options tried, in order, when the default compilation disagrees
            (:data:`CPU_FALLBACK_OPTIONS` on a CPU).
        tolerance: the largest :func:`gradient_error` accepted.
        seed: seed of the copy's random weights.
        compile_fn: ``compile_fn(module, options=...)``; default :func:`torch.compile`.

    Returns:
        ``(callable, check)``: ``torch.compile(module, options=chosen)`` or ``module``, and the record.
    """
    compile_fn = compile_fn or torch.compile
    twin = randomize_parameters_(copy.deepcopy(module), seed)
    was_training = twin.training
    tried: list[tuple[dict[str, Any], float]] = []
    with torch.random.fork_rng(devices=_cuda_devices(module)):
        want = _gradients(twin, twin, probe)
        for options in [{}, *fallbacks]:
            try:
                got = _gradients(twin, compile_fn(twin, options=dict(options) or None), probe)
                error = gradient_error(got, want)
            except Exception:  # noqa: BLE001 - a compiler failure is one outcome of the check
                error = math.nan
            twin.train(was_training)
            tried.append((dict(options), error))
            if error <= tolerance:
                del twin
                return compile_fn(module, options=dict(options) or None), CompileCheck(
                    True, dict(options), tried, tolerance
                )
    return module, CompileCheck(False, None, tried, tolerance)


def _cuda_devices(module: nn.Module) -> list[int]:
    return sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})
