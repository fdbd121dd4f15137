"""Sampling in bf16 (``pf.sample(..., precision="bf16")``, ``GenerationSpec.precision``, ``sample --precision``)."""

from __future__ import annotations

import pytest
import torch

import patchforcing as pf
from patchforcing.models.attention import attention_kernel_of, attention_kernel_scope, set_attention_kernel
from patchforcing.sampling.api import network_precision
from patchforcing.sampling.generate import GenerationSpec, sample_indices, sampling_settings

SAMPLERS = ["euler_pf", "dual_loop", "look_ahead", "random_context"]


def _noise(B=4, seed=0):
    return torch.randn(B, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _layers(model):
    from patchforcing.models.transformer import Attention

    return [m for m in model.modules() if isinstance(m, Attention)]


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_bf16_sampling_is_close_to_fp32_but_not_equal(tiny_pft, sampler):
    """Catches a precision flag that is ignored (bit-equal) or that breaks the integration (far off):
    bf16 only rounds the network's outputs, so the images agree to a few per cent."""
    y = torch.tensor([0, 1, 2, 3])
    a = pf.sample(tiny_pft, _noise(), sampler, nfe=12, y=y, cfg_scale=2.0)
    b = pf.sample(tiny_pft, _noise(), sampler, nfe=12, y=y, cfg_scale=2.0, precision="bf16")
    assert b.x.dtype == torch.float32 and (a.calls, a.nfe, a.steps) == (b.calls, b.nfe, b.steps)
    rel = (a.x - b.x).norm() / a.x.norm()
    assert 0 < rel < 0.05, rel


def test_bf16_calls_run_under_autocast_with_math_attention_and_the_kernel_is_restored(tiny_pft):
    """Catches autocast not reaching the network, SDPA kept on the CPU, or a kernel left changed after the run."""
    seen = []
    forward = tiny_pft.forward

    def spy(*args, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), {attention_kernel_of(m) for m in _layers(tiny_pft)}))
        return forward(*args, **kwargs)

    tiny_pft.forward = spy
    set_attention_kernel(tiny_pft, "sdpa")
    pf.sample(tiny_pft, _noise(), "euler_pf", steps=3, y=torch.tensor([0, 1, 2, 3]), precision="bf16")
    pf.sample(tiny_pft, _noise(), "euler_pf", steps=2, y=torch.tensor([0, 1, 2, 3]))
    assert seen == [(True, {"math"})] * 3 + [(False, {"sdpa"})] * 2
    assert {attention_kernel_of(m) for m in _layers(tiny_pft)} == {"sdpa"}


def test_kernel_scope_restores_each_layer_even_after_an_error(tiny_pft):
    """Catches a scope that resets every layer to the default instead of its own kernel, or leaks on errors."""
    layers = _layers(tiny_pft)
    layers[0].attention_kernel = "math"  # a mixed network: layer 0 math, the others unset (sdpa)
    with pytest.raises(RuntimeError, match="boom"):
        with attention_kernel_scope(tiny_pft, "math"):
            assert all(attention_kernel_of(m) == "math" for m in layers)
            raise RuntimeError("boom")
    assert attention_kernel_of(layers[0]) == "math"
    assert all("attention_kernel" not in m.__dict__ for m in layers[1:])
    with pytest.raises(ValueError, match="unknown attention kernel 'flash'"):
        with attention_kernel_scope(tiny_pft, "flash"):
            pass
    assert attention_kernel_of(layers[1]) == "sdpa"


def test_fp32_context_is_a_no_op(tiny_pft):
    with network_precision(tiny_pft, "fp32", torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")
        assert {attention_kernel_of(m) for m in _layers(tiny_pft)} == {"sdpa"}


def test_token_cache_works_in_bf16_and_its_dense_limit_is_exact(tiny_pft):
    """Catches dtype clashes of the K/V store under autocast, and a bf16 cached run whose dense limit
    is not the dense bf16 run."""
    y = torch.tensor([0, 1, 2, 3])
    dense = pf.sample(tiny_pft, _noise(), "look_ahead", nfe=16, y=y, precision="bf16")
    full = pf.sample(tiny_pft, _noise(), "look_ahead", nfe=16, y=y, precision="bf16", cache=pf.TokenCache(active=1.0))
    assert torch.equal(dense.x, full.x)
    part = pf.sample(tiny_pft, _noise(), "look_ahead", nfe=16, y=y, precision="bf16", cache=pf.TokenCache(active=0.5))
    assert torch.isfinite(part.x).all() and part.token_flops < part.full_flops
    assert (part.x - dense.x).norm() / dense.x.norm() < 0.5


def test_bad_precision_is_refused_before_any_call(tiny_pft):
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, got 'fp16'"):
        pf.sample(tiny_pft, _noise(), "euler_pf", steps=2, precision="fp16")
    with pytest.raises(ValueError, match="precision must be one of"):
        GenerationSpec(num_samples=2, precision="half")


def test_generation_records_the_precision_and_old_fp32_records_are_unchanged(tiny_pft):
    """Catches bf16 samples that could resume fp32 shards (same settings record), a changed fp32 record,
    and a spec whose precision never reaches the sampler."""
    fp32 = GenerationSpec(num_samples=3, steps=2)
    bf16 = GenerationSpec(num_samples=3, steps=2, precision="bf16")
    s32, s16 = sampling_settings(tiny_pft, fp32), sampling_settings(tiny_pft, bf16)
    assert "precision" not in s32 and s16["precision"] == "bf16"
    assert {k: v for k, v in s16.items() if k != "precision"} == s32
    x32, _, _ = sample_indices(tiny_pft, fp32, [0, 1, 2])
    x16, _, _ = sample_indices(tiny_pft, bf16, [0, 1, 2])
    assert not torch.equal(x32, x16) and torch.allclose(x32, x16, atol=0.1)


def test_sample_cli_passes_the_precision(tmp_path):
    from patchforcing.cli.app import build_parser
    from patchforcing.cli.sample import spec_from

    args = build_parser().parse_args(["sample", "RUN", "--precision", "bf16", "--out", str(tmp_path / "g.png")])
    assert spec_from(args).precision == "bf16"
    args = build_parser().parse_args(["sample", "RUN", "--out", str(tmp_path / "g.png")])
    assert spec_from(args).precision == "fp32"
