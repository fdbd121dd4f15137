"""Samplers: identities between them, exact call/NFE counts, the mask rule, guidance, option
checks, non-finite detection, NFE-budget planning."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import patchforcing as pf
from conftest import AnalyticModel
from patchforcing.sampling import (
    SAMPLERS,
    DualLoop,
    GuidedModel,
    NonFiniteSampleError,
    certain_mask,
    make_sampler,
    make_time_grid,
    steps_for_nfe,
)
from patchforcing.sampling import api as sampling_api

#: samplers with a difficulty mask (a ``quantile`` option), from the registry
MASK_SAMPLERS = sorted(n for n, c in SAMPLERS.items() if "quantile" in c.__dataclass_fields__)
#: samplers that need a PFT (uncertainty head, per-patch times)
PFT_SAMPLERS = sorted(n for n, c in SAMPLERS.items() if c.needs_uncertainty)


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


@pytest.mark.parametrize(
    "sampler,opts,calls",
    [
        ("euler", {}, 6),
        ("euler_pf", {}, 6),
        ("dual_loop", {"n_inner": 4}, 24),
        ("look_ahead", {}, 11),
        ("dual_loop", {"n_inner": 2}, 12),
    ],
)
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


@pytest.mark.parametrize("sampler", MASK_SAMPLERS)
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


@pytest.mark.parametrize(
    "sampler,opts",
    [
        ("euler_pf", {}),
        ("dual_loop", {"n_inner": 3}),
        ("look_ahead", {}),
        ("look_ahead", {"context_ratio": 2.0, "quantile": 0.7}),
    ],
)
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
    pf.sample(analytic, _noise(analytic, B=2), "dual_loop", steps=2, n_inner=4, quantile=0.4)
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
    for sampler in MASK_SAMPLERS:
        analytic.calls.clear()
        res = pf.sample(analytic, _noise(analytic, B=1), sampler, time_grid=grid, record=True)
        assert res.steps == 4 and res.grid.tolist() == grid
        assert sorted({r.s for r in res.record}) == grid[:-1]
    res = pf.sample(
        analytic, _noise(analytic, B=1), "euler_pf", steps=3, time_grid=lambda k: torch.linspace(0, 1, k + 1) ** 2
    )
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


@pytest.mark.parametrize("sampler", MASK_SAMPLERS)
def test_samples_do_not_depend_on_batch_composition(tiny_pft, sampler):
    """Bitwise: a sample is the same whether it is drawn alone or with others (CPU, fp32)."""
    noise = _noise(tiny_pft, B=7)
    y = torch.tensor([0, 1, 2, 3, 4, 5, 0])
    full = pf.sample(tiny_pft, noise, sampler, steps=5, y=y, cfg_scale=1.5).x
    alone = torch.cat(
        [pf.sample(tiny_pft, noise[i : i + 1], sampler, steps=5, y=y[i : i + 1], cfg_scale=1.5).x for i in range(7)]
    )
    assert torch.equal(full, alone)


# --------------------------------------------------------------------------------------------
# look-ahead under CFG: a hand-built reference step (docs/method.md, section 4)
# --------------------------------------------------------------------------------------------


def _reference_look_ahead_step(model, x, y, w, s, s_next, quantile=0.4, ratio=1.4):
    """One guided look-ahead step written from docs/method.md section 4, independently of the library."""
    B, P = x.shape[0], model.patch_size
    null = torch.full_like(y, model.num_classes)

    def guided(xx, tt):  # doubled batch, null labels first; both outputs guided
        v2, lv2 = model(torch.cat([xx, xx]), torch.cat([tt, tt]), torch.cat([null, y]))
        (v_u, v_c), (lv_u, lv_c) = v2.chunk(2), lv2.chunk(2)
        return v_u + w * (v_c - v_u), lv_u + w * (lv_c - lv_u), v_c

    v, lv, v_c = guided(x, torch.full((B,), s))
    var = F.avg_pool2d(lv.exp(), P).flatten(1).double()  # (B, N) one value per patch
    thr = torch.quantile(var.repeat_interleave(P * P, dim=1), quantile, dim=1, keepdim=True)
    mask = var < thr  # certain patches
    side = x.shape[-1] // P
    mpix = mask.view(B, 1, side, side).repeat_interleave(P, 2).repeat_interleave(P, 3)
    s_ctx = min(ratio * s, 1.0)
    x_ctx = torch.where(mpix, x + (s_ctx - s) * v_c, x)  # the context comes from the CONDITIONAL velocity
    t_ctx = torch.where(mask, s_ctx, s).to(x.dtype)
    v_ctx, _, _ = guided(x_ctx, t_ctx)
    return x + (s_next - s) * torch.where(mpix, v, v_ctx), mask


def test_look_ahead_step_with_cfg_matches_the_method(tiny_pft):
    """Catches a context built from the guided velocity instead of the conditional one."""
    noise = _noise(tiny_pft, B=4, seed=3)
    y = torch.tensor([0, 1, 3, 4])
    x = noise * 0.6 + 0.1  # some state at s = 0.5
    with torch.no_grad():
        expected, mask = _reference_look_ahead_step(tiny_pft, x, y, 3.0, 0.5, 0.75)
    assert 0 < int(mask.sum()) < mask.numel()  # a real mix of certain and uncertain patches
    res = pf.sample(tiny_pft, x, "look_ahead", time_grid=[0.5, 0.75], y=y, cfg_scale=3.0)
    assert res.calls == 2 and res.nfe == 4
    assert torch.equal(res.x, expected)


# --------------------------------------------------------------------------------------------
# the quantile option and its deprecated alias p
# --------------------------------------------------------------------------------------------


def test_quantile_option_and_deprecated_p_alias(tiny_pft):
    for name in MASK_SAMPLERS:
        with pytest.warns(DeprecationWarning, match="quantile"):
            old = make_sampler(name, p=0.3)
        assert old == make_sampler(name, quantile=0.3) and old.options()["quantile"] == 0.3
        assert "p" not in old.options()
        with pytest.raises(ValueError, match="not both"):
            make_sampler(name, p=0.3, quantile=0.3)
        with pytest.warns(DeprecationWarning):
            assert old.p == 0.3
    with pytest.warns(DeprecationWarning):
        assert DualLoop(p=0.25, n_inner=2) == DualLoop(0.25, 2) == DualLoop(quantile=0.25, n_inner=2)
    noise, y = _noise(tiny_pft), torch.tensor([0, 1, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new name warns about nothing
        new = pf.sample(tiny_pft, noise, "dual_loop", steps=3, y=y, cfg_scale=2.0, quantile=0.7)
    with pytest.warns(DeprecationWarning):
        old = pf.sample(tiny_pft, noise, "dual_loop", steps=3, y=y, cfg_scale=2.0, p=0.7)
    assert torch.equal(new.x, old.x) and new.options == old.options == {"quantile": 0.7, "n_inner": 4}
    with pytest.raises(ValueError, match="not both"):
        pf.sample(tiny_pft, noise, "look_ahead", steps=3, p=0.7, quantile=0.7)
    with pytest.raises(ValueError, match="does not take option"):
        pf.sample(tiny_pft, noise, "euler", steps=3, quantile=0.5)


# --------------------------------------------------------------------------------------------
# options checked up front
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"cfg_scale": math.nan}, "cfg_scale"),
        ({"cfg_scale": math.inf}, "cfg_scale"),
        ({"cfg_scale": -1.0}, "cfg_scale"),
        ({"cfg_scale": "2"}, "cfg_scale"),
        ({"steps": 0}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"steps": True}, "steps"),
        ({"steps": None, "nfe": 0}, "nfe"),
        ({"steps": None, "nfe": 7.5}, "nfe"),
        ({"cfg_scale": 2.0, "guidance_interval": (0.7, 0.3)}, "guidance_interval"),
        ({"cfg_scale": 2.0, "guidance_interval": (0.5, 0.5)}, "guidance_interval"),
        ({"cfg_scale": 2.0, "guidance_interval": (-0.1, 0.5)}, "guidance_interval"),
        ({"cfg_scale": 2.0, "guidance_interval": (0.2, 1.5)}, "guidance_interval"),
        ({"cfg_scale": 2.0, "guidance_interval": (0.2, math.nan)}, "guidance_interval"),
        ({"cfg_scale": 2.0, "guidance_interval": (0.2,)}, "guidance_interval"),
        ({"quantile": 1.5}, "quantile"),
        ({"quantile": math.nan}, "quantile"),
        ({"sampler": "dual_loop", "n_inner": 0}, "n_inner"),
        ({"sampler": "dual_loop", "n_inner": 2.5}, "n_inner"),
        ({"context_ratio": 0.9}, "context_ratio"),
        ({"context_ratio": math.nan}, "context_ratio"),
        ({"early_t": math.nan}, "early_t"),
    ],
)
def test_invalid_options_are_refused_before_any_call(analytic, kwargs, match):
    kwargs = {"sampler": "look_ahead", "steps": 4, **kwargs}
    sampler = kwargs.pop("sampler")
    if sampler == "dual_loop":
        kwargs.pop("context_ratio", None)
    with pytest.raises(ValueError, match=match):
        pf.sample(analytic, _noise(analytic), sampler, y=torch.tensor([0, 1, 2]), **kwargs)
    assert analytic.calls == []


def test_edge_options_that_are_allowed(analytic):
    y = torch.tensor([0, 1, 2])
    # cfg 0 is the unconditional model (still a doubled batch); the interval may span [0, 1]
    res = pf.sample(analytic, _noise(analytic), "euler_pf", steps=4, y=y, cfg_scale=0.0, guidance_interval=(0.0, 1.0))
    assert res.nfe == 8
    for q in (0.0, 1.0):  # the quantile rule is defined on [0, 1] (nothing / all but the largest certain)
        assert pf.sample(analytic, _noise(analytic), "dual_loop", steps=2, quantile=q).calls == 8


# --------------------------------------------------------------------------------------------
# non-finite samples
# --------------------------------------------------------------------------------------------


class _BreaksAtCall(AnalyticModel):
    """An analytic model whose output turns NaN (or inf) from network call ``bad`` on."""

    def __init__(self, bad: int, value: float = math.nan, in_logvar: bool = False, **kw):
        super().__init__(**kw)
        self.bad, self.value, self.in_logvar = bad, value, in_logvar

    def forward(self, x, t, y):
        v, lv = super().forward(x, t, y)
        if len(self.calls) - 1 >= self.bad:
            if self.in_logvar:
                lv = lv.clone()
                lv[0, 0, 0, 0] = self.value
            else:
                v = v.clone()
                v[-1, -1, -1, -1] = self.value
        return v, lv


@pytest.mark.parametrize(
    "sampler,opts,bad,step",
    [
        ("euler", {}, 3, 3),
        ("euler_pf", {}, 0, 0),
        ("dual_loop", {"n_inner": 2}, 5, 2),
        ("look_ahead", {}, 4, 2),  # look_ahead calls: step 0 -> 1 (early), steps 1, 2, ... -> 2 each
    ],
)
def test_nonfinite_output_names_the_first_call_and_step(sampler, opts, bad, step):
    for value, in_logvar in ((math.nan, False), (math.inf, True)):
        model = _BreaksAtCall(bad, value, in_logvar)
        with pytest.raises(NonFiniteSampleError, match=rf"call {bad} \(step {step},") as err:
            pf.sample(model, _noise(model), sampler, steps=5, y=torch.tensor([0, 1, 2]), cfg_scale=2.0, **opts)
        assert (err.value.call, err.value.step) == (bad, step)
        assert isinstance(err.value, ValueError)


def test_nan_weights_and_nan_noise_are_errors(tiny_pft):
    noise = _noise(tiny_pft)
    with torch.no_grad():
        tiny_pft.final_layer.linear.weight[0, 0] = math.nan
    with pytest.raises(NonFiniteSampleError, match=r"call 0 \(step 0, s = 0\)"):
        pf.sample(tiny_pft, noise, "euler_pf", steps=3)
    bad_noise = noise.clone()
    bad_noise[0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="noise holds NaN"):
        pf.sample(AnalyticModel(channels=3), bad_noise, "euler_pf", steps=3)


def test_overflowed_state_is_an_error():
    model = AnalyticModel(a=3.0e38)  # every output is finite; the state overflows float32
    noise = torch.full((1, 2, 8, 8), 3.0e38)
    with pytest.raises(NonFiniteSampleError, match="overflowed") as err:
        pf.sample(model, noise, "euler", time_grid=[0.0, 1.0])
    assert err.value.call is None and err.value.step == 0


# --------------------------------------------------------------------------------------------
# NFE budgets: a constant number of plans, the same answers as the full scan
# --------------------------------------------------------------------------------------------


class _Labels(torch.nn.Module):
    num_classes = 5


_VARIANTS = [(name, {}) for name in SAMPLERS] + [("dual_loop", {"n_inner": 3}), ("look_ahead", {"early_t": 0.3})]
_GUIDANCE = [
    (None, 1.0, None),
    (True, 2.0, None),
    (True, 2.0, (0.3, 0.7)),
    (True, 3.0, (0.0, 0.05)),
    (True, 3.0, (0.3, 0.34)),
    (True, 1.5, (0.5, 1.0)),
]


@pytest.mark.parametrize("guidance", _GUIDANCE, ids=str)
def test_steps_for_nfe_matches_the_full_scan(guidance):
    """The old rule: the largest K in [1, budget] with plan(K).nfe <= budget (plans from Sampler.plan)."""
    labels, w, interval = guidance
    guided = GuidedModel(_Labels(), torch.tensor([0, 1]) if labels else None, w, interval)
    for name, opts in _VARIANTS:
        sampler = make_sampler(name, **opts)
        nfe = [0] + [sampler.plan(make_time_grid(k), guided.guided_at)[1] for k in range(1, 301)]
        for budget in range(1, 301):
            fits = [k for k in range(1, budget + 1) if nfe[k] <= budget]
            if fits:
                assert steps_for_nfe(sampler, budget, guided) == max(fits), (name, opts, budget)
            else:
                with pytest.raises(ValueError, match="no step count fits"):
                    steps_for_nfe(sampler, budget, guided)
        for k in (1, 7, 100, 299):  # the fast plan agrees with the step-by-step one
            assert sampling_api.plan_run(sampler, make_time_grid(k), guided) == sampler.plan(
                make_time_grid(k), guided.guided_at
            )


def test_steps_for_nfe_callable_grid_matches_the_full_scan():
    guided = GuidedModel(_Labels(), torch.tensor([0, 1]), 2.0, (0.2, 0.6))
    grid = lambda k: torch.linspace(0, 1, k + 1) ** 2  # noqa: E731
    sampler = make_sampler("look_ahead")
    nfe = [0] + [sampler.plan(make_time_grid(k, grid), guided.guided_at)[1] for k in range(1, 121)]
    for budget in range(1, 121):
        fits = [k for k in range(1, budget + 1) if nfe[k] <= budget]
        assert steps_for_nfe(sampler, budget, guided, grid) == max(fits)


def test_large_nfe_budget_plans_a_few_grids(monkeypatch):
    plans = []
    real = sampling_api.plan_run
    monkeypatch.setattr(sampling_api, "plan_run", lambda s, grid, g: plans.append(grid.numel()) or real(s, grid, g))
    guided = GuidedModel(_Labels(), torch.tensor([0, 1]), 2.0, (0.3, 0.7))
    budget = 100_000
    for name, opts in _VARIANTS:
        sampler = make_sampler(name, **opts)
        plans.clear()
        k = steps_for_nfe(sampler, budget, guided)
        assert 1 <= len(plans) <= 100, (name, len(plans))  # was one plan per K in [1, budget]
        nfe_k, nfe_next = (sampler.plan(make_time_grid(n), guided.guided_at)[1] for n in (k, k + 1))
        assert nfe_k <= budget < nfe_next
    plain = GuidedModel(_Labels(), None)
    assert steps_for_nfe(make_sampler("euler"), budget, plain) == budget
    assert steps_for_nfe(make_sampler("dual_loop"), budget, plain) == budget // 4
