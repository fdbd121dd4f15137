"""Token caching: the model's partial forward against its full forward, bit-exact dense limits for
every sampler, the cached call pattern (refresh, guidance switches, CFG halves), the selection
rules, FLOP counts (by hand and against torch's FlopCounterMode), FLOP budgets, errors, the CLI."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import patchforcing as pf
from conftest import AnalyticModel, randomize
from patchforcing.conditioning import TextEmbeddings
from patchforcing.flow.path import pixel_to_patch
from patchforcing.models import transformer as transformer_module
from patchforcing.models.attention import set_attention_kernel
from patchforcing.models.token_cache import _MIN_ROWS as TOKEN_CACHE_MIN_ROWS
from patchforcing.models.token_cache import KVStore, forward_flops, text_length, unpatchify
from patchforcing.sampling import SAMPLERS, GuidedModel, TokenCache, plan_flops, steps_for_flops
from patchforcing.sampling.cache import RefreshClock, active_count, plan_call_kinds

torch.set_num_threads(1)

TEXT_DIM = 12
T2I_TINY = dict(
    input_size=8,
    in_channels=3,
    text_dim=TEXT_DIM,
    depth=2,
    hidden_size=32,
    num_heads=2,
    mapping_width=16,
    refiner_width=24,
    refiner_heads=2,
    refiner_depth=1,
)


def _pft(**kw):
    cfg = dict(input_size=8, in_channels=3, num_classes=5, depth=2, hidden_size=32, num_heads=2)
    return randomize(pf.create_model("PFT-T/2", **{**cfg, **kw})).eval()


def _sit():
    m = pf.create_model("SiT-T/2", input_size=8, in_channels=3, num_classes=5, depth=2, hidden_size=32, num_heads=2)
    return randomize(m).eval()


def _t2i(**kw):
    return randomize(pf.create_model("PFT-T2I-T/2", **{**T2I_TINY, **kw})).eval()


def _noise(B=3, seed=0, C=3, H=8, W=8):
    return torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(seed))


def _text(B=3, L=5, seed=1) -> TextEmbeddings:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 3:] = False
    null_mask = torch.zeros(L, dtype=torch.bool)
    null_mask[0] = True
    return TextEmbeddings(
        torch.randn(B, L, TEXT_DIM, generator=g), mask, torch.randn(L, TEXT_DIM, generator=g), null_mask
    )


def _cond(model, B=3):
    """The sample() keyword giving ``B`` images their condition."""
    if model.condition_kind == "text":
        return {"text": _text(B)}
    return {"y": torch.arange(B) % 5}


def _net_cond(model, B=3):
    """The network's third argument for ``B`` rows."""
    if model.condition_kind == "text":
        return _text(B).model_input()
    return torch.arange(B) % 5


def _random_idx(B, N, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(N, generator=g)[:n] for _ in range(B)])


MODELS = {
    "pft": _pft,
    "sit": _sit,
    "t2i": lambda: _t2i(),
    "t2i_adaln": lambda: _t2i(modulation="adaln_zero", mlp="gelu"),
}


# --------------------------------------------------------------------------------------------
# the model side: forward_cached
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_full_cached_call_is_the_plain_forward_bit_for_bit(kind):
    m = MODELS[kind]()
    x, cond = _noise(), _net_cond(m)
    t = torch.rand(3, 16) if m.per_patch_time else torch.rand(3)
    with torch.no_grad():
        v, lv = m(x, t, cond)
        store = KVStore()
        out = unpatchify(m.forward_cached(x, t, cond, store=store), 2, (4, 4))
    assert torch.equal(out[:, :3], v)
    assert (lv is None and out.shape[1] == 3) or torch.equal(out[:, 3:], lv)
    assert sorted(store.keys) == [0, 1] and store.keys[0].shape == (3, 2, 16, 16)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_partial_call_with_all_tokens_active_equals_the_full_call(kind):
    """Every token active, in a scrambled order: the partial path (gathered embedding, conditioning
    and RoPE, scattered keys) reproduces the full call up to float rounding."""
    m = MODELS[kind]()
    x, cond = _noise(), _net_cond(m)
    t = torch.rand(3, 16) if m.per_patch_time else torch.rand(3)
    idx = _random_idx(3, 16, 16)
    with torch.no_grad():
        store = KVStore()
        full = m.forward_cached(x, t, cond, store=store)
        part = m.forward_cached(_noise(seed=9), t, cond, store=store, idx=idx)  # no stale token left
        ref = m.forward_cached(_noise(seed=9), t, cond, store=KVStore())
    expected = torch.gather(ref, 1, idx[..., None].expand(-1, -1, ref.shape[-1]))
    torch.testing.assert_close(part, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(part, torch.gather(full, 1, idx[..., None].expand(-1, -1, full.shape[-1])))


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_partial_call_reads_the_stored_keys_and_values_of_every_layer(kind):
    """Inactive tokens' k, v recorded from the same input: the active tokens' outputs are the full
    call's. Recorded from another input (or only the first layer from the same one), they are not."""
    m = MODELS[kind]()
    x, cond = _noise(), _net_cond(m)
    t = torch.rand(3, 16) if m.per_patch_time else torch.rand(3)
    idx = _random_idx(3, 16, 5, seed=3)
    with torch.no_grad():
        store = KVStore()
        full = m.forward_cached(x, t, cond, store=store)
        kept = {i: k.clone() for i, k in store.keys.items()}
        part = m.forward_cached(x, t, cond, store=store, idx=idx)
        other = KVStore()
        m.forward_cached(_noise(seed=5), t, cond, store=other)
        mixed = KVStore(dict(other.keys), dict(other.values))
        mixed.keys[0], mixed.values[0] = store.keys[0], store.values[0]  # layer 0 right, layer 1 stale
        wrong = m.forward_cached(x, t, cond, store=mixed, idx=idx)
    expected = torch.gather(full, 1, idx[..., None].expand(-1, -1, full.shape[-1]))
    torch.testing.assert_close(part, expected, rtol=1e-5, atol=1e-6)
    assert (wrong - expected).abs().max() > 100 * (part - expected).abs().max()  # a stale last layer shows
    assert all(torch.equal(store.keys[i], kept[i]) for i in kept)  # a partial call leaves the store as it was


def test_partial_call_refuses_bad_indices_and_an_empty_store():
    m = _pft()
    x, y, t = _noise(), torch.tensor([0, 1, 2]), torch.rand(3)
    store = KVStore()
    with pytest.raises(ValueError, match="make a full call first"):
        m.forward_cached(x, t, y, store=store, idx=_random_idx(3, 16, 4))
    m.forward_cached(x, t, y, store=store)
    bad = [
        (torch.zeros(2, 4, dtype=torch.long), r"must be a \(3, n\) tensor"),
        (torch.zeros(3, 4), "integer"),
        (torch.full((3, 2), 16), r"outside \[0, 16\)"),
        (torch.tensor([[0, 1], [2, 2], [3, 4]]), "repeats a token index"),
        (torch.zeros(3, 0, dtype=torch.long), "between 1 and 16"),
    ]
    for idx, msg in bad:
        with pytest.raises(ValueError, match=msg):
            m.forward_cached(x, t, y, store=store, idx=idx)
    with pytest.raises(ValueError, match="another batch"):
        m.forward_cached(x[:2], t[:2], y[:2], store=store, idx=_random_idx(2, 16, 4))


# --------------------------------------------------------------------------------------------
# sampling: exact where promised
# --------------------------------------------------------------------------------------------

CASES = [(s, k) for s in sorted(SAMPLERS) for k in ("pft", "t2i")] + [("euler", "sit")]


@pytest.mark.parametrize("sampler,kind", CASES)
@pytest.mark.parametrize("guided", [False, True])
def test_dense_limits_are_the_dense_sampler_bit_for_bit(sampler, kind, guided):
    m = {"pft": _pft, "t2i": _t2i, "sit": _sit}[kind]()
    kw = dict(steps=4, **_cond(m), cfg_scale=2.0 if guided else 1.0)
    if guided:
        kw["guidance_interval"] = (0.2, 0.8)  # guidance switches on and off
    dense = pf.sample(m, _noise(), sampler, **kw)
    select = "random" if kind == "sit" else "uncertainty"
    for cache in (TokenCache(active=1.0, select=select), TokenCache(active=0.25, refresh_every=1, select=select)):
        res = pf.sample(m, _noise(), sampler, cache=cache, **kw)
        assert torch.equal(res.x, dense.x), cache
        assert res.token_flops == res.full_flops == dense.token_flops == dense.full_flops > 0
        assert (res.calls, res.nfe) == (dense.calls, dense.nfe)
    cached = pf.sample(m, _noise(), sampler, cache=TokenCache(active=0.25, select=select), **kw)
    assert not torch.equal(cached.x, dense.x) and cached.token_flops < cached.full_flops == dense.full_flops


def test_cached_run_starts_with_the_dense_call_and_keeps_inactive_outputs():
    m = _pft()
    kw = dict(steps=6, y=torch.tensor([0, 1, 2]), record=True)
    dense = pf.sample(m, _noise(), "euler_pf", **kw)
    res = pf.sample(m, _noise(), "euler_pf", cache=TokenCache(active=0.25, refresh_every=3), **kw)
    rec = res.record
    assert [r.active is None for r in rec] == [True, False, False, True, False, False]
    assert torch.equal(rec[0].v, dense.record[0].v) and torch.equal(rec[0].logvar, dense.record[0].logvar)
    for prev, cur in zip(rec, rec[1:]):
        if cur.active is None:
            continue
        assert cur.active.sum(1).tolist() == [4, 4, 4]  # ceil(0.25 * 16)
        keep = ~pixel_active(cur.active)
        assert torch.equal(cur.v[keep.expand_as(cur.v)], prev.v[keep.expand_as(prev.v)])
        assert torch.equal(cur.logvar[keep], prev.logvar[keep])
        changed = pixel_active(cur.active).expand_as(cur.v)
        assert not torch.equal(cur.v[changed], prev.v[changed])


def pixel_active(active):
    """(B, N) bool over a 4 x 4 grid of 2 x 2 patches -> (B, 1, 8, 8)."""
    return active.view(-1, 1, 4, 1, 4, 1).expand(-1, 1, 4, 2, 4, 2).reshape(-1, 1, 8, 8)


def test_uncertainty_selection_takes_the_most_uncertain_patches_of_the_last_call():
    m = _pft()
    g = GuidedModel(m, torch.tensor([0, 1, 2]), cache=TokenCache(active=0.3, refresh_every=8))
    x, t = _noise(), torch.full((3,), 0.3)
    first = g(x, t, 0.3)
    second = g(x + 0.1, t, 0.3)
    third = g(x + 0.2, t, 0.3)
    for prev, cur in ((first, second), (second, third)):
        var = pixel_to_patch(prev.logvar.exp(), 2)
        n = math.ceil(0.3 * 16)
        top = var.argsort(dim=1, descending=True)[:, :n]
        assert cur.active.sum(1).tolist() == [n] * 3
        assert all(set(top[b].tolist()) == set(cur.active[b].nonzero().flatten().tolist()) for b in range(3))


def test_cfg_halves_keep_their_own_keys_values_and_outputs():
    """A guided cached call = the two halves each run as an unguided cached call (same active tokens)."""
    m = _pft()
    y = torch.tensor([0, 1, 2])
    mask = torch.zeros(3, 16, dtype=torch.bool)
    for b, cols in enumerate(([0, 5, 9, 15], [1, 2, 3, 4], [7, 8, 12, 14])):
        mask[b, cols] = True
    x0, x1, t = _noise(), _noise(seed=1), torch.full((3,), 0.4)

    def two_calls(cond, w):
        g = GuidedModel(m, cond, cfg_scale=w, cache=TokenCache(mask=mask, refresh_every=5))
        g(x0, t, 0.4)
        return g(x1, t, 0.4)

    guided = two_calls(y, 3.0)
    cond_only = two_calls(y, 1.0)
    null_only = two_calls(torch.full((3,), 5), 1.0)
    assert torch.equal(guided.active, mask) and torch.equal(cond_only.active, mask)
    torch.testing.assert_close(guided.v_cond, cond_only.v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(guided.v, null_only.v + 3.0 * (cond_only.v - null_only.v), rtol=1e-5, atol=1e-5)


def test_random_selection_is_deterministic_per_image_and_ignores_batch_mates():
    m = _pft(input_size=16)  # N = 64, n = 32: every partial matmul has >= 32 rows, as dense ones do
    noise, y = _noise(B=3, H=16, W=16), torch.tensor([0, 1, 2])
    cache = TokenCache(active=0.5, select="random", seed=7)
    kw = dict(steps=5, record=True, cache=cache)
    a = pf.sample(m, noise, "look_ahead", y=y, **kw)
    b = pf.sample(m, noise, "look_ahead", y=y, **kw)
    pair = pf.sample(m, noise[1:], "look_ahead", y=y[1:], **kw)
    alone = pf.sample(m, noise[1:2], "look_ahead", y=y[1:2], **kw)
    other_seed = pf.sample(
        m, noise, "look_ahead", y=y, steps=5, record=True, cache=TokenCache(active=0.5, select="random")
    )
    partial = [i for i, r in enumerate(a.record) if r.active is not None]
    assert len(partial) >= 4
    for i in partial:
        assert torch.equal(a.record[i].active, b.record[i].active)
        assert torch.equal(alone.record[i].active[0], a.record[i].active[1])  # the choice ignores batch-mates
    assert torch.equal(a.x, b.x)
    # the samples too, wherever the dense sampler's are (on this CPU: batches of >= 2 images)
    assert torch.equal(
        pf.sample(m, noise[1:], "look_ahead", y=y[1:], steps=5).x, pf.sample(m, noise, "look_ahead", y=y, steps=5).x[1:]
    )
    assert torch.equal(pair.x, a.x[1:])
    assert any(not torch.equal(other_seed.record[i].active, a.record[i].active) for i in partial)
    assert any(not torch.equal(a.record[i].active[0], a.record[i].active[2]) for i in partial)
    sit = pf.sample(_sit(), _noise(), "euler", y=y, steps=3, cache=cache)  # no log-variance needed
    assert sit.token_flops < sit.full_flops


def test_a_user_mask_callable_sees_the_call_and_the_last_log_variance():
    m = _pft()
    seen = []

    def mask(call, x, logvar):
        seen.append((call, x.shape, None if logvar is None else logvar.shape))
        out = torch.zeros(x.shape[0], 16, dtype=torch.bool)
        out[:, call % 16] = True
        return out

    res = pf.sample(m, _noise(), "euler", steps=4, y=torch.tensor([0, 1, 2]), record=True, cache=TokenCache(mask=mask))
    assert seen == [(c, (3, 3, 8, 8), (3, 1, 8, 8)) for c in (1, 2, 3)]
    assert [None if r.active is None else r.active[0].nonzero().flatten().tolist() for r in res.record] == [
        None,
        [1],
        [2],
        [3],
    ]


# --------------------------------------------------------------------------------------------
# the call pattern and FLOP accounting of a run
# --------------------------------------------------------------------------------------------


def test_guidance_switches_force_a_full_call_and_the_flops_add_up():
    m = _pft()
    y = torch.tensor([0, 1, 2])
    cache = TokenCache(active=0.5, refresh_every=4)
    res = pf.sample(
        m, _noise(), "euler", steps=6, y=y, cfg_scale=2.0, guidance_interval=(0.3, 0.7), cache=cache, record=True
    )
    # step starts 0, 1/6, ..., 5/6: guided at 2/6, 3/6, 4/6 -> unguided, unguided, guided x3, unguided
    assert [r.active is None for r in res.record] == [True, False, True, False, False, True]
    F_u, F_g = forward_flops(m, 3), forward_flops(m, 6)
    P_u, P_g = forward_flops(m, 3, active=8), forward_flops(m, 6, active=8)
    assert res.nfe == 9
    assert res.token_flops == 2 * F_u + P_u + F_g + 2 * P_g
    assert res.full_flops == 3 * F_u + 3 * F_g
    assert res.cache == {"active": 0.5, "refresh_every": 4, "select": "uncertainty", "mask": None, "seed": 0}


def test_refresh_pattern_planning_matches_the_clock():
    steps = [(2, False), (1, False), (2, True), (2, True), (0, False), (3, True), (1, False)]
    for R in (1, 2, 3, 5):
        clock, kinds = RefreshClock(R), {}
        for n, g in steps:
            for _ in range(n):
                key = (g, clock.next(g))
                kinds[key] = kinds.get(key, 0) + 1
        assert plan_call_kinds(steps, R, dense=False) == kinds
    # R = 3 by hand: U: F p p | G: F p p F p p F (the 0-call step does not break the guided stretch) | U: F
    assert plan_call_kinds(steps, 3, dense=False) == {
        (False, True): 2,
        (False, False): 2,
        (True, True): 3,
        (True, False): 4,
    }
    assert plan_call_kinds(steps, 3, dense=True) == {(False, True): 4, (True, True): 7}


def test_active_count():
    assert [active_count(a, 16) for a in (0.01, 0.25, 0.3, 0.5, 1.0)] == [1, 4, 5, 8, 16]
    assert active_count(0.3, 10) == 3  # not 4 from 0.30000000000000004 * 10
    assert TokenCache(active=1.0).is_dense(16) and TokenCache(refresh_every=1).is_dense(16)
    assert TokenCache(active=0.99).count(16) == 16 and TokenCache(active=0.99).is_dense(16)  # ceil: every token
    assert TokenCache(active=0.99).count(256) == 254 and not TokenCache(active=0.99).is_dense(256)
    assert TokenCache(mask=torch.ones(16, dtype=torch.bool)).is_dense(16)
    assert TokenCache(mask=lambda c, x, lv: None).count(16) is None


def test_flops_budget_picks_the_largest_step_count_that_fits():
    m = _pft()
    y = torch.tensor([0, 1, 2])
    for cache, sampler, cfg in ((None, "euler", 1.0), (TokenCache(active=0.25), "look_ahead", 2.0)):
        g = GuidedModel(m, y, cfg_scale=cfg, cache=cache)
        plans = {
            k: plan_flops(SAMPLERS[sampler](), pf.sampling.make_time_grid(k), g, 3, (8, 8))[0] for k in range(1, 40)
        }
        for k in (2, 7, 20):
            for budget in (plans[k], plans[k] - 1):
                best = max(j for j, f in plans.items() if f <= budget)  # brute force over K = 1 .. 39
                assert steps_for_flops(SAMPLERS[sampler](), budget, g, 3, (8, 8)) == best
            assert best < k <= steps_for_flops(SAMPLERS[sampler](), plans[k], g, 3, (8, 8))
        with pytest.raises(ValueError, match="no step count fits"):
            steps_for_flops(SAMPLERS[sampler](), plans[1] - 1, g, 3, (8, 8))
        res = pf.sample(m, _noise(), sampler, flops=plans[12], y=y, cfg_scale=cfg, cache=cache)
        assert res.token_flops <= plans[12] and res.steps == max(j for j, f in plans.items() if f <= plans[12])
    dense = pf.sample(m, _noise(), "euler", flops=1e9, y=y)
    cached = pf.sample(m, _noise(), "euler", flops=1e9, y=y, cache=TokenCache(active=0.25))
    assert cached.steps > dense.steps and cached.token_flops <= 1e9 and dense.token_flops <= 1e9


# --------------------------------------------------------------------------------------------
# FLOP counts
# --------------------------------------------------------------------------------------------


def test_flop_count_by_hand_for_a_tiny_pft():
    """input 4x4, p 2 (N 4), C 3 (K 4 with the log-variance), D 8, depth 1, MLP 32, batch 2."""
    m = pf.create_model("PFT-T/2", input_size=4, in_channels=3, num_classes=2, depth=1, hidden_size=8, num_heads=2)
    parts = forward_flops(m, 2, breakdown=True)
    # conditioning on 32 padded rows: t-MLP 2*32*(256*8 + 8*8), block 2*32*8*48, final 2*32*8*16
    assert parts.conditioning == 135168 + 24576 + 8192
    assert parts.embed == 2 * 8 * 12 * 8  # 8 tokens, 12 = 3 * 2 * 2 inputs, width 8
    assert parts.attention == 2 * 8 * 8 * 24 + 4 * 8 * 4 * 8 + 2 * 8 * 8 * 8  # qkv, scores + sum, proj
    assert parts.mlp == 2 * 8 * 8 * 32 * 2 and parts.final == 2 * 8 * 8 * 16
    assert parts.total == forward_flops(m, 2) == 184832
    # one active token per row: every token term shrinks, the attention reads all 4 keys
    assert forward_flops(m, 2, active=1) == 167936 + 384 + 768 + 256 + 256 + 2048 + 512
    assert TOKEN_CACHE_MIN_ROWS == transformer_module.MIN_ROWS


def _counted(fn) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_flop_count_matches_torch_flop_counter(kind):
    """With the "math" attention kernel torch counts every matmul we count; with SDPA on the CPU it
    misses exactly the attention score and weighted-sum matmuls (no formula for the CPU kernel)."""
    m = MODELS[kind]()
    B = 3
    x, cond, t = _noise(B), _net_cond(m, B), torch.rand(B)
    L = text_length(cond.mask) if m.condition_kind == "text" else None
    parts = forward_flops(m, B, text_length=L, breakdown=True)
    set_attention_kernel(m, "math")
    assert _counted(lambda: m(x, t, cond)) == parts.total
    store = KVStore()
    m.forward_cached(x, t, cond, store=store)
    idx = _random_idx(B, 16, 5)
    assert _counted(lambda: m.forward_cached(x, t, cond, store=store, idx=idx)) == forward_flops(
        m, B, active=5, text_length=L
    )
    set_attention_kernel(m, "sdpa")
    D, depth = m.config.hidden_size, m.config.depth
    attn = depth * 4 * B * 16 * 16 * D
    if m.condition_kind == "text":
        Dr = m.config.refiner_width
        attn += depth * 4 * B * 16 * L * D + m.config.refiner_depth * 4 * B * L * L * Dr
    assert _counted(lambda: m(x, t, cond)) == parts.total - attn


def test_text_length_is_what_the_t2i_model_keeps():
    m = _t2i()
    for mask in (torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]]), torch.zeros(2, 4), torch.ones(2, 4)):
        mask = mask.bool()
        _, kept = m.encode_text(torch.randn(2, 4, TEXT_DIM), mask)
        assert text_length(mask) == kept.shape[1]


def test_flops_are_none_for_unknown_models_and_budgets_refused():
    res = pf.sample(AnalyticModel(), torch.randn(2, 2, 8, 8), "euler", steps=2)
    assert res.token_flops is None and res.full_flops is None
    with pytest.raises(ValueError, match="FLOPs are known"):
        pf.sample(AnalyticModel(), torch.randn(2, 2, 8, 8), "euler", flops=1e6)
    with pytest.raises(ValueError, match="cannot count the FLOPs of a AnalyticModel"):
        forward_flops(AnalyticModel(), 2)


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        ({"active": 0.0}, r"active must be a number in \(0, 1\]"),
        ({"active": 1.5}, r"active must be a number in \(0, 1\]"),
        ({"active": True}, "active must be a number"),
        ({"active": "half"}, "active must be a number"),
        ({"refresh_every": 0}, "refresh_every must be an integer >= 1"),
        ({"refresh_every": 2.5}, "refresh_every must be an integer >= 1"),
        ({"select": "entropy"}, "select must be one of 'uncertainty', 'random'"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"active": 0.5, "mask": torch.ones(16, dtype=torch.bool)}, "not both"),
        ({"mask": torch.ones(16)}, "must be bool"),
        ({"mask": "all"}, "mask must be a bool tensor"),
        ({"mask": torch.tensor([[True, False], [True, True]])}, "same number of tokens in every row"),
        ({"mask": torch.zeros(4, dtype=torch.bool)}, "marks no token"),
    ],
)
def test_bad_options_are_refused(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        TokenCache(**kwargs)


def test_bad_runs_are_refused_before_any_call():
    m, y = _pft(), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match='use select="random"'):
        pf.sample(_sit(), _noise(), "euler", steps=2, y=y, cache=TokenCache(active=0.5))
    with pytest.raises(ValueError, match=r"shape \(16,\) or \(3, 16\)"):
        pf.sample(m, _noise(), "euler", steps=2, y=y, cache=TokenCache(mask=torch.ones(2, 16, dtype=torch.bool)))
    with pytest.raises(ValueError, match="cache must be a TokenCache"):
        pf.sample(m, _noise(), "euler", steps=2, y=y, cache={"active": 0.5})
    with pytest.raises(ValueError, match="forward_cached"):
        pf.sample(AnalyticModel(), torch.randn(2, 2, 8, 8), "euler", steps=2, cache=TokenCache(select="random"))
    for kw, msg in (
        ({"nfe": 4}, "not both"),
        ({"steps": 4}, "not both"),
        ({"time_grid": [0.0, 0.5, 1.0]}, "not both"),
    ):
        with pytest.raises(ValueError, match=msg):
            pf.sample(m, _noise(), "euler", flops=1e9, y=y, **kw)
    for bad in (0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match="FLOP budget must be a finite number > 0"):
            pf.sample(m, _noise(), "euler", flops=bad, y=y)
    with pytest.raises(ValueError, match="no step count fits"):
        pf.sample(m, _noise(), "euler", flops=1000, y=y)
    with pytest.raises(ValueError, match="known active count"):
        pf.sample(m, _noise(), "euler", flops=1e9, y=y, cache=TokenCache(mask=lambda c, x, lv: torch.ones(3, 16) > 0))
    with pytest.raises(ValueError, match="the mask of call 1 must mark the same number"):
        uneven = torch.zeros(3, 16, dtype=torch.bool)
        uneven[0, :2] = uneven[1:, :3] = True
        pf.sample(m, _noise(), "euler", steps=3, y=y, cache=TokenCache(mask=lambda c, x, lv: uneven))


# --------------------------------------------------------------------------------------------
# the CLI
# --------------------------------------------------------------------------------------------


def test_cli_sample_with_a_token_cache(tmp_path, capsys):
    from patchforcing.cli import main

    ckpt = pf.save_model(_pft(), tmp_path / "m.safetensors")
    args = ["sample", str(ckpt), "--steps", "4", "--num-samples", "2", "--device", "cpu"]
    assert main([*args, "--cache-active", "0.25", "--cache-refresh", "2", "--out", str(tmp_path / "g.png")]) == 0
    out = capsys.readouterr().out
    plain = forward_flops(pf.load_model(ckpt), 2)
    partial = forward_flops(pf.load_model(ckpt), 2, active=4)
    assert f"token FLOPs {2 * plain + 2 * partial:.3g} of {4 * plain:.3g} dense" in out
    assert main([*args, "--cache-active", "0.5", "--cache-select", "random", "--out", str(tmp_path / "s.npz")]) == 0
    assert "token FLOPs" in capsys.readouterr().out
    assert main([*args, "--cache-refresh", "2", "--out", str(tmp_path / "x.png")]) == 2
    assert "--cache-refresh need --cache-active" in capsys.readouterr().err
    assert main([*args, "--cache-active", "0", "--out", str(tmp_path / "x.png")]) == 2
    assert r"expected a number in (0, 1], got 0.0" in capsys.readouterr().err


def test_generation_settings_record_the_cache():
    from patchforcing.sampling.generate import GenerationSpec, sampling_settings

    m = _pft()
    plain = sampling_settings(m, GenerationSpec(num_samples=2))
    cached = sampling_settings(m, GenerationSpec(num_samples=2, cache=TokenCache(active=0.5, select="random")))
    assert "cache" not in plain  # records of dense runs read as before
    assert cached["cache"] == {"active": 0.5, "refresh_every": 4, "select": "random", "mask": None, "seed": 0}
    with pytest.raises(ValueError, match="cache must be a TokenCache"):
        GenerationSpec(num_samples=2, cache=0.5)
