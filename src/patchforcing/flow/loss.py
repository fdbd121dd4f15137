"""The Patch Forcing objective: patch-wise flow matching plus the difficulty (NLL) term.

    L = mean((v - u)^2) + lambda * mean(0.5 * (log(2 pi) + lv + (u - sg(v))^2 / exp(lv)))

``lv`` is the model's log-variance clamped to ``[-30, 20]`` (zero gradient outside); both means
run over all ``B * C * H * W`` elements (``lv`` broadcasts over channels). The velocity learns
only from the flow-matching term (stop-gradient in the NLL).

With ``repa=RepaTarget(...)`` the REPA alignment term is added (``docs/repa.md``)::

    L += weight * mean_{b, n}( -cos(z_bn, f_bn) )

``z`` ``(B, N, z_dim)``: the model's projected hidden tokens after block ``encoder_depth`` on the
same noisy input ``x_t`` (same per-patch times) the flow-matching term sees; ``f``: the frozen
encoder's patch features of the clean image, resampled to the model's token grid when the grids
differ (:func:`resample_tokens`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from .path import interpolate, target_velocity
from .timesteps import TimestepSampler, make_timestep_sampler

__all__ = [
    "LOGVAR_MIN",
    "LOGVAR_MAX",
    "RepaTarget",
    "gaussian_nll",
    "patch_flow_loss",
    "repa_alignment",
    "resample_tokens",
    "segment_losses",
    "segment_terms",
]

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


# --------------------------------------------------------------------------------------------
# REPA: representation alignment with a frozen encoder
# --------------------------------------------------------------------------------------------


def _square_grid(tokens: int) -> tuple[int, int]:
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"{tokens} encoder tokens do not form a square grid; give RepaTarget(grid=(h, w))")
    return side, side


def resample_tokens(tokens: Tensor, grid: tuple[int, int], source_grid: tuple[int, int] | None = None) -> Tensor:
    """Resample patch features from their token grid to another (the model's).

    An integer down-scaling (each target cell covers an exact ``k_h x k_w`` block, e.g. 32x32 ->
    16x16) is the exact mean of each block; any other change of grid is bilinear interpolation of
    the feature map (``align_corners=False``, cell centres). Equal grids are returned unchanged.

    Args:
        tokens: ``(B, T, D)``, row-major over ``source_grid`` (default: a square grid of ``T``).
        grid: the target ``(h, w)``.
    Returns:
        ``(B, h * w, D)``.
    """
    B, T, D = tokens.shape
    he, we = source_grid if source_grid is not None else _square_grid(T)
    if he * we != T:
        raise ValueError(f"{T} tokens do not fill a {he}x{we} grid")
    h, w = grid
    if (he, we) == (h, w):
        return tokens
    fmap = tokens.transpose(1, 2).reshape(B, D, he, we)
    if he % h == 0 and we % w == 0:
        out = F.avg_pool2d(fmap, (he // h, we // w))
    else:
        out = F.interpolate(fmap, size=(h, w), mode="bilinear", align_corners=False)
    return out.flatten(2).transpose(1, 2)


def repa_alignment(z: Tensor, features: Tensor) -> Tensor:
    """REPA's alignment term: ``mean_{b, n}(-cos(z_bn, features_bn))`` (a scalar in [-1, 1]).

    Args:
        z: ``(B, N, D)`` projected model tokens; features: ``(B, N, D)`` encoder targets.
    """
    if z.shape != features.shape:
        raise ValueError(
            f"REPA: the projector gives {tuple(z.shape)} but the encoder features are {tuple(features.shape)} "
            "(the projector's z_dim must be the encoder's width; tokens are resampled to the model's grid)"
        )
    return -(F.normalize(z.float(), dim=-1) * F.normalize(features.float(), dim=-1)).sum(-1).mean()


class RepaTarget:
    """What the REPA term aligns the model to: a frozen encoder's patch features of the clean images.

    Give either ``encoder`` and ``images`` (online: ``encoder(images) -> (B, T, D)``, run under
    ``no_grad`` with autocast off, so no gradient can reach it) or ``features`` (cached by
    ``patchforcing encode --repa-encoder``).

    Args:
        encoder: a frozen encoder (:func:`patchforcing.encoders.load_vision_encoder`) or any
            callable ``(B, 3, H, W) in [-1, 1] -> (B, T, D)`` tokens or a ``(B, D, h, w)`` map.
        images: ``(B, 3, H, W)`` clean images in ``[-1, 1]`` (the same, flipped or not, that the
            model's input ``x1`` encodes).
        features: ``(B, T, D)`` precomputed encoder features.
        weight: the term's weight lambda (0.5, REPA's default).
        grid: the encoder's ``(h, w)`` token grid (default: ``encoder.grid(H, W)`` when the encoder
            has it and it is not ``None``, else a square grid of ``T``).
    """

    def __init__(
        self,
        encoder: Callable[[Tensor], Tensor] | None = None,
        images: Tensor | None = None,
        *,
        features: Tensor | None = None,
        weight: float = 0.5,
        grid: tuple[int, int] | None = None,
    ):
        if (features is None) == (encoder is None or images is None):
            raise ValueError("RepaTarget needs either encoder and images (online) or features (cached), not both")
        if features is not None and features.dim() != 3:
            raise ValueError(f"REPA features must be (B, T, D), got shape {tuple(features.shape)}")
        if images is not None and (images.dim() != 4 or images.shape[1] != 3):
            raise ValueError(f"REPA images must be (B, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
        self.encoder, self.images, self.features = encoder, images, features
        self.weight = float(weight)
        self.grid = grid

    @property
    def batch_size(self) -> int:
        return (self.features if self.features is not None else self.images).shape[0]

    def target(self, grid: tuple[int, int]) -> Tensor:
        """The encoder features on the model's token ``grid``: ``(B, h * w, D)`` float32, no grad."""
        feats, source = self.features, self.grid
        if feats is None:
            with torch.no_grad(), torch.autocast(self.images.device.type, enabled=False):
                feats = self.encoder(self.images.float())
            if source is None and hasattr(self.encoder, "grid"):
                source = self.encoder.grid(*self.images.shape[-2:])  # None: a square grid
            if feats.dim() == 4:  # a (B, D, h, w) feature map
                source, feats = tuple(feats.shape[-2:]), feats.flatten(2).transpose(1, 2)
        if feats.dim() != 3:
            raise ValueError(f"the REPA encoder must return (B, T, D) features, got shape {tuple(feats.shape)}")
        return resample_tokens(feats.detach().float(), grid, source)


def patch_flow_loss(
    model: VelocityModel,
    x1: Tensor,
    y: Tensor | None = None,
    x0: Tensor | None = None,
    t: Tensor | None = None,
    timestep_sampler: TimestepSampler | Callable[..., Tensor] | str = "ltg",
    uncertainty_weight: float = 0.01,
    generator: torch.Generator | None = None,
    repa: RepaTarget | None = None,
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
        repa: the REPA target (needs a model with a projector, ``create_model(..., repa=...)``):
            adds ``repa.weight * terms["repa"]`` to the loss (see the module docstring).
    Returns:
        dict with scalar tensors ``"loss"``, ``"fm"`` (flow matching MSE), ``"nll"`` (and
        ``"repa"``, the alignment term, with ``repa``), and the ``(B, N)`` float32 times ``"t"``
        that were used (detached).
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
    if repa is not None:
        if repa.batch_size != B:
            raise ValueError(f"REPA target has {repa.batch_size} items, the batch {B}")
        v, logvar, z = model(xt, t, y, return_projection=True)
        grid = tuple(getattr(model, "grid_size", (x1.shape[-2] // p, x1.shape[-1] // p)))
        repa_term = repa_alignment(z, repa.target(grid))
    else:
        v, logvar = model(xt, t, y)
    v = v.float()
    fm = torch.mean((v - u.float()) ** 2)
    if logvar is not None:
        nll = torch.mean(gaussian_nll(u.float(), v, logvar.float()))
        loss = fm + uncertainty_weight * nll
    else:
        nll = torch.zeros((), device=fm.device)
        loss = fm
    terms = {"loss": loss, "fm": fm, "nll": nll, "t": t.detach().float()}
    if repa is not None:
        terms["loss"] = loss + repa.weight * repa_term
        terms["repa"] = repa_term
    return terms


@torch.no_grad()
def segment_losses(
    model: VelocityModel,
    x1: Tensor,
    y: Tensor | None = None,
    num_segments: int = 8,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Validation flow-matching loss at ``num_segments`` equal t-segments (``segment_terms(...)["fm"]``).

    Returns:
        ``(num_segments,)`` float32 mean squared velocity errors.
    """
    return segment_terms(model, x1, y, num_segments, generator)["fm"]


@torch.no_grad()
def segment_terms(
    model: VelocityModel,
    x1: Tensor,
    y: Tensor | None = None,
    num_segments: int = 8,
    generator: torch.Generator | None = None,
    repa: RepaTarget | None = None,
) -> dict[str, Tensor]:
    """Validation loss terms at ``num_segments`` equal t-segments (one t per image).

    Each segment ``j`` uses ``t = (j + 0.5) / num_segments`` for the whole batch, with the same
    noise for every segment, so the numbers are comparable across models and steps.

    Args:
        x1: ``(B, C, H, W)`` data; y: ``(B,)`` or ``None``.
        repa: with a REPA target, the alignment term of every segment too (same forward calls).
    Returns:
        ``{"fm": (num_segments,)}`` float32 mean squared velocity errors, and ``"repa"``
        ``(num_segments,)`` alignment terms with ``repa``.
    """
    x0 = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
    u = target_velocity(x0, x1)
    p = model.patch_size
    target = repa.target(tuple(getattr(model, "grid_size", (x1.shape[-2] // p, x1.shape[-1] // p)))) if repa else None
    fm, rep = [], []
    for j in range(num_segments):
        t = torch.full((x1.shape[0],), (j + 0.5) / num_segments, device=x1.device)
        xt = interpolate(x0, x1, t, p)
        if target is not None:
            v, _, z = model(xt, t, y, return_projection=True)
            rep.append(repa_alignment(z, target))
        else:
            v, _ = model(xt, t, y)
        fm.append(torch.mean((v.float() - u.float()) ** 2))
    out = {"fm": torch.stack(fm).cpu()}
    if target is not None:
        out["repa"] = torch.stack(rep).cpu()
    return out
