"""The objective: patch-wise interpolation, analytic loss values, stop-gradient, clamp."""

from __future__ import annotations

import math

import pytest
import torch

import patchforcing as pf
from patchforcing.flow import gaussian_nll, interpolate, patch_to_pixel, pixel_to_patch, segment_losses


def test_patch_to_pixel_row_major():
    t = torch.arange(6, dtype=torch.float32).view(1, 6)  # 2 x 3 patch grid
    px = patch_to_pixel(t, 2, 4, 6)[0, 0]
    assert px.shape == (4, 6)
    assert px[0, 0] == 0 and px[1, 1] == 0 and px[0, 2] == 1 and px[0, 5] == 2 and px[2, 0] == 3 and px[3, 5] == 5
    torch.testing.assert_close(pixel_to_patch(patch_to_pixel(t, 2, 4, 6), 2), t)
    with pytest.raises(ValueError, match="do not tile"):
        patch_to_pixel(t, 2, 4, 4)


def test_interpolation_is_patchwise():
    x0, x1 = torch.zeros(1, 2, 4, 4), torch.ones(1, 2, 4, 4)
    t = torch.tensor([[0.0, 0.25, 0.5, 1.0]])
    xt = interpolate(x0, x1, t, 2)
    assert torch.all(xt[0, :, :2, :2] == 0) and torch.all(xt[0, :, :2, 2:] == 0.25)
    assert torch.all(xt[0, :, 2:, :2] == 0.5) and torch.all(xt[0, :, 2:, 2:] == 1.0)


def test_loss_at_zero_init_is_analytic():
    """At initialisation v = 0 and logvar = 0: fm = mean(u^2), nll = 0.5 (log 2pi + mean(u^2))."""
    m = pf.create_model("PFT-T/2", input_size=8, in_channels=3, num_classes=4)
    g = torch.Generator().manual_seed(0)
    x1, x0 = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t = torch.rand(4, 16, generator=g)
    terms = pf.patch_flow_loss(m, x1, torch.tensor([0, 1, 2, 4]), x0=x0, t=t, uncertainty_weight=0.01)
    u2 = ((x1 - x0) ** 2).mean()
    torch.testing.assert_close(terms["fm"], u2)
    torch.testing.assert_close(terms["nll"], 0.5 * (math.log(2 * math.pi) + u2))
    torch.testing.assert_close(terms["loss"], u2 + 0.01 * terms["nll"])
    assert terms["t"].shape == (4, 16)


def test_nll_stop_gradient_and_clamp():
    u = torch.randn(2, 3, 4, 4)
    v = torch.randn(2, 3, 4, 4, requires_grad=True)
    lv = torch.randn(2, 1, 4, 4).mul(3).requires_grad_(True)
    gaussian_nll(u, v, lv).mean().backward()
    assert v.grad is None or torch.count_nonzero(v.grad) == 0  # velocity learns only from fm
    expected = 0.5 * (1 - (u - v.detach()) ** 2 * torch.exp(-lv.detach())).sum(1, keepdim=True) / u.numel()
    torch.testing.assert_close(lv.grad, expected)
    # outside [-30, 20] the clamp gives zero gradient and the clamped value
    lv2 = torch.tensor([-40.0, 25.0, 0.0]).view(1, 1, 1, 3).requires_grad_(True)
    u2 = torch.full((1, 1, 1, 3), 2.0)
    out = gaussian_nll(u2, torch.zeros(1, 1, 1, 3), lv2)
    out.sum().backward()
    assert lv2.grad[0, 0, 0, 0] == 0 and lv2.grad[0, 0, 0, 1] == 0 and lv2.grad[0, 0, 0, 2] != 0
    torch.testing.assert_close(out[0, 0, 0, 1], torch.tensor(0.5 * (math.log(2 * math.pi) + 20 + 4 * math.exp(-20))))


def test_loss_draws_with_generator_and_sampler(tiny_pft):
    x1 = torch.randn(2, 3, 8, 8)
    a = pf.patch_flow_loss(tiny_pft, x1, None, timestep_sampler="ltg", generator=torch.Generator().manual_seed(3))
    b = pf.patch_flow_loss(
        tiny_pft, x1, None, timestep_sampler=pf.make_timestep_sampler("ltg"), generator=torch.Generator().manual_seed(3)
    )
    torch.testing.assert_close(a["loss"], b["loss"])
    assert torch.all(a["t"] <= 1) and torch.all(a["t"] >= 0)


def test_loss_gradients_reach_both_heads(tiny_pft):
    m = tiny_pft.train()
    terms = pf.patch_flow_loss(
        m, torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), generator=torch.Generator().manual_seed(0)
    )
    terms["loss"].backward()
    w = m.final_layer.linear.weight.grad  # rows: (pr, pc, channel) with channel fastest; channel 3 = logvar
    assert torch.count_nonzero(w.view(4, 4, -1)[:, 3]) > 0 and torch.count_nonzero(w.view(4, 4, -1)[:, :3]) > 0


def test_sit_loss_has_no_nll(tiny_sit):
    terms = pf.patch_flow_loss(tiny_sit, torch.randn(2, 3, 8, 8), None, timestep_sampler="uniform")
    assert terms["nll"] == 0 and terms["loss"] == terms["fm"]
    with pytest.raises(ValueError, match="one time per image"):
        pf.patch_flow_loss(tiny_sit, torch.randn(2, 3, 8, 8), None, timestep_sampler="ltg")


def test_segment_losses_shape(tiny_pft):
    out = segment_losses(
        tiny_pft, torch.randn(4, 3, 8, 8), None, num_segments=8, generator=torch.Generator().manual_seed(0)
    )
    assert out.shape == (8,) and torch.all(out > 0)


class _LinearVelocity(torch.nn.Module):
    """``v = 0.3 + 0.7 * x_t`` (no log-variance): the segment losses have a closed form in t."""

    patch_size = 2
    num_patches = 16
    per_patch_time = True

    def __init__(self):
        super().__init__()
        self.times: list[torch.Tensor] = []

    def forward(self, x, t, y):
        self.times.append(t.clone())
        return 0.3 + 0.7 * x, None


@pytest.mark.parametrize("num_segments", [8, 3])
def test_segment_losses_match_manual_midpoints(num_segments):
    """Segment j evaluates every image at t = (j + 0.5) / S with one shared noise draw; catches
    shifted midpoints (j / S, (j + 1) / S), fresh noise per segment, or a wrong target."""
    m = _LinearVelocity()
    x1 = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 3])
    out = segment_losses(m, x1, y, num_segments=num_segments, generator=torch.Generator().manual_seed(7))
    x0 = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    expected = []
    for j in range(num_segments):
        t = (j + 0.5) / num_segments
        assert torch.equal(m.times[j], torch.full((4,), t))
        xt = t * x1 + (1 - t) * x0
        expected.append(((0.3 + 0.7 * xt - (x1 - x0)) ** 2).mean())
    torch.testing.assert_close(out, torch.stack(expected), rtol=1e-5, atol=1e-6)
    assert len(m.times) == num_segments
