"""Shared test fixtures: tiny models and analytic fake networks."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import patchforcing as pf
from patchforcing.utils.compile import randomize_parameters_

torch.set_num_threads(2)


#: a tiny text-to-image PFT (``pf.create_model("PFT-T2I-T/2", **T2I_TINY)``), shared by the T2I tests
T2I_TINY = dict(
    input_size=16,
    in_channels=3,
    text_dim=24,
    depth=2,
    hidden_size=64,
    num_heads=4,
    mapping_width=32,
    refiner_width=48,
    refiner_heads=4,
)


def randomize(model: nn.Module, std: float = 0.05, seed: int = 0) -> nn.Module:
    """Give every trainable weight (incl. the zero-initialised ones) random values."""
    return randomize_parameters_(model, seed, std)


@pytest.fixture
def tiny_pft() -> nn.Module:
    m = pf.create_model("PFT-T/2", input_size=8, in_channels=3, num_classes=5, depth=2, hidden_size=64, num_heads=4)
    return randomize(m).eval()


@pytest.fixture
def tiny_sit() -> nn.Module:
    m = pf.create_model("SiT-T/2", input_size=8, in_channels=3, num_classes=5, depth=2, hidden_size=64, num_heads=4)
    return randomize(m).eval()


class AnalyticModel(nn.Module):
    """A network with a known answer.

    ``v = a + b * x + c_y`` (``c_y`` = label-dependent shift, zero for the null class) and a
    fixed, patch-varying log-variance ``lv(pixel)`` (+ ``label_lv`` for real labels).
    """

    def __init__(
        self,
        size: int = 8,
        channels: int = 2,
        patch: int = 2,
        num_classes: int = 3,
        a: float = 0.5,
        b: float = 0.0,
        label_shift: float = 0.0,
        label_lv: float = 0.0,
        constant_logvar: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        self.patch_size = patch
        self.image_size = (size, size)
        self.in_channels = channels
        self.num_classes = num_classes
        self.num_patches = (size // patch) ** 2
        self.predict_uncertainty = True
        self.per_patch_time = True
        self.a, self.b, self.label_shift, self.label_lv = a, b, label_shift, label_lv
        g = torch.Generator().manual_seed(seed)
        lv = torch.zeros(1, 1, size, size) if constant_logvar else torch.randn(1, 1, size, size, generator=g)
        self.register_buffer("lv", lv)
        self.calls: list[tuple[Tensor, Tensor]] = []  # (t, y) of every call

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor]:
        B = x.shape[0]
        if y is None:
            y = torch.full((B,), self.num_classes, dtype=torch.long)
        self.calls.append((t.clone(), y.clone()))
        real = (y != self.num_classes).float().view(B, 1, 1, 1)
        v = self.a + self.b * x + self.label_shift * real * (y.float().view(B, 1, 1, 1) + 1)
        lv = self.lv.expand(B, 1, *self.image_size) + self.label_lv * real
        return v, lv


@pytest.fixture
def analytic() -> AnalyticModel:
    return AnalyticModel()
