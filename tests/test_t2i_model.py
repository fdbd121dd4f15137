"""The text-to-image PFT: shapes at any resolution, zero init, text padding and batch invariance,
fast path == per-token path, RoPE, checkpoints, presets and their parameter counts."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import patchforcing as pf
from conftest import T2I_TINY
from patchforcing.checkpoints import CheckpointError, save_released_format
from patchforcing.cli.app import main as cli_main
from patchforcing.conditioning import TextEmbeddings, TextTokens
from patchforcing.models.registry import T2I_PAPER_PARAMETERS, count_parameters
from patchforcing.models.t2i import (
    T2IConfig,
    TextToImageTransformer,
    _attend,
    apply_rope,
    rope_angles_1d,
    rope_angles_2d,
)

TINY = T2I_TINY
TEXT_DIM = TINY["text_dim"]


def randomize(model: nn.Module, std: float = 0.05, seed: int = 0) -> nn.Module:
    """Give every weight (incl. the zero-initialised ones) random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def tiny(family: str = "PFT", **kw) -> TextToImageTransformer:
    return randomize(pf.create_model(f"{family}-T2I-T/2", **{**TINY, **kw})).eval()


@pytest.fixture(params=["scale", "adaln_zero"])
def model(request) -> TextToImageTransformer:
    return tiny(modulation=request.param)


def inputs(B: int = 4, H: int = 16, W: int = 16, L: int = 7, seed: int = 0):
    """``x``, per-patch ``t`` and text with mixed lengths: row 1 has 4 real tokens, row 2 none."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, H, W, generator=g)
    t = torch.rand(B, (H // 2) * (W // 2), generator=g)
    tokens = torch.randn(B, L, TEXT_DIM, generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    if B > 2:
        mask[1, 4:] = False
        mask[2] = False
    return x, t, TextTokens(tokens, mask)


# --------------------------------------------------------------------------------------------
# shapes, resolutions, RoPE
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("H,W", [(16, 16), (16, 24), (8, 32)])
def test_shapes_at_any_resolution(H, W):
    """No position table: any H, W divisible by the patch size, also ones the model was not built for."""
    m = tiny()
    x, t, text = inputs(2, H, W)
    v, lv = m(x, t, text)
    assert v.shape == (2, 3, H, W) and lv.shape == (2, 1, H, W)
    assert torch.isfinite(v).all() and torch.isfinite(lv).all()
    v2, _ = m(x, t[:, 0], text)  # one time per image works too
    assert v2.shape == (2, 3, H, W)
    assert m.num_patches == 64 and m.image_size == (16, 16) and m.grid_size == (8, 8)


def test_rope_angles_layout():
    """First hd/4 pairs rotate with the row, the last hd/4 with the column, freqs theta^(-k/(hd/4))."""
    rows, cols = torch.tensor([0.0, 1.0, 3.0]), torch.tensor([2.0, 0.0, 5.0])
    a = rope_angles_2d(rows, cols, head_dim=16, theta=100.0)
    f = 100.0 ** (-torch.arange(4) / 4)
    torch.testing.assert_close(a, torch.cat([rows[:, None] * f, cols[:, None] * f], dim=-1))
    torch.testing.assert_close(rope_angles_1d(torch.arange(3), 8, 100.0), torch.arange(3.0)[:, None] * f)


def test_rope_scores_depend_only_on_relative_position():
    """q_i . k_j after RoPE is unchanged when both positions move by the same offset."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 5, 16, generator=g), torch.randn(1, 1, 5, 16, generator=g)
    rows, cols = torch.tensor([0.0, 1, 2, 3, 7]), torch.tensor([4.0, 1, 0, 6, 2])

    def scores(dr: float, dc: float) -> torch.Tensor:
        a = rope_angles_2d(rows + dr, cols + dc, 16)
        return apply_rope(q, a.cos(), a.sin()) @ apply_rope(k, a.cos(), a.sin()).transpose(-1, -2)

    torch.testing.assert_close(scores(0, 0), scores(11, -3), atol=1e-4, rtol=0)
    # the rotation keeps norms and is not the identity
    a = rope_angles_2d(rows, cols, 16)
    torch.testing.assert_close(apply_rope(q, a.cos(), a.sin()).norm(dim=-1), q.norm(dim=-1))
    assert not torch.allclose(apply_rope(q, a.cos(), a.sin()), q)


def test_refiner_sees_token_order():
    """1-D RoPE in the refiner: reversing the caption's tokens changes the output (without it the
    cross-attention would be blind to word order)."""
    m = tiny()
    attn = m.refiner[0].attn
    with torch.no_grad():  # sharp attention (random 0.05-std norm weights make it nearly uniform)
        attn.q_norm.weight.fill_(3.0)
        attn.k_norm.weight.fill_(3.0)
    _, _, (tokens, mask) = inputs(1)
    z, _ = m.encode_text(tokens, mask)
    z_rev, _ = m.encode_text(tokens.flip(1), mask)
    assert (z_rev - z.flip(1)).abs().max() > 1e-3  # not permutation-equivariant: positions matter


# --------------------------------------------------------------------------------------------
# initialisation, text masking
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("modulation", ["scale", "adaln_zero"])
def test_zero_init_outputs_zero(modulation):
    m = pf.create_model("PFT-T2I-T/2", **TINY, modulation=modulation)
    x, t, text = inputs()
    v, lv = m(x, t, text)
    assert torch.equal(v, torch.zeros_like(v)) and torch.equal(lv, torch.zeros_like(lv))
    v, lv = randomize(m)(x, t, text)
    assert v.abs().max() > 1e-3 and lv.abs().max() > 1e-3


def test_padding_has_no_influence(model):
    """Appending padding (any values, even NaN, mask False) or changing masked values inside a
    caption leaves every output bit unchanged."""
    x, t, (tokens, mask) = inputs()
    v, lv = model(x, t, (tokens, mask))
    junk = torch.randn(4, 5, TEXT_DIM) * 1e3
    junk[:, 0] = float("nan")
    padded = torch.cat([tokens, junk], dim=1), torch.cat([mask, torch.zeros(4, 5, dtype=torch.bool)], dim=1)
    v2, lv2 = model(x, t, padded)
    assert torch.equal(v, v2) and torch.equal(lv, lv2)
    tokens3 = tokens.clone()
    tokens3[1, 4:] = float("inf")  # row 1's masked tail
    tokens3[2] = torch.randn(7, TEXT_DIM)  # row 2 is all masked
    v3, _ = model(x, t, (tokens3, mask))
    assert torch.equal(v, v3)


def test_all_masked_text_gives_zero_cross_attention(model):
    """A caption without tokens: finite output, equal to a network whose cross-attention is zero."""
    x, t, (tokens, _) = inputs(2)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    v, lv = model(x, t, (tokens, mask))
    assert torch.isfinite(v).all() and torch.isfinite(lv).all()

    class Zero(nn.Module):
        def forward(self, x, context, context_mask):
            return torch.zeros_like(x)

    ref = copy.deepcopy(model)
    for block in ref.blocks:
        block.cross = Zero()
    v_ref, lv_ref = ref(x, t, (tokens, mask))
    torch.testing.assert_close(v, v_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(lv, lv_ref, atol=1e-6, rtol=0)
    v0, _ = model(x, t, (tokens[:, :0], mask[:, :0]))  # no text positions at all
    torch.testing.assert_close(v0, v, atol=1e-6, rtol=0)


def test_attend_matches_explicit_softmax_without_masked_keys():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(3, 2, 5, 8, generator=g) for _ in range(3))
    mask = torch.tensor([[1, 1, 0, 1, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    out = _attend(q, k, v, mask)
    for b in range(2):
        keep = mask[b]
        w = torch.softmax(q[b] @ k[b][:, keep].transpose(-1, -2) / math.sqrt(8), dim=-1)
        torch.testing.assert_close(out[b], w @ v[b][:, keep], atol=1e-6, rtol=0)
    assert torch.equal(out[2], torch.zeros_like(out[2]))


# --------------------------------------------------------------------------------------------
# shared conditioning, batch invariance
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["per_image", "constant_rows", "two_values", "random"])
def test_fast_path_equals_per_token_path(model, kind):
    x, t, text = inputs()
    B, N = t.shape
    g = torch.Generator().manual_seed(5)
    if kind == "per_image":
        t = torch.rand(B, generator=g)
    elif kind == "constant_rows":
        t = torch.rand(B, 1, generator=g).expand(B, N).contiguous()
    elif kind == "two_values":
        t = torch.where(torch.rand(B, N, generator=g) < 0.4, 0.7, 0.5)
    v, lv = model(x, t, text)
    model.shared_conditioning = False
    v_slow, lv_slow = model(x, t if t.dim() == 2 else t[:, None].expand(B, N), text)
    assert torch.equal(v, v_slow) and torch.equal(lv, lv_slow)


def test_conditioning_tables():
    m = tiny()
    B, N = 4, 64
    c = m.conditioning(torch.where(torch.rand(B, N) < 0.5, 0.3, 0.9))
    assert c.index is not None and c.table.shape == (2, 32)  # text is not in the table: 2 rows for 4 images
    c = m.conditioning(torch.full((B, N), 0.3))
    assert c.index is None and c.table.shape == (B, 1, 32)
    c = m.conditioning(torch.rand(B, N))
    assert c.index is None and c.table.shape == (B, N, 32)


@pytest.mark.parametrize("per_patch", [False, True])
def test_batch_size_invariance(model, per_patch):
    """Each row alone gives the same bits as in a batch of 4 with other captions (other lengths,
    an empty one) and other times."""
    x, t, (tokens, mask) = inputs(H=16, W=24)
    t = t if per_patch else t[:, 0]
    v, lv = model(x, t, (tokens, mask))
    for i in range(4):
        vi, lvi = model(x[i : i + 1], t[i : i + 1], (tokens[i : i + 1], mask[i : i + 1]))
        assert torch.equal(vi, v[i : i + 1]) and torch.equal(lvi, lv[i : i + 1]), f"row {i}"


def test_per_patch_time_is_per_token():
    m = tiny()
    x, _, text = inputs(1)
    t = torch.full((1, 64), 0.5)
    v1, _ = m(x, t, text)
    t[0, 5] = 0.9
    v2, _ = m(x, t, text)
    assert not torch.allclose(v1, v2)


def test_sit_t2i_takes_one_time_per_image():
    m = tiny("SiT")
    assert not m.per_patch_time and not m.predict_uncertainty
    x, t, text = inputs(2)
    v_a, lv = m(x, t[:, 0], text)
    v_b, _ = m(x, t[:, :1].expand(2, 64), text)
    assert lv is None and torch.equal(v_a, v_b)
    with pytest.raises(ValueError, match="one time per image"):
        m(x, t, text)


# --------------------------------------------------------------------------------------------
# training: gradients, RoPE jitter, bf16
# --------------------------------------------------------------------------------------------


def test_gradients_reach_every_parameter():
    """Loss through velocity and log-variance reaches the text refiner, projection and mapping network."""
    m = tiny().train()
    x, t, text = inputs()
    v, lv = m(x, t, text)
    ((v - x) ** 2).mean().add(lv.mean()).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name
    assert m.refiner and any(n.startswith("text_proj") for n, _ in m.named_parameters())


def test_rope_jitter_only_in_training_and_reproducible():
    m = tiny(rope_jitter=0.5)
    x, t, text = inputs(2)
    v_eval, _ = m(x, t, text)
    m.rope_jitter = 0.0
    assert torch.equal(m(x, t, text)[0], v_eval)  # eval mode: jitter never applied
    m.rope_jitter = 0.5
    m.train()
    a, _ = m(x, t, text, generator=torch.Generator().manual_seed(1))
    b, _ = m(x, t, text, generator=torch.Generator().manual_seed(1))
    c, _ = m(x, t, text, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert not torch.allclose(a, v_eval)
    torch.manual_seed(7)
    d, _ = m(x, t, text)
    torch.manual_seed(7)
    assert torch.equal(d, m(x, t, text)[0])  # the global RNG without a generator


def test_bf16_autocast_cpu():
    m = tiny()
    x, t, text = inputs(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v, lv = m(x, t, text)
    v32, _ = m(x, t, text)
    assert v.dtype == torch.bfloat16 and torch.isfinite(v).all()
    assert (v.float() - v32).abs().max() < 0.05


def test_torch_compile_traces():
    m = tiny(depth=1)
    x, t, text = inputs(2)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, t, text)[0], m(x, t, text)[0], atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------
# inputs, config, checkpoints
# --------------------------------------------------------------------------------------------


def test_text_as_tuple_or_condition():
    m = tiny()
    x, t, text = inputs(2)
    v, _ = m(x, t, text)
    assert torch.equal(m(x, t, (text.tokens, text.mask))[0], v)
    cond = TextEmbeddings(text.tokens, text.mask, torch.zeros(1, TEXT_DIM), torch.ones(1, dtype=torch.bool))
    assert torch.equal(m(x, t, cond)[0], v)
    assert m.condition_kind == "text" and m.accepts_any_size and m.patch_size == 2 and m.in_channels == 3


def test_bad_inputs_are_named():
    m = tiny()
    x, t, text = inputs(2)
    with pytest.raises(ValueError, match="x must have shape"):
        m(torch.randn(2, 4, 16, 16), t, text)
    with pytest.raises(ValueError, match="multiples of the patch size"):
        m(torch.randn(2, 3, 15, 16), t, text)
    with pytest.raises(ValueError, match="t must have shape"):
        m(x, torch.rand(2, 63), text)
    with pytest.raises(ValueError, match="text-conditioned"):
        m(x, t, None)
    with pytest.raises(ValueError, match="text tokens must have shape"):
        m(x, t, (torch.randn(2, 7, 5), text.mask))
    with pytest.raises(ValueError, match="text mask must be a bool"):
        m(x, t, (text.tokens, text.mask.float()))
    with pytest.raises(ValueError, match="head dimension"):
        pf.create_model("PFT-T2I-T/2", hidden_size=60, num_heads=4)
    with pytest.raises(ValueError, match="num_classes does not apply"):
        pf.create_model("PFT-T2I-T/2", num_classes=10)
    with pytest.raises(ValueError, match="unknown model"):
        pf.create_model("PFT-T2I-Q/2")


def test_config_round_trip():
    m = tiny(modulation="adaln_zero", input_size=(16, 24), rope_jitter=0.25)
    d = m.config.to_dict()
    assert d["model_type"] == "t2i" and d["input_size"] == [16, 24]
    assert T2IConfig.from_dict(d) == m.config
    rebuilt = TextToImageTransformer.from_config(d)
    assert rebuilt.config == m.config and rebuilt.rope_jitter == 0.25
    with pytest.raises(ValueError, match="unknown text-to-image model config keys"):
        T2IConfig.from_dict({**d, "num_classes": 3})


def test_checkpoint_round_trip(tmp_path):
    m = tiny(input_size=(16, 24))
    x, t, text = inputs(2, 16, 24)
    v, lv = m(x, t, text)
    path = pf.save_model(m, tmp_path / "t2i.safetensors", metadata={"note": "t2i"})
    loaded = pf.load_model(path)
    assert isinstance(loaded, TextToImageTransformer) and loaded.config == m.config and not loaded.training
    v2, lv2 = loaded(x, t, text)
    assert torch.equal(v, v2) and torch.equal(lv, lv2)
    # a training checkpoint (the trainer's layout) dispatches on model_type as well
    state = {k: w.clone() for k, w in m.state_dict().items()}
    ckpt = {"format": "patchforcing-train", "model_config": m.config.to_dict(), "ema": state, "model": state}
    torch.save(ckpt, tmp_path / "last.pt")
    assert torch.equal(pf.load_model(tmp_path / "last.pt")(x, t, text)[0], v)
    # class checkpoints (no model_type key) still load as the class model
    cls = pf.create_model("PFT-T/2", input_size=8, in_channels=3, num_classes=5, depth=1, hidden_size=32, num_heads=2)
    assert type(pf.load_model(pf.save_model(cls, tmp_path / "c.safetensors"))) is pf.PatchForcingTransformer


def test_bad_t2i_checkpoint_configs(tmp_path):
    m = tiny()
    state = m.state_dict()
    for cfg, match in [
        ({**m.config.to_dict(), "model_type": "video"}, "unknown model_type 'video'"),
        ({**m.config.to_dict(), "depth": "two"}, "depth must be an integer"),
        ({**m.config.to_dict(), "modulation": "film"}, "modulation must be one of"),
        ({**m.config.to_dict(), "depth": 3}, "missing keys"),
    ]:
        torch.save({"format": "patchforcing-train", "model_config": cfg, "ema": state}, tmp_path / "bad.pt")
        with pytest.raises(CheckpointError, match=match):
            pf.load_model(tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="released format only describes class-conditional"):
        save_released_format(m, tmp_path / "released.ckpt")


# --------------------------------------------------------------------------------------------
# presets and parameter counts
# --------------------------------------------------------------------------------------------


def test_paper_preset_parameter_count():
    """PFT-T2I-1.2B (counted on the meta device) next to the authors' 1,239,969,008 (docs/method.md)."""
    with torch.device("meta"):
        m = pf.create_model("PFT-T2I-1.2B")
    c = m.config
    assert (c.depth, c.hidden_size, c.num_heads, c.mapping_width, c.mapping_depth) == (28, 1536, 16, 384, 2)
    assert (c.refiner_width, c.refiner_width // c.refiner_heads, c.refiner_depth) == (1536, 128, 2)
    assert (c.in_channels, c.text_dim, c.patch_size, c.mlp_ratio, m.out_channels) == (32, 2048, 2, 3.0, 33)
    n = sum(p.numel() for p in m.parameters())
    print(f"PFT-T2I-1.2B: {n:,} parameters (authors: {T2I_PAPER_PARAMETERS:,}, {n - T2I_PAPER_PARAMETERS:+,})")
    assert n == 1_239_933_440
    assert abs(n - T2I_PAPER_PARAMETERS) / T2I_PAPER_PARAMETERS < 1e-4  # -35,568
    # the SiT baseline differs only by the log-variance channel of the final linear (1536 * 4)
    assert count_parameters("SiT-T2I-1.2B") == n - 1536 * 4
    assert count_parameters("PFT-T2I-1.2B", modulation="adaln_zero") == 1_339_613_696


def test_tiny_presets_and_listing(capsys):
    names = pf.list_models()
    for name in ("PFT-T2I-T/2", "SiT-T2I-T/2", "PFT-T2I-S/2", "PFT-T2I-B/4", "PFT-T2I-1.2B", "SiT-T2I-1.2B", "PFT-B/2"):
        assert name in names
    m = pf.create_model("PFT-T2I-T/4", input_size=32, in_channels=3)
    assert (m.patch_size, m.text_dim, m.config.depth, m.num_patches) == (4, 384, 6, 64)
    assert count_parameters("PFT-T2I-T/2") == 4_621_312
    assert cli_main(["models"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("PFT-T2I-1.2B"))
    assert "1,239,933,440 parameters" in line and "1,239,969,008" in line
    assert "PFT-B/2\n" in out  # class presets are listed as before


def test_geglu_and_reference_block_math():
    """One ``scale`` block by hand: rms-norm * (1 + s) -> attention / cross-attention / GEGLU."""
    m = tiny(depth=1)
    block = m.blocks[0]
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(2, 6, 64, generator=g), torch.randn(2, 32, generator=g)
    ctx, ctx_mask = torch.randn(2, 3, 48, generator=g), torch.tensor([[True, True, False], [True, False, False]])
    a = rope_angles_2d(torch.arange(6.0) // 3, torch.arange(6.0) % 3, 16)
    rope = (a.cos(), a.sin())
    from patchforcing.models.transformer import Conditioning

    got = block(x, Conditioning(c[:, None]), rope, ctx, ctx_mask)
    s = F.linear(F.silu(c), block.adaLN_modulation[1].weight).chunk(3, -1)

    def heads(z):
        return z.view(2, -1, 4, 16).transpose(1, 2)

    def rms(z):
        return z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + 1e-6)

    h = rms(x) * (1 + s[0][:, None])
    q, k, v = F.linear(h, block.attn.qkv.weight).chunk(3, -1)
    q, k = (
        apply_rope(rms(heads(z)) * w, *rope) for z, w in ((q, block.attn.q_norm.weight), (k, block.attn.k_norm.weight))
    )
    att = torch.softmax(q @ k.transpose(-1, -2) / 4, -1) @ heads(v)
    x1 = x + F.linear(att.transpose(1, 2).reshape(2, 6, 64), block.attn.proj.weight)
    h = rms(x1) * (1 + s[1][:, None])
    q = rms(heads(F.linear(h, block.cross.q.weight))) * block.cross.q_norm.weight
    kc, vc = F.linear(ctx, block.cross.kv.weight).chunk(2, -1)
    kc = rms(heads(kc)) * block.cross.k_norm.weight
    logits = (q @ kc.transpose(-1, -2) / 4).masked_fill(~ctx_mask[:, None, None, :], float("-inf"))
    att = torch.softmax(logits, -1) @ heads(vc)
    x2 = x1 + F.linear(att.transpose(1, 2).reshape(2, 6, 64), block.cross.proj.weight)
    h = rms(x2) * (1 + s[2][:, None])
    val, gate = F.linear(h, block.mlp.fc1.weight).chunk(2, -1)
    ref = x2 + F.linear(val * F.gelu(gate, approximate="tanh"), block.mlp.fc2.weight)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
