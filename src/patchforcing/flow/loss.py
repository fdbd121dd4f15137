"""The Patch Forcing objective: patch-wise flow matching plus the difficulty (NLL) term.

    L = mean((v - u)^2) + lambda * mean(0.5 * (log(2 pi) + lv + (u - sg(v))^2 / exp(lv)))

``lv`` is the model's log-variance clamped to ``[-30, 20]`` (zero gradient outside); both means
run over all ``B * C * H * W`` elements (``lv`` broadcasts over channels). The velocity learns
only from the flow-matching term (stop-gradient in the NLL).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from .path import interpolate, target_velocity
from .timesteps import TimestepSampler, make_timestep_sampler

__all__ = ["LOGVAR_MIN", "LOGVAR_MAX", "gaussian_nll", "patch_flow_loss", "segment_losses"]

LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0
_LOG_2PI = math.log(2 * math.pi)


class VelocityModel(Protocol):
    """What the objective needs of a network: ``model(x, t, y) -> (v, logvar | None)``."""

    patch_size: int
    num_patches: int
    per_patch_time: bool

    def __call__(self, x: Tensor, t: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor | None]: ...


def gaussian_nll(u: Tensor, v: Tensor, logvar: Tensor) -> Tensor:
    """Element-wise Gaussian NLL of ``u`` under ``N(sg(v), exp(lv))``, ``lv`` clamped to [-30, 20].

    Args:
        u: ``(B, C, H, W)`` target; v: ``(B, C, H, W)`` prediction (detached here);
        logvar: ``(B, 1, H, W)`` (broadcast over channels).
    Returns:
        ``(B, C, H, W)``.
    """
    lv = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
    return 0.5 * (_LOG_2PI + lv + (u - v.detach()) ** 2 * torch.exp(-lv))


def patch_flow_loss(
    model: VelocityModel,
    x1: Tensor,
    y: Tensor | None = None,
    x0: Tensor | None = None,
    t: Tensor | None = None,
    timestep_sampler: TimestepSampler | Callable[..., Tensor] | str = "ltg",
    uncertainty_weight: float = 0.01,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Loss terms of one batch.

    Args:
        model: ``model(x, t, y) -> (v, logvar)``; ``logvar`` may be ``None`` (SiT: no NLL term).
        x1: ``(B, C, H, W)`` data.
        y: ``(B,)`` labels (``num_classes`` = null) or ``None``.
        x0: ``(B, C, H, W)`` noise; drawn from ``N(0, I)`` with ``generator`` when ``None``.
        t: ``(B, N)`` per-patch times (or ``(B,)``); drawn with ``timestep_sampler`` when ``None``.
        timestep_sampler: a sampler object, a callable ``(B, N, generator=...) -> (B, N)`` or a name.
        uncertainty_weight: lambda, the weight of the NLL term (0.01 in the paper).
        generator: randomness for ``x0`` and ``t``.
    Returns:
        dict with scalar tensors ``"loss"``, ``"fm"`` (flow matching MSE), ``"nll"``, and the
        ``(B, N)`` float32 times ``"t"`` that were used (detached).
    """
    if x1.dim() != 4:
        raise ValueError(f"x1 must be (B, C, H, W), got shape {tuple(x1.shape)}")
    B = x1.shape[0]
    p = model.patch_size
    if x0 is None:
        x0 = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
    elif x0.shape != x1.shape:
        raise ValueError(f"x0 shape {tuple(x0.shape)} does not match x1 shape {tuple(x1.shape)}")
    if t is None:
        sampler = make_timestep_sampler(timestep_sampler) if isinstance(timestep_sampler, str) else timestep_sampler
        num_patches = (x1.shape[-2] // p) * (x1.shape[-1] // p)
        t = sampler(B, num_patches, generator=generator, device=x1.device)
    t = t.to(x1.device)
    if t.dim() == 2 and not getattr(model, "per_patch_time", True):
        # the SiT baseline takes one time per image; a per-image sampler gives equal rows
        if not bool((t == t[:, :1]).all()):
            raise ValueError("this model takes one time per image; use a per-image timestep sampler")
        t = t[:, 0]
    xt = interpolate(x0, x1, t, p)
    u = target_velocity(x0, x1)
    v, logvar = model(xt, t, y)
    v = v.float()
    fm = torch.mean((v - u.float()) ** 2)
    if logvar is not None:
        nll = torch.mean(gaussian_nll(u.float(), v, logvar.float()))
        loss = fm + uncertainty_weight * nll
    else:
        nll = torch.zeros((), device=fm.device)
        loss = fm
    return {"loss": loss, "fm": fm, "nll": nll, "t": t.detach().float()}


@torch.no_grad()
def segment_losses(
    model: VelocityModel,
    x1: Tensor,
    y: Tensor | None = None,
    num_segments: int = 8,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Validation flow-matching loss at ``num_segments`` equal t-segments (one t per image).

    Each segment ``j`` uses ``t = (j + 0.5) / num_segments`` for the whole batch, with the same
    noise for every segment, so the numbers are comparable across models and steps.

    Args:
        x1: ``(B, C, H, W)`` data; y: ``(B,)`` or ``None``.
    Returns:
        ``(num_segments,)`` float32 mean squared velocity errors.
    """
    x0 = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
    u = target_velocity(x0, x1)
    out = []
    for j in range(num_segments):
        t = torch.full((x1.shape[0],), (j + 0.5) / num_segments, device=x1.device)
        v, _ = model(interpolate(x0, x1, t, model.patch_size), t, y)
        out.append(torch.mean((v.float() - u.float()) ** 2))
    return torch.stack(out).cpu()
