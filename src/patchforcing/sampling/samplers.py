"""ODE integrators: ``euler``, ``euler_pf``, ``dual_loop``, ``look_ahead`` (docs/method.md section 4) and the
``random_context`` control (look-ahead with a random mask of the same size: the paper's "PFT-random").

Every sampler integrates ``dx/dt = v(x, t)`` over an increasing time grid
``s_0 < s_1 < ... < s_K`` (t = 0 noise, t = 1 data) and only talks to the network through a
:class:`~patchforcing.sampling.guidance.GuidedModel`. A sampler knows in advance which calls it
will make (:meth:`Sampler.calls_per_step`), so the NFE of a run is known before it starts and a
step count can be chosen to fit an NFE budget.

Difficulty map: ``exp(logvar)`` averaged over each ``p x p`` patch (``p``: the patch size); the
*certain* patches are those strictly below the per-image ``quantile`` (linear, float64) of the
per-pixel map in which each patch value is repeated ``p * p`` times (:func:`certain_mask`). The
samplers' option is ``quantile=`` (the paper's ``p``); ``p=`` is accepted as a deprecated alias.
"""

from __future__ import annotations

import functools
import hashlib
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..flow.path import clean_estimate, patch_to_pixel, pixel_to_patch
from ..utils.seeding import hashed_generator
from .guidance import GuidedModel, Prediction

__all__ = [
    "SAMPLERS",
    "Sampler",
    "Euler",
    "EulerPF",
    "DualLoop",
    "LookAhead",
    "RandomContext",
    "CallRecord",
    "certain_mask",
    "image_keys",
    "random_mask_like",
    "make_sampler",
    "make_time_grid",
    "resolve_quantile_alias",
]


# --------------------------------------------------------------------------------------------
# Time grids and the difficulty mask
# --------------------------------------------------------------------------------------------

TimeGrid = Tensor | Sequence[float] | Callable[[int], Any] | str | None


def make_time_grid(steps: int, grid: TimeGrid = None) -> Tensor:
    """The time grid of a run, ``(K + 1,)`` float64, strictly increasing, within ``[0, 1]``.

    Args:
        steps: ``K``; ignored when ``grid`` is an explicit sequence.
        grid: ``None``/``"uniform"`` (``linspace(0, 1, K + 1)``); a callable ``K -> grid``; or an
            explicit sequence/tensor of times.
    """
    if grid is None or (isinstance(grid, str) and grid == "uniform"):
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        out = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    elif isinstance(grid, str):
        raise ValueError(f"unknown time grid {grid!r}; use 'uniform', a callable or a sequence of times")
    elif callable(grid):
        out = torch.as_tensor(grid(steps), dtype=torch.float64).flatten()
    else:
        out = torch.as_tensor(grid, dtype=torch.float64).flatten()
    if out.numel() < 2:
        raise ValueError(f"a time grid needs at least 2 points, got {out.numel()}")
    if not bool((out[1:] > out[:-1]).all()):
        raise ValueError(f"the time grid must be strictly increasing, got {out.tolist()}")
    if out[0] < 0 or out[-1] > 1:
        raise ValueError(f"the time grid must lie within [0, 1], got [{out[0]:.4g}, {out[-1]:.4g}]")
    return out


def certain_mask(logvar: Tensor, q: float, patch_size: int) -> Tensor:
    """Certain patches of each image: patch variance strictly below the per-image q-quantile.

    Args:
        logvar: ``(B, 1, H, W)`` log-variance.
        q: quantile in ``[0, 1]`` (the samplers' ``quantile``; 0.4 marks 102 of 256 distinct patches).
        patch_size: ``p`` of the model (pooling cell).
    Returns:
        ``(B, N)`` bool, True = certain.
    """
    patch_var = pixel_to_patch(logvar.float().exp(), patch_size).double()  # (B, N)
    per_pixel = patch_var.repeat_interleave(patch_size * patch_size, dim=1)  # (B, N p^2)
    threshold = torch.quantile(per_pixel, q, dim=1, keepdim=True, interpolation="linear")
    return patch_var < threshold


# --------------------------------------------------------------------------------------------
# Recording (for pictures); free when off
# --------------------------------------------------------------------------------------------


@dataclass
class CallRecord:
    """What one network call saw and said (tensors on the CPU).

    Attributes:
        step: outer step index ``k``; ``call``: index of the call in the run;
        s: the step's start time ``s_k``; ``s_next``: its end time;
        t: ``(B, N)`` per-patch times of the call; x: ``(B, C, H, W)`` its input;
        v: ``(B, C, H, W)`` guided velocity; logvar: ``(B, 1, H, W)`` or ``None``;
        mask: ``(B, N)`` bool certain patches (``None`` where the sampler has no mask);
        x1_hat: ``(B, C, H, W)`` clean estimate ``x + (1 - t) v``.
        active: ``(B, N)`` bool tokens a token-cached partial call recomputed; ``None`` for a full
            call (every token; always without a cache).
    """

    step: int
    call: int
    s: float
    s_next: float
    t: Tensor
    x: Tensor
    v: Tensor
    logvar: Tensor | None
    mask: Tensor | None
    x1_hat: Tensor
    active: Tensor | None = None


class _Recorder:
    def __init__(self, enabled: bool, patch_size: int, num_patches: int):
        self.enabled = enabled
        self.patch_size = patch_size
        self.num_patches = num_patches
        self.items: list[CallRecord] = []

    def add(
        self, step: int, s: float, s_next: float, t: Tensor, x: Tensor, pred: Prediction, mask: Tensor | None
    ) -> None:
        if not self.enabled:
            return
        B = x.shape[0]
        tt = t.expand(B, self.num_patches) if t.dim() == 2 else t[:, None].expand(B, self.num_patches)
        self.items.append(
            CallRecord(
                step=step,
                call=len(self.items),
                s=s,
                s_next=s_next,
                t=tt.detach().float().cpu().clone(),
                x=x.detach().float().cpu().clone(),
                v=pred.v.detach().float().cpu().clone(),
                logvar=None if pred.logvar is None else pred.logvar.detach().float().cpu().clone(),
                mask=None if mask is None else mask.detach().cpu().clone(),
                x1_hat=clean_estimate(x, pred.v, t, self.patch_size).detach().float().cpu(),
                active=None if pred.active is None else pred.active.detach().cpu().clone(),
            )
        )


@dataclass
class StepContext:
    """What a sampler step may use: the guided network, the patch geometry, the recorder, and
    ``state``: a per-run scratch mapping (e.g. :class:`RandomContext`'s per-image keys)."""

    model: GuidedModel
    patch_size: int
    num_patches: int
    recorder: _Recorder
    state: dict[str, Any] = field(default_factory=dict)

    def full(self, x: Tensor, s: float) -> Tensor:
        """``(B,)`` time ``s`` for every image (the model's shared-time path)."""
        return torch.full((x.shape[0],), s, dtype=x.dtype, device=x.device)

    def pixels(self, mask: Tensor, x: Tensor) -> Tensor:
        """``(B, N)`` bool -> ``(B, 1, H, W)`` bool."""
        return patch_to_pixel(mask, self.patch_size, x.shape[-2], x.shape[-1])


# --------------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sampler:
    """Base class: a frozen dataclass of options with a step rule.

    Subclasses set ``name``, ``needs_uncertainty`` and implement :meth:`calls_per_step` (how many
    network calls a step starting at ``s`` makes) and :meth:`step`.
    """

    name: ClassVar[str] = ""
    needs_uncertainty: ClassVar[bool] = False

    def calls_per_step(self, s: float) -> int:
        """Number of network calls made by a step starting at ``s``."""
        return 1

    def cost_breakpoints(self) -> tuple[float, ...] | None:
        """The times at which :meth:`calls_per_step` may change value (it is constant between
        them), or ``None`` when unknown (a subclass that overrides ``calls_per_step`` only).
        Lets :func:`~patchforcing.sampling.steps_for_nfe` fit a budget with a few plans."""
        if type(self).calls_per_step is Sampler.calls_per_step:
            return ()
        return None

    def plan(self, grid: Tensor, guided_at: Callable[[float], bool]) -> tuple[int, int]:
        """``(calls, nfe per image)`` of a run over ``grid`` (exact; no network call)."""
        calls = nfe = 0
        for s in grid[:-1].tolist():
            n = self.calls_per_step(s)
            calls += n
            nfe += n * (2 if guided_at(s) else 1)
        return calls, nfe

    def step(self, ctx: StepContext, x: Tensor, k: int, s: float, s_next: float) -> Tensor:
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Euler(Sampler):
    """Plain Euler: ``x += (s_{k+1} - s_k) v(x, s_k)``; one call per step (the SiT sampler)."""

    name: ClassVar[str] = "euler"

    def step(self, ctx: StepContext, x: Tensor, k: int, s: float, s_next: float) -> Tensor:
        t = ctx.full(x, s)
        pred = ctx.model(x, t, s)
        ctx.recorder.add(k, s, s_next, t, x, pred, self._record_mask(ctx, pred))
        return x + (s_next - s) * pred.v

    def _record_mask(self, ctx: StepContext, pred: Prediction) -> Tensor | None:
        return None


def _check_quantile(name: str, q: Any) -> None:
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0.0 <= q <= 1.0:
        raise ValueError(f"{name}: quantile must be a number in [0, 1], got {q!r}")


def resolve_quantile_alias(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with the deprecated ``p`` renamed to ``quantile`` (with a DeprecationWarning);
    ``ValueError`` when both are given."""
    if "p" not in options:
        return options
    options = dict(options)
    if "quantile" in options:
        raise ValueError(f"{name}: give quantile= or its deprecated alias p=, not both")
    warnings.warn(
        f"{name}: the option p= is deprecated (p is the patch size elsewhere); use quantile=",
        DeprecationWarning,
        stacklevel=3,
    )
    options["quantile"] = options.pop("p")
    return options


class _QuantileOption:
    """Mixin of the samplers with a difficulty mask: the ``p`` alias of ``quantile``."""

    @property
    def p(self) -> float:
        """Deprecated alias of ``quantile``."""
        warnings.warn("the sampler attribute p is deprecated; use quantile", DeprecationWarning, stacklevel=2)
        return self.quantile  # type: ignore[attr-defined]


def _accept_p_alias(cls: type) -> type:
    """Let the dataclass constructor take ``p=`` as a deprecated alias of ``quantile=``."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **resolve_quantile_alias(cls.name, kwargs))

    cls.__init__ = __init__
    return cls


@_accept_p_alias
@dataclass(frozen=True)
class EulerPF(_QuantileOption, Euler):
    """Euler on a PFT (all patches share the time); records the difficulty mask at ``quantile``."""

    name: ClassVar[str] = "euler_pf"
    quantile: float = 0.4

    def __post_init__(self) -> None:
        _check_quantile(self.name, self.quantile)

    def _record_mask(self, ctx: StepContext, pred: Prediction) -> Tensor | None:
        if not ctx.recorder.enabled or pred.logvar is None:
            return None
        return certain_mask(pred.logvar, self.quantile, ctx.patch_size)


@_accept_p_alias
@dataclass(frozen=True)
class DualLoop(_QuantileOption, Sampler):
    """Dual-loop sampler: certain patches take the full step, uncertain ones ``n_inner`` sub-steps.

    At outer step ``k`` one call at ``s_k`` gives ``v`` and the mask (fixed for the step).
    Certain patches: ``x += Delta v``; uncertain: ``x += (Delta / n_inner) v``. Then
    ``n_inner - 1`` calls, with the certain patches at ``s_{k+1}`` acting as context and the
    uncertain ones at ``s_k + j Delta / n_inner``, advance only the uncertain patches.
    ``n_inner`` calls per step; ``n_inner = 1`` is Euler.
    """

    name: ClassVar[str] = "dual_loop"
    needs_uncertainty: ClassVar[bool] = True
    quantile: float = 0.4
    n_inner: int = 4

    def __post_init__(self) -> None:
        _check_quantile(self.name, self.quantile)
        if (
            isinstance(self.n_inner, bool)
            or not isinstance(self.n_inner, (int, float))
            or (not math.isfinite(self.n_inner) or int(self.n_inner) != self.n_inner or self.n_inner < 1)
        ):
            raise ValueError(f"dual_loop: n_inner must be an integer >= 1, got {self.n_inner!r}")

    def calls_per_step(self, s: float) -> int:
        return int(self.n_inner)

    def cost_breakpoints(self) -> tuple[float, ...]:
        return ()

    def step(self, ctx: StepContext, x: Tensor, k: int, s: float, s_next: float) -> Tensor:
        n = int(self.n_inner)
        delta = s_next - s
        inner = delta / n
        t = ctx.full(x, s)
        pred = ctx.model(x, t, s)
        mask = certain_mask(pred.logvar, self.quantile, ctx.patch_size)
        ctx.recorder.add(k, s, s_next, t, x, pred, mask)
        mpix = ctx.pixels(mask, x)
        x = x + torch.where(mpix, delta, inner) * pred.v
        uncertain = ~mpix
        for j in range(1, n):
            t_tok = torch.where(mask, s_next, s + j * inner).to(x.dtype)  # (B, N)
            pred = ctx.model(x, t_tok, s)
            ctx.recorder.add(k, s, s_next, t_tok, x, pred, mask)
            x = torch.where(uncertain, x + inner * pred.v, x)
        return x


@_accept_p_alias
@dataclass(frozen=True)
class LookAhead(_QuantileOption, Sampler):
    """Look-ahead sampler: certain patches are moved ahead to give the uncertain ones context.

    One call at ``s_k`` gives the guided ``v``, the conditional ``v_c`` and the mask. While
    ``s_k <= early_t`` (0.05) it takes a plain Euler step with ``v_c``. Otherwise the certain
    patches move to ``s_ctx = min(context_ratio * s_k, 1)`` with ``v_c``, a second call on that
    state gives ``v_ctx``, and ``x += Delta v`` on certain patches, ``x += Delta v_ctx`` on the
    uncertain ones. Two calls per step (one in the early steps).
    """

    name: ClassVar[str] = "look_ahead"
    needs_uncertainty: ClassVar[bool] = True
    quantile: float = 0.4
    context_ratio: float = 1.4
    early_t: float = 0.05

    def __post_init__(self) -> None:
        _check_quantile(self.name, self.quantile)
        if (
            isinstance(self.context_ratio, bool)
            or not isinstance(self.context_ratio, (int, float))
            or not (math.isfinite(self.context_ratio) and self.context_ratio >= 1.0)
        ):
            raise ValueError(f"look_ahead: context_ratio must be a finite number >= 1, got {self.context_ratio!r}")
        if (
            isinstance(self.early_t, bool)
            or not isinstance(self.early_t, (int, float))
            or not math.isfinite(self.early_t)
        ):
            raise ValueError(f"look_ahead: early_t must be a finite number, got {self.early_t!r}")

    def calls_per_step(self, s: float) -> int:
        return 1 if s <= self.early_t else 2

    def cost_breakpoints(self) -> tuple[float, ...]:
        return (float(self.early_t),)

    def step(self, ctx: StepContext, x: Tensor, k: int, s: float, s_next: float) -> Tensor:
        delta = s_next - s
        t = ctx.full(x, s)
        pred = ctx.model(x, t, s)
        if s <= self.early_t:
            ctx.recorder.add(k, s, s_next, t, x, pred, None)
            return x + delta * pred.v_cond
        mask = self._context_mask(ctx, x, k, pred)
        ctx.recorder.add(k, s, s_next, t, x, pred, mask)
        mpix = ctx.pixels(mask, x)
        s_ctx = min(self.context_ratio * s, 1.0)
        x_ctx = torch.where(mpix, x + (s_ctx - s) * pred.v_cond, x)  # context from the conditional velocity
        t_ctx = torch.where(mask, s_ctx, s).to(x.dtype)  # (B, N)
        pred_ctx = ctx.model(x_ctx, t_ctx, s)
        ctx.recorder.add(k, s, s_next, t_ctx, x_ctx, pred_ctx, mask)
        return x + delta * torch.where(mpix, pred.v, pred_ctx.v)

    def _context_mask(self, ctx: StepContext, x: Tensor, k: int, pred: Prediction) -> Tensor:
        """``(B, N)`` bool: the patches moved ahead as context (the certain ones)."""
        return certain_mask(pred.logvar, self.quantile, ctx.patch_size)


#: salt of the random context masks (:class:`RandomContext`)
_RANDOM_CONTEXT_SALT = 0x72616E646F6D  # "random"
_KEYS = "random_context_keys"


def image_keys(x: Tensor) -> list[int]:
    """One 64-bit key per image of ``x`` ``(B, ...)``: a hash of its float32 bytes (so a key
    depends on the image alone, never on its batch-mates)."""
    a = x.detach().float().cpu().contiguous().numpy()
    return [int.from_bytes(hashlib.blake2b(a[b].tobytes(), digest_size=8).digest(), "little") for b in range(len(a))]


def random_mask_like(mask: Tensor, keys: Sequence[int], seed: int, step: int) -> Tensor:
    """A random ``(B, N)`` bool mask with as many True entries per row as ``mask``.

    Row ``b`` marks the ``mask[b].sum()`` patches with the smallest of ``N`` uniform draws from
    ``hashed_generator(salt, seed, keys[b], step)``: the same for a given (seed, image key, step)
    in any batch, on any device."""
    B, N = mask.shape
    if len(keys) != B:
        raise ValueError(f"random_mask_like: {len(keys)} keys for {B} images")
    draws = [hashed_generator(_RANDOM_CONTEXT_SALT, int(seed), int(key), int(step)) for key in keys]
    scores = torch.stack([torch.rand(N, generator=g) for g in draws])  # (B, N)
    rank = scores.argsort(dim=1).argsort(dim=1)  # (B, N) position of each patch in its row's random order
    return (rank < mask.sum(dim=1, keepdim=True).cpu()).to(mask.device)


@_accept_p_alias
@dataclass(frozen=True)
class RandomContext(LookAhead):
    """Random-context control ("PFT-random"): the look-ahead rule with a random context mask.

    Every step is a :class:`LookAhead` step (same calls, same early Euler steps, same context
    times), except that the patches moved ahead are a random set of the size the uncertainty
    rule would choose (per image: as many patches as ``certain_mask`` marks). The set is drawn
    from ``(seed, image key, step)`` (:func:`random_mask_like`), the image key being a hash of
    the image's initial noise, so a run is deterministic given ``seed`` and its noise and a
    sample does not depend on its batch-mates. Calls per step: those of look-ahead.
    """

    name: ClassVar[str] = "random_context"
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"random_context: seed must be an integer, got {self.seed!r}")

    def step(self, ctx: StepContext, x: Tensor, k: int, s: float, s_next: float) -> Tensor:
        if _KEYS not in ctx.state:  # the first step of a run sees the noise
            ctx.state[_KEYS] = image_keys(x)
        return super().step(ctx, x, k, s, s_next)

    def _context_mask(self, ctx: StepContext, x: Tensor, k: int, pred: Prediction) -> Tensor:
        certain = super()._context_mask(ctx, x, k, pred)
        return random_mask_like(certain, ctx.state[_KEYS], self.seed, k)


SAMPLERS: dict[str, type[Sampler]] = {c.name: c for c in (Euler, EulerPF, DualLoop, LookAhead, RandomContext)}


def make_sampler(name: str | Sampler, **options: Any) -> Sampler:
    """A sampler by name with its options, e.g. ``make_sampler("dual_loop", quantile=0.4, n_inner=4)``
    (``p=`` is a deprecated alias of ``quantile=``).

    Raises:
        ValueError: an unknown sampler, an option it does not take, or an invalid option value.
    """
    if isinstance(name, Sampler):
        if options:
            raise ValueError("options cannot be combined with a sampler object")
        return name
    cls = SAMPLERS.get(name)
    if cls is None:
        raise ValueError(f"unknown sampler {name!r}; available: {sorted(SAMPLERS)}")
    valid = {f.name for f in fields(cls)}
    if "quantile" in valid:
        options = resolve_quantile_alias(name, options)
    bad = sorted(set(options) - valid)
    if bad:
        raise ValueError(f"sampler {name!r} does not take option(s) {bad}; its options are {sorted(valid) or 'none'}")
    return cls(**options)
