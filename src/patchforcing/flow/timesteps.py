"""Per-patch timestep samplers for Patch Forcing training (docs/method.md, section 3).

Every sampler is a small frozen dataclass holding its parameters. Calling it draws a float32
tensor of shape ``(B, N)`` (B images, N patches each) with values in ``[0, 1]``, where
``t = 0`` is noise and ``t = 1`` is data::

    sampler = make_timestep_sampler("ltg", loc=0.7, scale=1.0, std=0.6)
    t = sampler(batch_size, num_patches, generator=g, device=None)     # (B, N) float32

All randomness comes from ``generator`` (drawn on the generator's device; without a generator on
``device``, default CPU), so a seeded generator reproduces the same draw. ``sample_with_info``
returns the draw together with the per-row latent (the shared time, mean or maximum) and, for
the truncated samplers, the mask of patches that were redrawn uniformly, for tests and analysis.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "TIMESTEP_SAMPLERS",
    "TimestepDraw",
    "TimestepSampler",
    "UniformSampler",
    "LogitNormalSampler",
    "PerPatchUniformSampler",
    "SRMSampler",
    "GaussianSampler",
    "TruncatedGaussianSampler",
    "LTGSampler",
    "make_timestep_sampler",
]


class TimestepDraw(NamedTuple):
    """One draw: ``t`` (B, N) float32; ``row`` (B,) float32 per-row latent (the shared time for
    per-image samplers, the mean for ``gaussian``/``srm``, the maximum m for ``truncated_gaussian``
    and ``ltg``; ``None`` for ``per_patch_uniform``); ``redrawn`` (B, N) bool marking patches that
    were replaced by a U(0, m) draw (truncated samplers only, else ``None``)."""

    t: Tensor
    row: Tensor | None
    redrawn: Tensor | None


def _check_param(name: str, value: object, *, positive: bool = False, nonneg: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if nonneg and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _rand(
    shape: tuple[int, ...], gen: torch.Generator | None, device: torch.device, dtype: torch.dtype = torch.float32
) -> Tensor:
    return torch.rand(shape, generator=gen, device=device, dtype=dtype)


def _randn(
    shape: tuple[int, ...], gen: torch.Generator | None, device: torch.device, dtype: torch.dtype = torch.float32
) -> Tensor:
    return torch.randn(shape, generator=gen, device=device, dtype=dtype)


@dataclass(frozen=True)
class TimestepSampler:
    """Base class: ``sampler(B, N, *, generator=None, device=None) -> (B, N)`` float32 in [0, 1]."""

    name: ClassVar[str] = ""

    def __call__(
        self, batch_size: int, num_patches: int, *, generator: torch.Generator | None = None, device=None
    ) -> Tensor:
        """Draw timesteps of shape ``(batch_size, num_patches)``, float32, in [0, 1]."""
        return self.sample_with_info(batch_size, num_patches, generator=generator, device=device).t

    def sample_with_info(
        self, batch_size: int, num_patches: int, *, generator: torch.Generator | None = None, device=None
    ) -> TimestepDraw:
        """Like ``__call__`` but also return the per-row latent and the redraw mask (see
        :class:`TimestepDraw`). Consumes the generator exactly as ``__call__`` does."""
        for arg, v in (("batch_size", batch_size), ("num_patches", num_patches)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{arg} must be a positive int, got {v!r}")
        out_device = torch.device(device) if device is not None else None
        draw_device = generator.device if generator is not None else (out_device or torch.device("cpu"))
        t, row, redrawn = self._sample(batch_size, num_patches, generator, draw_device)
        out_device = out_device or draw_device
        t = t.to(device=out_device, dtype=torch.float32).clamp_(0.0, 1.0)
        row = None if row is None else row.to(device=out_device, dtype=torch.float32)
        redrawn = None if redrawn is None else redrawn.to(out_device)
        return TimestepDraw(t, row, redrawn)

    def _sample(
        self, B: int, N: int, gen: torch.Generator | None, device: torch.device
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        raise NotImplementedError


@dataclass(frozen=True)
class UniformSampler(TimestepSampler):
    """SiT baseline: one ``t ~ U(0, 1)`` per image, shared by all patches. ``(B, N)``, equal rows."""

    name: ClassVar[str] = "uniform"

    def _sample(self, B, N, gen, device):
        t = _rand((B,), gen, device)
        return t[:, None].expand(B, N).contiguous(), t, None


@dataclass(frozen=True)
class LogitNormalSampler(TimestepSampler):
    """SD3 baseline: one ``t = sigmoid(loc + scale * z)``, ``z ~ N(0, 1)`` per image, shared by
    all patches. ``(B, N)``, equal rows."""

    name: ClassVar[str] = "logit_normal"
    loc: float = 0.0
    scale: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "loc", _check_param("loc", self.loc))
        object.__setattr__(self, "scale", _check_param("scale", self.scale, nonneg=True))

    def _sample(self, B, N, gen, device):
        t = torch.sigmoid(self.loc + self.scale * _randn((B,), gen, device))
        return t[:, None].expand(B, N).contiguous(), t, None


@dataclass(frozen=True)
class PerPatchUniformSampler(TimestepSampler):
    """Naive diffusion forcing: ``t_i ~ U(0, 1)`` independently for every patch. ``(B, N)``."""

    name: ClassVar[str] = "per_patch_uniform"

    def _sample(self, B, N, gen, device):
        return _rand((B, N), gen, device), None, None


def _sample_gamma(alpha: Tensor, gen: torch.Generator | None) -> Tensor:
    """Gamma(alpha, 1) for ``alpha >= 1`` (any shape), Marsaglia–Tsang with vectorised rejection.

    Each round draws one normal and one uniform for every still-pending element; acceptance is
    above 95 % for alpha >= 1, so a handful of rounds suffice."""
    d = alpha - 1.0 / 3.0
    c = 1.0 / torch.sqrt(9.0 * d)
    out = torch.empty_like(alpha)
    pending = torch.arange(alpha.numel(), device=alpha.device)
    d, c = d.reshape(-1), c.reshape(-1)
    flat = out.view(-1)
    while pending.numel() > 0:
        dp, cp = d[pending], c[pending]
        x = _randn((pending.numel(),), gen, alpha.device, alpha.dtype)
        u = _rand((pending.numel(),), gen, alpha.device, alpha.dtype)
        v = (1.0 + cp * x) ** 3
        ok = v > 0
        vs = torch.where(ok, v, torch.ones_like(v))
        ok &= torch.log(u) < 0.5 * x * x + dp - dp * vs + dp * torch.log(vs)
        flat[pending[ok]] = (dp * vs)[ok]
        pending = pending[~ok]
    return out


@dataclass(frozen=True)
class SRMSampler(TimestepSampler):
    """Spatial Reasoning Models: per image draw ``mean ~ U(0, 1)`` and split the total ``N * mean``
    over the patches by recursive halving. A block of size ``d >= 2`` with total ``T`` splits into
    ``d1 = d // 2`` and ``d2 = d - d1``; the first part gets ``lo + f * (hi - lo)`` with
    ``lo = max(0, T - d2)``, ``hi = min(d1, T)`` and ``f ~ Beta(a, a)``,
    ``a = (d - 1 - d % 2) ** 1.05``; the second part gets the rest. Blocks of size 1 keep their
    total, so every ``t_i`` lies in [0, 1] and each row averages exactly ``mean``. Finally the
    patches of each row are shuffled by an independent random permutation. ``(B, N)``.

    The recursion runs level by level (all blocks of one depth at once) in float64."""

    name: ClassVar[str] = "srm"

    def _sample(self, B, N, gen, device):
        mean = _rand((B,), gen, device)
        t = _srm_split(mean, N, gen)
        perm = _rand((B, N), gen, device).argsort(dim=1)
        return t.gather(1, perm), mean, None


def _srm_split(mean: Tensor, N: int, gen: torch.Generator | None) -> Tensor:
    """Recursive halving of the totals ``N * mean`` (mean (B,)) into ``(B, N)`` values in [0, 1],
    unshuffled (left-to-right block order). Runs level by level in float64 (float32 on MPS)."""
    device = mean.device
    dtype = torch.float32 if device.type == "mps" else torch.float64
    totals = (mean.to(dtype) * N)[:, None]  # (B, L) block totals, L blocks per row
    sizes = torch.tensor([N], device=device, dtype=dtype)  # (L,) block sizes, same for every row
    while bool((sizes > 1).any()):
        split = sizes > 1
        d1 = torch.where(split, torch.floor(sizes / 2), sizes)  # a size-1 block becomes (1, 0)
        d2 = sizes - d1
        lo = torch.clamp(totals - d2, min=0.0)
        hi = torch.minimum(d1.expand_as(totals), totals)
        a = torch.where(split, (sizes - 1 - torch.remainder(sizes, 2)) ** 1.05, torch.ones_like(sizes))
        a = a.expand_as(totals).contiguous()
        x, y = _sample_gamma(a, gen), _sample_gamma(a, gen)
        t1 = torch.minimum(torch.maximum(lo + x / (x + y) * (hi - lo), lo), hi)
        keep = torch.stack([d1 > 0, d2 > 0], dim=1).reshape(-1)  # drop the empty halves
        sizes = torch.stack([d1, d2], dim=1).reshape(-1)[keep]
        totals = torch.stack([t1, totals - t1], dim=2).reshape(totals.shape[0], -1)[:, keep]
    return totals


@dataclass(frozen=True)
class GaussianSampler(TimestepSampler):
    """Per image ``m ~ U(0, 1)``; ``t_i = clamp(m + z_i * min(min(m, 1 - m) / 2, std), 0, 1)``
    with ``z_i ~ N(0, 1)`` per patch. ``(B, N)``; ``row`` is m."""

    name: ClassVar[str] = "gaussian"
    std: float = 0.6

    def __post_init__(self) -> None:
        object.__setattr__(self, "std", _check_param("std", self.std, positive=True))

    def _sample(self, B, N, gen, device):
        m = _rand((B, 1), gen, device)
        sigma = torch.clamp(torch.minimum(m, 1.0 - m) / 2, max=self.std)
        t = m + _randn((B, N), gen, device) * sigma
        return t.clamp(0.0, 1.0), m[:, 0], None


def _truncated_below_max(
    m: Tensor, N: int, std: float, gen: torch.Generator | None, device: torch.device
) -> tuple[Tensor, Tensor]:
    """``t_i = m - |z_i| * min(m / 2, std)`` for ``m`` (B, 1); negatives replaced by U(0, m).
    Returns ``(t, redrawn)``, both (B, N)."""
    z = _randn((m.shape[0], N), gen, device)
    t = m - z.abs() * torch.clamp(m / 2, max=std)
    redraw = _rand((m.shape[0], N), gen, device) * m
    neg = t < 0
    return torch.where(neg, redraw, t), neg


@dataclass(frozen=True)
class TruncatedGaussianSampler(TimestepSampler):
    """Per image maximum ``m ~ U(0, 1)``; ``t_i = m - |z_i| * min(m / 2, std)``, values below 0
    replaced by ``U(0, m)`` draws, so every ``t_i <= m``. ``(B, N)``; ``row`` is m."""

    name: ClassVar[str] = "truncated_gaussian"
    std: float = 0.6

    def __post_init__(self) -> None:
        object.__setattr__(self, "std", _check_param("std", self.std, positive=True))

    def _sample(self, B, N, gen, device):
        m = _rand((B, 1), gen, device)
        t, neg = _truncated_below_max(m, N, self.std, gen, device)
        return t, m[:, 0], neg


@dataclass(frozen=True)
class LTGSampler(TimestepSampler):
    """Logit-truncated-Gaussian (the default): per image maximum ``m = sigmoid(loc + scale * z)``,
    then as ``truncated_gaussian``: ``t_i = m - |z_i| * min(m / 2, std)``, negatives replaced by
    ``U(0, m)``. With the defaults std never binds (m / 2 <= 0.5 < 0.6). ``(B, N)``; ``row`` is m."""

    name: ClassVar[str] = "ltg"
    loc: float = 0.7
    scale: float = 1.0
    std: float = 0.6

    def __post_init__(self) -> None:
        object.__setattr__(self, "loc", _check_param("loc", self.loc))
        object.__setattr__(self, "scale", _check_param("scale", self.scale, nonneg=True))
        object.__setattr__(self, "std", _check_param("std", self.std, positive=True))

    def _sample(self, B, N, gen, device):
        m = torch.sigmoid(self.loc + self.scale * _randn((B, 1), gen, device))
        t, neg = _truncated_below_max(m, N, self.std, gen, device)
        return t, m[:, 0], neg


TIMESTEP_SAMPLERS: dict[str, type[TimestepSampler]] = {
    cls.name: cls
    for cls in (
        UniformSampler,
        LogitNormalSampler,
        PerPatchUniformSampler,
        SRMSampler,
        GaussianSampler,
        TruncatedGaussianSampler,
        LTGSampler,
    )
}


def make_timestep_sampler(name: str, **kwargs: float) -> TimestepSampler:
    """Build the sampler registered under ``name`` with parameters ``kwargs``.

    Raises ``ValueError`` for an unknown name (listing the known ones), for an argument the
    sampler does not take (listing its parameters) and for an invalid value."""
    if name not in TIMESTEP_SAMPLERS:
        raise ValueError(f"unknown timestep sampler {name!r}; known: {', '.join(TIMESTEP_SAMPLERS)}")
    cls = TIMESTEP_SAMPLERS[name]
    valid = [f.name for f in dataclasses.fields(cls)]
    bad = sorted(set(kwargs) - set(valid))
    if bad:
        params = ", ".join(valid) if valid else "none"
        raise ValueError(
            f"timestep sampler {name!r} got unknown argument(s) {', '.join(bad)}; its parameters: {params}"
        )
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ValueError(f"timestep sampler {name!r}: {e}") from None
