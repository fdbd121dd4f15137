"""Exponential moving average of model weights, updated every optimiser step."""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["EMA", "ema_decay"]


def ema_decay(step: int, decay: float, warmup: bool = True) -> float:
    """Decay used at optimiser step ``step`` (0-based).

    With ``warmup``, ``min(decay, (1 + step) / (10 + step))``: the average forgets the
    zero-output initialisation quickly in short runs (docs/method.md section 3).
    """
    return min(decay, (1.0 + step) / (10.0 + step)) if warmup else decay


class EMA:
    """A frozen copy of ``model`` tracking ``ema = d * ema + (1 - d) * model`` (float32 math).

    Args:
        model: the trained network (its current weights seed the average).
        decay: target decay (0.9999 in the paper).
        warmup: use :func:`ema_decay`'s warm-up.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        self.decay = decay
        self.warmup = warmup
        self.model = copy.deepcopy(model).eval()
        self.model.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> float:
        """Blend ``model`` into the average after optimiser step ``step``; returns the decay used."""
        d = ema_decay(step, self.decay, self.warmup)
        ema_params = [p for p in self.model.parameters()]
        src_params = [p for p in model.parameters()]
        trainable = [(e, s) for e, s, r in zip(ema_params, src_params, (p.requires_grad for p in src_params)) if r]
        if trainable:
            e, s = zip(*trainable)
            torch._foreach_lerp_(list(e), [x.detach() for x in s], 1.0 - d)
        return d

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state, strict=True)
