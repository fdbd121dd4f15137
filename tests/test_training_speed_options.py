"""Speed options of the training step: the ``math`` attention kernel equals SDPA (values and gradients,
PFT and the T2I path with key masks), fused AdamW equals the default kernel, the config keys
``train.attention`` / ``optim.fused`` are validated and resolved, and the trainer honours them."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import patchforcing as pf
from conftest import T2I_TINY
from patchforcing.conditioning import TextTokens
from patchforcing.flow.loss import patch_flow_loss
from patchforcing.models.attention import attention, attention_kernel_of, set_attention_kernel
from patchforcing.models.t2i import CrossAttention, SelfAttention
from patchforcing.models.transformer import Attention
from patchforcing.training import ConfigError, Trainer, load_config
from patchforcing.training.speed import build_adamw, resolve_attention_kernel, resolve_fused


def _randomize(model: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Random values for every weight (the zero-initialised outputs would hide attention errors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def _tiny_pft(**kw) -> torch.nn.Module:
    return _randomize(
        pf.create_model(
            "PFT-T/4", input_size=16, in_channels=3, num_classes=4, depth=2, hidden_size=64, num_heads=4, **kw
        )
    )


def _tiny_t2i() -> torch.nn.Module:
    return _randomize(pf.create_model("PFT-T2I-T/2", **T2I_TINY)).eval()


def _pft_inputs(B: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, 16, 16, generator=g), torch.rand(B, 16, generator=g), torch.tensor([0, 3, 4][:B])


def _count_sdpa(monkeypatch) -> list[int]:
    calls = [0]
    real = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    return calls


# --------------------------------------------------------------------------------------------
# the kernel
# --------------------------------------------------------------------------------------------


def test_math_kernel_matches_float64_reference_with_and_without_mask():
    """Catches a wrong scale, softmax over the wrong axis, keys not transposed or an inverted mask."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(2, 3, 5, 8, generator=g),
        torch.randn(2, 3, 7, 8, generator=g),
        torch.randn(2, 3, 7, 4, generator=g),
    )
    mask = torch.rand(2, 1, 1, 7, generator=g) < 0.6
    mask[..., 0] = True  # every row keeps a key
    for m in (None, mask):
        s = q.double() @ k.double().transpose(-1, -2) / 8**0.5
        if m is not None:
            s = s.masked_fill(~m, float("-inf"))
        ref = torch.softmax(s, -1) @ v.double()
        for kernel in ("sdpa", "math"):
            out = attention(q, k, v, m, kernel=kernel)
            assert out.shape == (2, 3, 5, 4) and out.dtype == torch.float32
            torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="unknown attention kernel 'flash'"):
        attention(q, k, v, kernel="flash")


def test_math_kernel_under_bf16_autocast_returns_bf16_close_to_sdpa():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 6, 8, generator=g) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = attention(q, k, v, kernel="sdpa"), attention(q, k, v, kernel="math")
    assert a.dtype == b.dtype == torch.bfloat16
    torch.testing.assert_close(b.float(), a.float(), atol=2e-2, rtol=2e-2)


def test_set_attention_kernel_reaches_every_attention_layer_and_not_the_weights():
    pft, t2i = _tiny_pft(), _tiny_t2i()
    keys = list(pft.state_dict())
    assert set_attention_kernel(pft, "math") == 2  # one per block
    n_t2i = sum(isinstance(m, (SelfAttention, CrossAttention)) for m in t2i.modules())
    assert n_t2i == 2 * 2 + 1  # self + cross per block, the text refiner's self-attention
    assert set_attention_kernel(t2i, "math") == n_t2i
    assert all(attention_kernel_of(m) == "math" for m in pft.modules() if isinstance(m, Attention))
    assert list(pft.state_dict()) == keys and "attention_kernel" not in str(pft.config)
    assert attention_kernel_of(copy.deepcopy(pft).blocks[0].attn) == "math"  # copies (the EMA) keep it
    assert attention_kernel_of(_tiny_pft().blocks[0].attn) == "sdpa"  # a fresh network: SDPA
    with pytest.raises(ValueError, match="unknown attention kernel 'fast'"):
        set_attention_kernel(pft, "fast")


# --------------------------------------------------------------------------------------------
# the networks: math == SDPA (fp32), values and gradients
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["PFT", "SiT"])
def test_pft_and_sit_forward_and_gradients_equal_with_math_attention(family, monkeypatch):
    torch.manual_seed(0)
    model = _randomize(
        pf.create_model(
            f"{family}-T/4", input_size=16, in_channels=3, num_classes=4, depth=2, hidden_size=64, num_heads=4
        )
    )
    x, t, y = _pft_inputs()
    t = t if family == "PFT" else t[:, 0]
    grads, outs = {}, {}
    calls = _count_sdpa(monkeypatch)
    for kernel in ("sdpa", "math"):
        set_attention_kernel(model, kernel)
        calls[0] = 0
        model.zero_grad(set_to_none=True)
        terms = patch_flow_loss(
            model,
            x,
            y,
            timestep_sampler="ltg" if family == "PFT" else "uniform",
            generator=torch.Generator().manual_seed(5),
        )
        terms["loss"].backward()
        with torch.no_grad():
            outs[kernel] = model(x, t, y)[0]
        grads[kernel] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        assert calls[0] == (0 if kernel == "math" else 2 * 2)  # (2 blocks, loss + forward)
    torch.testing.assert_close(outs["math"], outs["sdpa"], atol=1e-6, rtol=1e-5)
    assert grads["math"].keys() == grads["sdpa"].keys() and len(grads["sdpa"]) > 10
    for n in grads["sdpa"]:
        torch.testing.assert_close(grads["math"][n], grads["sdpa"][n], atol=1e-6, rtol=1e-4, msg=n)


def test_t2i_forward_and_gradients_equal_with_math_attention_under_key_masks(monkeypatch):
    """Mixed caption lengths: one full, one with 4 of 7 tokens, one without any (its cross-attention
    must stay exactly zero with either kernel)."""
    model = _tiny_t2i()
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(3, 3, 16, 16, generator=g), torch.rand(3, 64, generator=g)
    tokens, mask = torch.randn(3, 7, 24, generator=g), torch.ones(3, 7, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2] = False
    res = {}
    calls = _count_sdpa(monkeypatch)
    for kernel in ("sdpa", "math"):
        set_attention_kernel(model, kernel)
        calls[0] = 0
        model.zero_grad(set_to_none=True)
        v, lv = model(x, t, TextTokens(tokens, mask))
        assert calls[0] == (0 if kernel == "math" else 5)  # refiner + 2 x (self, cross)
        (v.square().mean() + lv.mean()).backward()
        res[kernel] = (
            v.detach(),
            lv.detach(),
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        )
    torch.testing.assert_close(res["math"][0], res["sdpa"][0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(res["math"][1], res["sdpa"][1], atol=1e-6, rtol=1e-5)
    assert res["math"][2].keys() == res["sdpa"][2].keys()
    for n in res["sdpa"][2]:
        torch.testing.assert_close(res["math"][2][n], res["sdpa"][2][n], atol=1e-6, rtol=1e-4, msg=n)
    # the caption without tokens: its cross-attention output is exactly zero with the math kernel too
    cross = model.blocks[0].cross
    h = torch.randn(3, 64, 64, generator=g)
    context = torch.randn(3, 7, cross.kv.in_features, generator=g)
    set_attention_kernel(model, "math")
    out = cross(h, context, mask)
    assert torch.equal(out[2], torch.zeros_like(out[2])) and torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------
# fused AdamW
# --------------------------------------------------------------------------------------------


def test_fused_adamw_gives_the_parameters_of_the_default_kernel():
    """Three steps with the same gradients (weight decay on, gradients of every scale): the same
    weights and moments. (The gradients are given, not recomputed from each copy: a key bias has an
    exactly-zero true gradient, so recomputed ones are rounding noise that Adam scales up to ``lr``.)"""
    a = _tiny_pft()
    b = copy.deepcopy(a)
    start = [p.detach().clone() for p in a.parameters()]
    opts = [build_adamw(m.parameters(), 1e-2, (0.9, 0.99), 1e-8, 0.1, fused=f) for m, f in ((a, False), (b, True))]
    assert opts[0].param_groups[0]["fused"] is None and opts[1].param_groups[0]["fused"] is True
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        grads = [
            torch.randn(p.shape, generator=g) * 10.0 ** float(torch.randint(-4, 2, (), generator=g)) for p in start
        ]
        for m, opt in zip((a, b), opts):
            for p, gr in zip(m.parameters(), grads):
                p.grad = gr.clone()
            opt.step()
    for (n, pa), pb, p0 in zip(a.named_parameters(), b.parameters(), start):
        assert not torch.equal(pa, p0), n  # every weight took the steps
        torch.testing.assert_close(pb, pa, atol=1e-7, rtol=1e-6, msg=n)
    for pa, pb in zip(a.parameters(), b.parameters()):
        sa, sb = opts[0].state[pa], opts[1].state[pb]
        assert float(sa["step"]) == float(sb["step"]) == 3.0
        torch.testing.assert_close(sb["exp_avg"], sa["exp_avg"], atol=0, rtol=1e-6)
        torch.testing.assert_close(sb["exp_avg_sq"], sa["exp_avg_sq"], atol=0, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# config keys
# --------------------------------------------------------------------------------------------


def test_resolution_of_the_auto_choices():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_attention_kernel("auto", "bf16", cpu) == "math"
    assert resolve_attention_kernel("auto", "fp32", cpu) == "sdpa"  # fp32 numerics unchanged
    assert resolve_attention_kernel("auto", "bf16", cuda) == "sdpa"
    assert resolve_attention_kernel("math", "fp32", cuda) == "math"
    assert resolve_attention_kernel("sdpa", "bf16", cpu) == "sdpa"
    assert [resolve_fused(c, cpu) for c in ("auto", "true", "false", True, False, "True", "FALSE")] == [
        True,
        True,
        False,
        True,
        False,
        True,
        False,
    ]
    assert resolve_fused("auto", cuda) is True and resolve_fused("auto", torch.device("mps")) is False
    with pytest.raises(ValueError, match="train.attention"):
        resolve_attention_kernel("flash", "bf16", cpu)
    with pytest.raises(ValueError, match="optim.fused"):
        resolve_fused("yes", cpu)


@pytest.mark.parametrize(
    "override,match",
    [
        ("train.attention=flash", r"train.attention must be one of auto, sdpa, math; got 'flash'"),
        ("train.attention=", r"train.attention must be one of auto, sdpa, math; got ''"),
        ("optim.fused=yes", r"optim.fused must be one of auto, true, false; got 'yes'"),
        ("optim.fused=1", r"optim.fused must be one of auto, true, false; got '1'"),
    ],
)
def test_bad_values_are_refused(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config("tiny-test", [override])


def test_good_values_and_defaults(tmp_path):
    cfg = load_config("tiny-test")
    assert cfg.train.attention == "auto" and cfg.optim.fused == "auto"
    assert load_config("tiny-test", ["optim.fused=false", "train.attention=math"]).optim.fused == "false"
    path = tmp_path / "c.yaml"
    path.write_text("base: tiny-test\noptim:\n  fused: true\ntrain:\n  attention: sdpa\n")
    cfg = load_config(path)
    assert cfg.optim.fused is True and cfg.train.attention == "sdpa"


# --------------------------------------------------------------------------------------------
# the trainer
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,kernel,fused",
    [
        (("train.attention=math", "optim.fused=true"), "math", True),
        (("train.attention=sdpa", "optim.fused=false"), "sdpa", None),
        (("train.precision=bf16",), "math", True),  # auto: math for bf16 on the CPU, fused AdamW
        ((), "sdpa", True),  # fp32 (tiny-test) + auto: SDPA
    ],
)
def test_trainer_honours_the_options(tmp_path, monkeypatch, overrides, kernel, fused):
    cfg = load_config(
        "tiny-test", ["train.device=cpu", "train.max_steps=2", "train.sample_every=2", "train.ckpt_every=2", *overrides]
    )
    tr = Trainer(cfg, tmp_path / "run")
    try:
        assert tr.attention_kernel == kernel
        assert tr.optimizer.param_groups[0]["fused"] is fused
        assert all(attention_kernel_of(m) == kernel for m in tr.model.modules() if isinstance(m, Attention))
        assert all(attention_kernel_of(m) == "sdpa" for m in tr.ema.model.modules() if isinstance(m, Attention))
        calls = _count_sdpa(monkeypatch)
        x, y = zip(*(tr.train_data[i] for i in range(8)))
        terms = tr._train_step([(torch.stack(x), torch.tensor([int(v) for v in y]))])
        assert torch.isfinite(terms["loss"])
        assert calls[0] == (0 if kernel == "math" else cfg.model.depth)  # the training forward's kernel
        monkeypatch.undo()
        result = tr.fit()  # end to end: steps, EMA validation and sample grid (SDPA), checkpoint
        assert result.step == 2 and (tmp_path / "run" / "checkpoints" / "last.pt").exists()
        assert tr.optimizer.param_groups[0]["fused"] is fused
    finally:
        tr.close()
