"""Tests for the per-patch timestep samplers (docs/method.md, section 3)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from patchforcing.flow.timesteps import (
    TIMESTEP_SAMPLERS,
    TimestepSampler,
    _sample_gamma,
    _srm_split,
    make_timestep_sampler,
)

NAMES = ["uniform", "logit_normal", "per_patch_uniform", "srm", "gaussian", "truncated_gaussian", "ltg"]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_registry_names_and_classes():
    assert sorted(TIMESTEP_SAMPLERS) == sorted(NAMES)
    for name, cls in TIMESTEP_SAMPLERS.items():
        assert issubclass(cls, TimestepSampler) and cls.name == name
        s = make_timestep_sampler(name)
        assert isinstance(s, cls)
        with pytest.raises(dataclasses.FrozenInstanceError):
            s.some_field = 1.0
    assert make_timestep_sampler("ltg") == make_timestep_sampler("ltg", loc=0.7, scale=1.0, std=0.6)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("B,N", [(64, 256), (5, 1), (9, 7), (3, 2)])
def test_shape_dtype_range(name, B, N):
    t = make_timestep_sampler(name)(B, N, generator=gen(1))
    assert t.shape == (B, N) and t.dtype == torch.float32 and t.device.type == "cpu"
    assert bool(((t >= 0) & (t <= 1)).all())


@pytest.mark.parametrize("name", NAMES)
def test_determinism_and_seed_dependence(name):
    s = make_timestep_sampler(name)
    a, b = s(16, 64, generator=gen(3)), s(16, 64, generator=gen(3))
    assert torch.equal(a, b)
    assert not torch.equal(a, s(16, 64, generator=gen(4)))
    # without a generator it still works (global RNG)
    assert s(2, 3).shape == (2, 3)


@pytest.mark.parametrize("name", NAMES)
def test_float32_under_float64_default(name):
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        t = make_timestep_sampler(name)(4, 10, generator=gen(0))
        d = make_timestep_sampler(name).sample_with_info(4, 10, generator=gen(0))
    finally:
        torch.set_default_dtype(old)
    assert t.dtype == torch.float32 and d.t.dtype == torch.float32
    assert d.row is None or d.row.dtype == torch.float32


@pytest.mark.parametrize("name", NAMES)
def test_call_equals_sample_with_info(name):
    s = make_timestep_sampler(name)
    assert torch.equal(s(8, 12, generator=gen(5)), s.sample_with_info(8, 12, generator=gen(5)).t)


@pytest.mark.parametrize("name", ["uniform", "logit_normal"])
def test_per_image_samplers_have_constant_rows(name):
    d = make_timestep_sampler(name).sample_with_info(4096, 8, generator=gen(0))
    assert torch.equal(d.t, d.row[:, None].expand_as(d.t))
    row = d.row.double()
    if name == "uniform":
        assert abs(row.mean() - 0.5) < 0.02 and abs(row.var() - 1 / 12) < 0.005
    else:  # logit(t) ~ N(0, 1)
        z = torch.logit(row)
        assert abs(z.mean()) < 0.05 and abs(z.std() - 1) < 0.05


def test_logit_normal_parameters():
    d = make_timestep_sampler("logit_normal", loc=-1.0, scale=0.5).sample_with_info(8192, 1, generator=gen(0))
    z = torch.logit(d.row.double())
    assert abs(z.mean() + 1.0) < 0.03 and abs(z.std() - 0.5) < 0.03
    t = make_timestep_sampler("logit_normal", loc=0.3, scale=0.0)(4, 3, generator=gen(0))
    assert torch.allclose(t, torch.full((4, 3), torch.sigmoid(torch.tensor(0.3)).item()))


def test_per_patch_uniform_iid():
    t = make_timestep_sampler("per_patch_uniform")(256, 256, generator=gen(0)).double()
    assert abs(t.mean() - 0.5) < 0.005 and abs(t.var() - 1 / 12) < 0.002
    assert bool((t.std(dim=1) > 0.15).all())  # no constant rows
    assert abs(torch.corrcoef(torch.stack([t[:, 0], t[:, 1]]))[0, 1]) < 0.2


def test_gaussian_rule():
    d = make_timestep_sampler("gaussian").sample_with_info(2048, 64, generator=gen(0))
    m = d.row[:, None]
    # sigma = min(m, 1 - m) / 2 at the default std: the nearer bound is hit iff z < -2 (resp. > 2)
    near = torch.where(m < 0.5, d.t == 0, d.t == 1)
    assert abs(near.double().mean() - 0.02275) < 0.002
    inside = (d.t > 0) & (d.t < 1)
    z = (d.t - m) / (torch.minimum(m, 1 - m) / 2)
    assert abs(z[inside].double().std() - 0.95) < 0.05  # a standard normal, tails cut at ~2
    assert abs(d.t.double().mean() - 0.5) < 0.02
    # tiny std: rows nearly constant, equal to m
    d = make_timestep_sampler("gaussian", std=1e-4).sample_with_info(64, 32, generator=gen(1))
    assert bool(((d.t - d.row[:, None]).abs() <= 1e-3).all())
    assert bool((d.t.std(dim=1) < 3e-4).all())


@pytest.mark.parametrize("name", ["truncated_gaussian", "ltg"])
def test_truncated_samplers_below_max(name):
    d = make_timestep_sampler(name).sample_with_info(1024, 64, generator=gen(2))
    m = d.row[:, None]
    assert bool((d.t <= m).all())
    # non-redrawn entries follow m - |z| * m / 2 (>= 0); redrawn ones lie in [0, m)
    assert bool((d.t[d.redrawn] < m.expand_as(d.t)[d.redrawn]).all())
    assert abs(d.redrawn.double().mean() - 0.0455) < 0.006


def test_truncated_gaussian_small_std():
    d = make_timestep_sampler("truncated_gaussian", std=0.01).sample_with_info(256, 64, generator=gen(0))
    m = d.row[:, None]
    assert bool((d.t <= m).all())
    assert bool((d.t >= m - 0.1).all())  # |z| <= 10 surely
    assert not bool(d.redrawn.any()) or bool((m[d.redrawn.any(dim=1)] < 0.1).all())


def test_ltg_statistics():
    d = make_timestep_sampler("ltg").sample_with_info(4096, 256, generator=gen(7))
    t, m = d.t.double(), d.row.double()
    assert bool((d.t <= d.row[:, None]).all())
    assert abs(d.redrawn.double().mean() - 2 * (1 - 0.5 * (1 + math.erf(2 / math.sqrt(2))))) < 0.002
    assert abs(t.mean() - 0.40) < 0.01
    assert abs(m.mean() - 0.64) < 0.01
    assert abs((t.max(dim=1).values / m).mean() - 0.998) < 0.001
    assert abs(torch.logit(m).mean() - 0.7) < 0.05 and abs(torch.logit(m).std() - 1.0) < 0.05


def test_ltg_std_inert_at_defaults():
    a = make_timestep_sampler("ltg", std=0.6)(128, 64, generator=gen(11))
    b = make_timestep_sampler("ltg", std=10.0)(128, 64, generator=gen(11))
    assert torch.equal(a, b)
    c = make_timestep_sampler("ltg", std=0.05)(128, 64, generator=gen(11))
    assert not torch.equal(a, c)


@pytest.mark.parametrize("alpha", [1.0, 3.0**1.05, 40.0])
def test_gamma_sampler_moments(alpha):
    a = torch.full((100_000,), alpha, dtype=torch.float64)
    x = _sample_gamma(a, gen(0))
    assert bool((x > 0).all())
    assert abs(x.mean() / alpha - 1) < 0.02 and abs(x.var() / alpha - 1) < 0.04


@pytest.mark.parametrize("N", [1, 2, 7, 64, 256])
def test_srm_row_means_exact(N):
    d = make_timestep_sampler("srm").sample_with_info(512, N, generator=gen(N))
    assert torch.allclose(d.t.double().mean(dim=1), d.row.double(), atol=2e-6, rtol=0)
    assert bool(((d.t >= 0) & (d.t <= 1)).all())
    if N > 1:
        assert bool((d.t.std(dim=1) > 0).all())  # rows are not constant
    assert abs(d.row.double().mean() - 0.5) < 0.05  # mean ~ U(0, 1)


def test_srm_is_a_shuffle_of_the_recursive_split():
    B, N = 256, 16
    t = make_timestep_sampler("srm")(B, N, generator=gen(3))
    g = gen(3)
    mean = torch.rand(B, generator=g, dtype=torch.float32)
    ordered = _srm_split(mean, N, g).float()
    assert torch.equal(t.sort(dim=1).values, ordered.sort(dim=1).values)
    assert not torch.equal(t, ordered)
    # independent permutation per row: the position of each row's maximum is spread over patches
    counts = torch.bincount(t.argmax(dim=1), minlength=N)
    assert int((counts > 0).sum()) == N and int(counts.max()) < B // 4


def test_srm_two_patch_split_is_uniform():
    # N = 2: a = 1, so the first patch is uniform on [max(0, 2m - 1), min(1, 2m)]
    d = make_timestep_sampler("srm").sample_with_info(50_000, 2, generator=gen(9))
    m = d.row.double()
    lo, hi = (2 * m - 1).clamp(min=0), (2 * m).clamp(max=1)
    f = (d.t[:, 0].double() - lo) / (hi - lo)
    assert abs(f.mean() - 0.5) < 0.01 and abs(f.var() - 1 / 12) < 0.003


def test_srm_patches_exchangeable():
    t = make_timestep_sampler("srm")(8192, 7, generator=gen(5)).double()
    col = t.mean(dim=0)
    assert float((col - t.mean()).abs().max()) < 0.015


def test_make_timestep_sampler_errors():
    with pytest.raises(ValueError, match="known:.*ltg"):
        make_timestep_sampler("nope")
    with pytest.raises(ValueError, match=r"bogus.*loc, scale, std"):
        make_timestep_sampler("ltg", bogus=1.0)
    with pytest.raises(ValueError, match=r"std.*parameters: none"):
        make_timestep_sampler("uniform", std=0.5)
    with pytest.raises(ValueError, match="std must be > 0"):
        make_timestep_sampler("truncated_gaussian", std=0.0)
    with pytest.raises(ValueError, match="scale must be >= 0"):
        make_timestep_sampler("logit_normal", scale=-1.0)
    with pytest.raises(ValueError, match="loc must be finite"):
        make_timestep_sampler("ltg", loc=float("nan"))
    with pytest.raises(ValueError, match="real number"):
        make_timestep_sampler("gaussian", std="0.5")
    with pytest.raises(ValueError, match="num_patches"):
        make_timestep_sampler("uniform")(4, 0)


def test_device_argument_cpu():
    t = make_timestep_sampler("ltg")(4, 8, device="cpu")
    assert t.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
@pytest.mark.parametrize("name", NAMES)
def test_cuda(name):
    s = make_timestep_sampler(name)
    t = s(16, 64, device="cuda")
    assert t.device.type == "cuda" and t.dtype == torch.float32 and t.shape == (16, 64)
    g = torch.Generator(device="cuda").manual_seed(0)
    a = s(16, 64, generator=g)
    assert a.device.type == "cuda"
    assert torch.equal(a, s(16, 64, generator=torch.Generator(device="cuda").manual_seed(0)))
    # a CPU generator with a CUDA device: drawn on CPU, returned on CUDA, same values
    b = s(16, 64, generator=gen(0), device="cuda")
    assert b.device.type == "cuda" and torch.equal(b.cpu(), s(16, 64, generator=gen(0)))


@pytest.mark.parametrize("N", [4, 5, 8, 13])
def test_srm_top_split_is_symmetric_beta(N):
    # mean 0.5: the top split gives the first N // 2 patches lo + f (hi - lo), f ~ Beta(a, a)
    B, d1 = 40_000, N // 2
    mean = torch.full((B,), 0.5)
    t = _srm_split(mean, N, gen(N))
    T = N * 0.5
    lo, hi = max(0.0, T - (N - d1)), min(float(d1), T)
    f = (t[:, :d1].sum(dim=1) - lo) / (hi - lo)
    a = (N - 1 - N % 2) ** 1.05
    assert abs(f.mean() - 0.5) < 0.01
    assert abs(f.var() / (1 / (4 * (2 * a + 1))) - 1) < 0.05
