"""Samplers: identities between them, exact call/NFE counts, the mask rule, guidance."""

from __future__ import annotations

import pytest
import torch

import patchforcing as pf
from patchforcing.sampling import certain_mask, make_sampler, make_time_grid

from conftest import AnalyticModel


def _noise(model, B=3, seed=0):
    return torch.randn(B, model.in_channels, *model.image_size, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# the difficulty mask
# --------------------------------------------------------------------------------------------


def test_quantile_rule_marks_102_of_256():
    g = torch.Generator().manual_seed(0)
    logvar = torch.randn(5, 1, 32, 32, generator=g)  # 256 patches of 2x2, distinct values
    mask = certain_mask(logvar, 0.4, 2)
    assert mask.shape == (5, 256)
    assert mask.sum(1).tolist() == [102] * 5
    # certain = strictly below the threshold: the certain patches are the 102 smallest
    var = torch.nn.functional.avg_pool2d(logvar.exp(), 2).flatten(1)
    for b in range(5):
        order = var[b].argsort()
        assert set(order[:102].tolist()) == set(mask[b].nonzero().flatten().tolist())


def test_quantile_rule_edge_cases():
    flat = torch.zeros(2, 1, 8, 8)
    assert certain_mask(flat, 0.4, 2).sum() == 0  # ties: nothing is strictly below
    lv = torch.randn(2, 1, 8, 8)
    assert certain_mask(lv, 0.0, 2).sum() == 0
    assert certain_mask(lv, 1.0, 2).sum(1).tolist() == [15, 15]  # all but the largest
    assert certain_mask(lv, 0.4, 4).shape == (2, 4)  # pooling by the model's patch size


# --------------------------------------------------------------------------------------------
# call counts and NFE
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler,opts,calls", [
    ("euler", {}, 6), ("euler_pf", {}, 6), ("dual_loop", {"n_inner": 4}, 24), ("look_ahead", {}, 11),
    ("dual_loop", {"n_inner": 2}, 12),
])
def test_call_counts_six_uniform_steps(analytic, sampler, opts, calls):
    res = pf.sample(analytic, _noise(analytic), sampler, steps=6, **opts)
    assert res.calls == calls and res.nfe == calls and len(analytic.calls) == calls
    y = torch.tensor([0, 1, 2])
    res = pf.sample(analytic, _noise(analytic), sampler, steps=6, y=y, cfg_scale=2.0, **opts)
    assert res.calls == calls and res.nfe == 2 * calls


def test_guidance_interval_counts(analytic):
    y = torch.tensor([0, 1, 2])
    res = pf.sample(analytic, _noise(analytic), "euler_pf", steps=10, y=y, cfg_scale=3.0, guidance_interval=(0.3, 0.7))
    # step starts 0, .1, ..., .9: guided at .3 .4 .5 .6 .7 (float grid: 0.3 is 0.3000000000000000444 > 0.3)
    guided = sum(1 for s in make_time_grid(10)[:-1].tolist() if 0.3 <= s <= 0.7)
    assert res.calls == 10 and res.nfe == 10 + guided


@pytest.mark.parametrize("sampler", ["euler_pf", "dual_loop", "look_ahead"])
@pytest.mark.parametrize("budget", [7, 20, 50])
def test_nfe_budget_picks_largest_fitting_steps(analytic, sampler, budget):
    res = pf.sample(analytic, _noise(analytic), sampler, nfe=budget)
    assert res.nfe <= budget
    bigger = pf.sample(analytic, _noise(analytic), sampler, steps=res.steps + 1)
    assert bigger.nfe > budget


def test_nfe_budget_with_guidance(analytic):
    y = torch.tensor([0, 1, 2])
    res = pf.sample(analytic, _noise(analytic), "look_ahead", nfe=40, y=y, cfg_scale=2.0)
    assert res.nfe <= 40 and res.nfe == 2 * res.calls


# --------------------------------------------------------------------------------------------
# identities
# --------------------------------------------------------------------------------------------


def test_dual_loop_with_one_inner_step_is_euler_pf(tiny_pft):
    noise = _noise(tiny_pft)
    y = torch.tensor([0, 1, 5])
    a = pf.sample(tiny_pft, noise, "euler_pf", steps=7, y=y, cfg_scale=2.5)
    b = pf.sample(tiny_pft, noise, "dual_loop", steps=7, y=y, cfg_scale=2.5, n_inner=1)
    assert torch.equal(a.x, b.x) and a.calls == b.calls == 7


def test_look_ahead_without_context_is_euler_pf(tiny_pft):
    noise = _noise(tiny_pft)
    y = torch.tensor([0, 1, 5])
    a = pf.sample(tiny_pft, noise, "euler_pf", steps=8, y=y)
    b = pf.sample(tiny_pft, noise, "look_ahead", steps=8, y=y, context_ratio=1.0)
    torch.testing.assert_close(a.x, b.x, atol=1e-6, rtol=0)
    assert b.calls == 8 + 7  # the first step (s = 0 <= 0.05) makes one call


def test_euler_and_euler_pf_agree(tiny_pft):
    noise = _noise(tiny_pft)
    a = pf.sample(tiny_pft, noise, "euler", steps=5)
    b = pf.sample(tiny_pft, noise, "euler_pf", steps=5)
    torch.testing.assert_close(a.x, b.x, atol=1e-6, rtol=0)


@pytest.mark.parametrize("sampler,opts", [("euler_pf", {}), ("dual_loop", {"n_inner": 3}), ("look_ahead", {}),
                                          ("look_ahead", {"context_ratio": 2.0, "p": 0.7})])
def test_every_patch_travels_exactly_from_0_to_1(sampler, opts):
    """With v = a constant, every sampler ends at noise + a, whatever the masks (they vary here)."""
    model = AnalyticModel(a=0.5)
    noise = _noise(model)
    res = pf.sample(model, noise, sampler, steps=9, **opts)
    torch.testing.assert_close(res.x, noise + 0.5, atol=1e-5, rtol=0)


def test_linear_ode_matches_euler_product():
    """v = b x: Euler gives x * prod(1 + b ds); all-uncertain dual_loop is Euler on the fine grid."""
    model = AnalyticModel(a=0.0, b=-0.7, constant_logvar=True)
    noise = _noise(model)
    res = pf.sample(model, noise, "euler_pf", steps=5)
    torch.testing.assert_close(res.x, noise * (1 - 0.7 / 5) ** 5)
    dl = pf.sample(model, noise, "dual_loop", steps=5, n_inner=4)  # constant logvar: nothing certain
    torch.testing.assert_close(dl.x, noise * (1 - 0.7 / 20) ** 20)
    la = pf.sample(model, noise, "look_ahead", steps=5)  # nothing certain: no context, Euler
    torch.testing.assert_close(la.x, res.x)


def test_dual_loop_times_and_masks(analytic):
    pf.sample(analytic, _noise(analytic, B=2), "dual_loop", steps=2, n_inner=4, p=0.4)
    ts = [t for t, _ in analytic.calls]
    assert len(ts) == 8
    assert ts[0].shape == (2,) and torch.all(ts[0] == 0)
    mask = certain_mask(analytic.lv.expand(2, 1, 8, 8), 0.4, 2)
    for j in range(1, 4):  # certain at s_{k+1} = 0.5, uncertain at j / 8
        t = ts[j]
        assert t.shape == (2, 16)
        torch.testing.assert_close(t[mask], torch.full_like(t[mask], 0.5))
        torch.testing.assert_close(t[~mask], torch.full_like(t[~mask], j * 0.125))


def test_look_ahead_context_times_and_early_rule():
    model = AnalyticModel(a=0.0, label_shift=1.0, label_lv=0.3)
    y = torch.tensor([0, 1, 2])
    noise = _noise(model)
    res = pf.sample(model, noise, "look_ahead", steps=4, y=y, cfg_scale=3.0, context_ratio=1.5)
    ts = [t for t, _ in model.calls]
    assert res.calls == 1 + 2 * 3 and len(ts) == 7
    # s = 0.25: second call has certain patches at 0.375, the rest at 0.25
    t_ctx = ts[2][3:]  # doubled batch: null half first
    assert set(t_ctx.unique().tolist()) == {0.25, 0.375}
    # early step (s = 0): plain Euler with the *conditional* velocity c_y = y + 1 (not the guided one)
    model.calls.clear()
    first = pf.sample(model, noise, "look_ahead", time_grid=[0.0, 0.04, 1.0], y=y, cfg_scale=3.0, record=True)
    x_after_early = first.record[1].x  # state at the start of the second step
    torch.testing.assert_close(x_after_early, noise + 0.04 * (y.float() + 1).view(3, 1, 1, 1))


def test_guided_logvar_combines_both_outputs():
    model = AnalyticModel(a=0.0, label_lv=0.5)
    y = torch.tensor([0, 1, 2])
    res = pf.sample(model, _noise(model), "euler_pf", steps=2, y=y, cfg_scale=4.0, record=True)
    lv = res.record[0].logvar  # lv_u + w (lv_c - lv_u) = lv + 4 * 0.5
    torch.testing.assert_close(lv, model.lv.expand(3, 1, 8, 8) + 2.0)
    res = pf.sample(model, _noise(model), "euler_pf", steps=2, y=y, cfg_scale=4.0, record=True, guide_uncertainty=False)
    torch.testing.assert_close(res.record[0].logvar, model.lv.expand(3, 1, 8, 8) + 0.5)


def test_custom_time_grid_is_used(analytic):
    grid = [0.0, 0.1, 0.3, 0.6, 1.0]
    for sampler in ["euler_pf", "dual_loop", "look_ahead"]:
        analytic.calls.clear()
        res = pf.sample(analytic, _noise(analytic, B=1), sampler, time_grid=grid, record=True)
        assert res.steps == 4 and res.grid.tolist() == grid
        assert sorted({r.s for r in res.record}) == grid[:-1]
    res = pf.sample(analytic, _noise(analytic, B=1), "euler_pf", steps=3, time_grid=lambda k: torch.linspace(0, 1, k + 1) ** 2)
    assert res.grid.tolist() == pytest.approx([0, 1 / 9, 4 / 9, 1])
    with pytest.raises(ValueError, match="strictly increasing"):
        pf.sample(analytic, _noise(analytic), "euler_pf", time_grid=[0.0, 0.5, 0.5, 1.0])


def test_record_contents(tiny_pft):
    res = pf.sample(tiny_pft, _noise(tiny_pft), "look_ahead", steps=4, record=True)
    assert len(res.record) == res.calls
    r = res.record[-1]
    assert r.t.shape == (3, 16) and r.mask.shape == (3, 16) and r.logvar.shape == (3, 1, 8, 8)
    assert r.x1_hat.shape == (3, 3, 8, 8) and r.x.device.type == "cpu"
    assert pf.sample(tiny_pft, _noise(tiny_pft), "look_ahead", steps=4).record is None


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


def test_clear_errors(tiny_pft, tiny_sit):
    noise = _noise(tiny_pft)
    with pytest.raises(ValueError, match="unknown sampler 'heun'.*available"):
        pf.sample(tiny_pft, noise, "heun")
    with pytest.raises(ValueError, match="does not take option.*n_inner"):
        pf.sample(tiny_pft, noise, "look_ahead", n_inner=3)
    with pytest.raises(ValueError, match="uncertainty head"):
        pf.sample(tiny_sit, noise, "dual_loop")
    with pytest.raises(ValueError, match="noise must have shape"):
        pf.sample(tiny_pft, torch.randn(2, 4, 8, 8))
    with pytest.raises(ValueError, match="needs labels"):
        pf.sample(tiny_pft, noise, cfg_scale=2.0)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\]"):
        pf.sample(tiny_pft, noise, y=torch.tensor([0, 1, 9]))
    with pytest.raises(ValueError, match="either an NFE budget or steps"):
        pf.sample(tiny_pft, noise, steps=5, nfe=10)
    with pytest.raises(ValueError, match="n_inner"):
        make_sampler("dual_loop", n_inner=0)
    # SiT with plain Euler works
    assert pf.sample(tiny_sit, noise, "euler", steps=3).calls == 3


@pytest.mark.parametrize("sampler", ["euler_pf", "dual_loop", "look_ahead"])
def test_samples_do_not_depend_on_batch_composition(tiny_pft, sampler):
    """Bitwise: a sample is the same whether it is drawn alone or with others (CPU, fp32)."""
    noise = _noise(tiny_pft, B=7)
    y = torch.tensor([0, 1, 2, 3, 4, 5, 0])
    full = pf.sample(tiny_pft, noise, sampler, steps=5, y=y, cfg_scale=1.5).x
    alone = torch.cat([pf.sample(tiny_pft, noise[i:i + 1], sampler, steps=5, y=y[i:i + 1], cfg_scale=1.5).x for i in range(7)])
    assert torch.equal(full, alone)
