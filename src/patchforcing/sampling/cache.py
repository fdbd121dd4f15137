"""Difficulty-aware token caching, sampling side: which tokens a call recomputes, and when to refresh.

``pf.sample(..., cache=pf.TokenCache(active=0.5, refresh_every=4))`` makes most network calls
*partial*: only ``n = ceil(active * N)`` tokens per image (the most uncertain ones by the last
predicted log-variance, a random set for the control, or a user mask) go through the network;
their attention reads the other tokens' keys and values from the last *full* call, layer by
layer (the model side: :mod:`patchforcing.models.token_cache`), and the other tokens keep their
last velocity and log-variance. Every sampler works unchanged: the cache lives in the
:class:`~patchforcing.sampling.guidance.GuidedModel` of a run, the only way samplers call the
network.

The call pattern (:class:`RefreshClock`) is fixed in advance, so a run's FLOPs are known before it
starts (``sample(..., flops=BUDGET)``): a call is **full** when it is

* the first call of the run,
* the ``refresh_every``-th call after the last full call (calls ``0, R, 2R, ...`` when guidance
  does not switch), or
* the first call after a switch between guided and unguided calls (``guidance_interval``): the two
  kinds have different batches (the guided one doubled, null rows first), so the store of one is
  no use to the other. Each switch thus costs one full call and restarts the refresh count.

Every other call is partial. ``active=1.0`` (``n = N``) or ``refresh_every=1`` make every call full:
the run is then the dense run, bit for bit (and costs the same).

With classifier-free guidance both halves of the doubled batch use the same active tokens (those
of their image); each half keeps its own stored keys, values and outputs (they are rows of the
doubled batch). The uncertainty used for the choice is the guided log-variance the sampler sees.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..flow.path import pixel_to_patch
from ..models.token_cache import KVStore, forward_flops, text_length, unpatchify
from ..utils.seeding import hashed_generator

__all__ = [
    "TokenCache",
    "TokenCacheRun",
    "RefreshClock",
    "CallCosts",
    "SELECTIONS",
    "active_count",
    "plan_call_kinds",
    "text_lengths_of",
]

#: how :class:`TokenCache` picks the active tokens (without a ``mask``)
SELECTIONS = ("uncertainty", "random")
#: salt of the random selection (:class:`TokenCache` ``select="random"``)
_RANDOM_SALT = 0x6361636865  # "cache"

#: a user mask: ``(call, x (B, C, H, W), logvar (B, 1, H, W) or None) -> (B, N) bool``, True = active
MaskFn = Callable[[int, Tensor, "Tensor | None"], Tensor]


def active_count(active: float, num_tokens: int) -> int:
    """Active tokens per image: ``ceil(active * N)``, at least 1 (computed so that e.g.
    ``0.3 * 10`` gives 3, not 4, despite float rounding)."""
    return max(1, min(num_tokens, math.ceil(round(active * num_tokens, 9))))


@dataclass(frozen=True)
class TokenCache:
    """Options of token caching (see the module docstring).

    Attributes:
        active: share of each image's tokens a partial call recomputes, in ``(0, 1]`` (default
            0.5); ``n = ceil(active * N)`` tokens, at least one. Not with ``mask``.
        refresh_every: a full call every this many calls (``>= 1``; 1 = every call, the dense run).
        select: ``"uncertainty"`` -- the ``n`` patches with the largest patch mean of
            ``exp(logvar)`` in the last call's (guided) output, per image (ties: the lower index);
            needs a model with a log-variance head -- or ``"random"``, the control: a random set of
            ``n`` patches drawn from ``(seed, image key, call)``, the image key being a hash of the
            image's initial noise, so the choice does not depend on the image's batch-mates.
        mask: a user choice instead of ``select``: a ``(N,)`` or ``(B, N)`` bool tensor (True =
            active; the same set at every partial call) or a callable ``(call, x, logvar) -> (B, N)``
            bool (``x`` ``(B, C, H, W)`` the call's state, ``logvar`` the last ``(B, 1, H, W)`` or
            ``None``). Every row must mark the same number (``>= 1``) of tokens.
        seed: seed of the random selection.
    """

    active: float | None = None
    refresh_every: int = 4
    select: str = "uncertainty"
    mask: Tensor | MaskFn | None = field(default=None, compare=False, repr=False)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mask is not None:
            if self.active is not None:
                raise ValueError("TokenCache: give active= or mask=, not both (the mask sets the active tokens)")
            if not (callable(self.mask) or isinstance(self.mask, Tensor)):
                raise ValueError(
                    f"TokenCache: mask must be a bool tensor (N,) or (B, N), or a callable (call, x, logvar) -> "
                    f"(B, N) bool, got {type(self.mask).__name__}"
                )
            if isinstance(self.mask, Tensor):
                m = self.mask
                if m.dtype != torch.bool or m.dim() not in (1, 2):
                    raise ValueError(
                        f"TokenCache: a mask tensor must be bool (N,) or (B, N), got {m.dtype} {tuple(m.shape)}"
                    )
                _row_count(m if m.dim() == 2 else m[None], "TokenCache: mask")
        else:
            active = 0.5 if self.active is None else self.active
            if isinstance(active, bool) or not isinstance(active, numbers.Real) or not 0.0 < float(active) <= 1.0:
                raise ValueError(f"TokenCache: active must be a number in (0, 1], got {self.active!r}")
            object.__setattr__(self, "active", float(active))
        r = self.refresh_every
        if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1:
            raise ValueError(f"TokenCache: refresh_every must be an integer >= 1, got {r!r}")
        object.__setattr__(self, "refresh_every", int(r))
        if self.select not in SELECTIONS:
            raise ValueError(
                f"TokenCache: select must be one of {', '.join(map(repr, SELECTIONS))}, got {self.select!r}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise ValueError(f"TokenCache: seed must be an integer, got {self.seed!r}")

    # ---- derived ---------------------------------------------------------------------------

    def count(self, num_tokens: int) -> int | None:
        """Active tokens per image of a partial call (``None``: a callable mask decides per call)."""
        if self.mask is None:
            return active_count(self.active, num_tokens)
        if isinstance(self.mask, Tensor):
            m = self.mask if self.mask.dim() == 2 else self.mask[None]
            return _row_count(m, "TokenCache: mask")
        return None

    def is_dense(self, num_tokens: int) -> bool:
        """Whether every call is full (``refresh_every == 1`` or all tokens active): the dense run."""
        return self.refresh_every == 1 or self.count(num_tokens) == num_tokens

    def options(self) -> dict[str, Any]:
        """The options as plain values (for records): the mask as ``"tensor"`` / ``"callable"``."""
        mask = None if self.mask is None else ("tensor" if isinstance(self.mask, Tensor) else "callable")
        return {
            "active": self.active,
            "refresh_every": self.refresh_every,
            "select": self.select if self.mask is None else "mask",
            "mask": mask,
            "seed": self.seed,
        }

    def check(self, model: nn.Module, batch_size: int, num_tokens: int) -> None:
        """Refuse a model or batch the options do not fit (before any network call).

        Raises:
            ValueError: ``select="uncertainty"`` on a model without a log-variance head (use
                ``select="random"``), a model without ``forward_cached``, a mask tensor of another shape.
        """
        if isinstance(self.mask, Tensor):
            shape = tuple(self.mask.shape)
            if shape not in ((num_tokens,), (batch_size, num_tokens)):
                raise ValueError(
                    f"TokenCache: the mask must have shape ({num_tokens},) or ({batch_size}, {num_tokens}) for this "
                    f"batch, got {shape}"
                )
        if self.is_dense(num_tokens):
            return
        if not callable(getattr(model, "forward_cached", None)):
            raise ValueError(
                f"token caching needs a model with forward_cached (PFT, SiT or text-to-image PFT), got "
                f"{type(model).__name__}"
            )
        if self.mask is None and self.select == "uncertainty" and not getattr(model, "predict_uncertainty", False):
            raise ValueError(
                'TokenCache(select="uncertainty") needs a model with a log-variance head (a PFT); this model '
                'has none (SiT): use select="random" or a mask'
            )


def _row_count(mask: Tensor, what: str) -> int:
    """The common number of True entries per row of a ``(B, N)`` bool mask (>= 1), else ValueError."""
    counts = mask.sum(dim=1)
    if counts.numel() == 0 or bool((counts != counts[0]).any()):
        raise ValueError(f"{what} must mark the same number of tokens in every row, got {counts.tolist()}")
    n = int(counts[0])
    if n < 1:
        raise ValueError(f"{what} marks no token; mark at least one per row")
    return n


# --------------------------------------------------------------------------------------------
# The call pattern and its cost
# --------------------------------------------------------------------------------------------


class RefreshClock:
    """Decides, call by call, whether a call is full: the first call, after a guided/unguided
    switch, or ``refresh_every`` calls after the last full one (always, when ``dense``)."""

    def __init__(self, refresh_every: int, dense: bool = False):
        self.refresh_every = refresh_every
        self.dense = dense
        self.mode: bool | None = None  # guided flag of the stored call
        self.since_full = 0

    def next(self, guided: bool) -> bool:
        """Whether the next call (guided or not) is full; advances the clock."""
        full = self.dense or self.mode != guided or self.since_full >= self.refresh_every
        if full:
            self.mode, self.since_full = guided, 0
        self.since_full += 1
        return full


class CallCosts:
    """FLOPs of one call of a model on a run's images (memoised per kind of call).

    Args:
        model: the network (:func:`~patchforcing.models.token_cache.forward_flops` must know it).
        batch_size: images ``B`` (a guided call has ``2 B`` rows).
        image_size: model-space ``(H, W)``.
        text_lengths: text tokens the T2I model keeps in an unguided / guided call (``None``: class model).
    """

    def __init__(
        self,
        model: Any,
        batch_size: int,
        image_size: tuple[int, int],
        text_lengths: tuple[int | None, int | None] = (None, None),
    ):
        self.model, self.batch_size, self.image_size = model, int(batch_size), tuple(map(int, image_size))
        self.text_lengths = text_lengths
        self._memo: dict[tuple[bool, int | None], int] = {}
        p = int(model.config.patch_size)
        self.num_tokens = (self.image_size[0] // p) * (self.image_size[1] // p)

    def __call__(self, guided: bool, active: int | None = None) -> int:
        """FLOPs of a call: guided or not, ``active`` tokens per row (``None``: a full call)."""
        key = (guided, active)
        if key not in self._memo:
            rows = self.batch_size * (2 if guided else 1)
            L = self.text_lengths[1 if guided else 0]
            self._memo[key] = int(
                forward_flops(self.model, rows, self.image_size, active=active, text_length=L)  # type: ignore[arg-type]
            )
        return self._memo[key]


def text_lengths_of(model: Any, plain_input: Any, doubled_input: Any) -> tuple[int | None, int | None]:
    """The text lengths :class:`CallCosts` needs, from a run's network inputs (``None`` for a class model)."""
    if getattr(model, "condition_kind", "class") != "text":
        return None, None
    return tuple(None if inp is None else text_length(inp[1]) for inp in (plain_input, doubled_input))  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# The state of one run
# --------------------------------------------------------------------------------------------


class TokenCacheRun:
    """The cache of one sampling run (owned by its :class:`~patchforcing.sampling.guidance.GuidedModel`).

    Holds the KV store of the last full call, the token outputs of the last call ``(rows, N, p p K)``
    (inactive tokens keep theirs), the last guided log-variance (the uncertainty selection) and the
    image keys of the random selection.
    """

    def __init__(self, policy: TokenCache, model: nn.Module):
        self.policy = policy
        self.model = model
        self.patch_size = int(model.patch_size)
        self.store = KVStore()
        self.tokens: Tensor | None = None
        self.logvar: Tensor | None = None
        self.keys: list[int] | None = None
        self.clock: RefreshClock | None = None
        self.calls = 0

    def evaluate(
        self, x: Tensor, x_in: Tensor, t_in: Tensor, cond_in: Any, guided: bool
    ) -> tuple[Tensor, Tensor | None, Tensor | None, int | None]:
        """One call: ``x`` ``(B, C, H, W)`` the images; ``x_in, t_in, cond_in`` the network's input
        (``2 B`` rows when ``guided``, null rows first).

        Returns:
            ``(v, logvar, active, n)``: the network's outputs for all ``rows`` (``(rows, C, H, W)``,
            ``(rows, 1, H, W)`` or ``None``), the ``(B, N)`` bool active tokens (``None``: a full
            call) and their number per image (``None``: a full call).
        """
        B, N = x.shape[0], (x.shape[-2] // self.patch_size) * (x.shape[-1] // self.patch_size)
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        if self.clock is None:
            self.clock = RefreshClock(self.policy.refresh_every)
            if self.policy.mask is None and self.policy.select == "random":
                from .samplers import image_keys  # (lazy: samplers imports guidance, which imports this)

                self.keys = image_keys(x)  # the first call sees the noise
        call, self.calls = self.calls, self.calls + 1
        full = self.clock.next(guided)
        active = idx = None
        if not full:
            active = self._select(call, x, N)
            n = int(active[0].sum())
            if n == N:
                full = True
                self.clock.mode, self.clock.since_full = guided, 1
            else:
                idx = active.nonzero()[:, 1].view(B, n)  # ascending token order per row
        if full:
            self.store.clear()
            self.tokens = self.model.forward_cached(x_in, t_in, cond_in, store=self.store)
            active = n = None
        else:
            rows_idx = torch.cat([idx, idx]) if guided else idx  # both halves: the image's tokens
            fresh = self.model.forward_cached(x_in, t_in, cond_in, store=self.store, idx=rows_idx)
            where = rows_idx[..., None].expand(-1, -1, fresh.shape[-1])
            self.tokens = self.tokens.scatter(1, where, fresh.to(self.tokens.dtype))
        out = unpatchify(self.tokens, self.patch_size, grid)
        C = self.model.in_channels
        if getattr(self.model, "predict_uncertainty", False):
            return out[:, :C], out[:, C:], active, n
        return out, None, active, n

    def observe(self, logvar: Tensor | None) -> None:
        """Note the guided log-variance ``(B, 1, H, W)`` of the call just made (for the next choice)."""
        self.logvar = logvar

    def _select(self, call: int, x: Tensor, N: int) -> Tensor:
        """``(B, N)`` bool: the active tokens of a partial call."""
        B, policy = x.shape[0], self.policy
        if policy.mask is not None:
            m = policy.mask(call, x, self.logvar) if callable(policy.mask) else policy.mask
            if not isinstance(m, Tensor) or m.dtype != torch.bool or tuple(m.shape) not in ((N,), (B, N)):
                got = f"{m.dtype} {tuple(m.shape)}" if isinstance(m, Tensor) else type(m).__name__
                raise ValueError(f"TokenCache: the mask must be a bool tensor of shape ({B}, {N}) or ({N},), got {got}")
            m = m.to(x.device).expand(B, N)
            _row_count(m, f"TokenCache: the mask of call {call}")
            return m
        n = active_count(policy.active, N)
        if policy.select == "random":
            draws = [hashed_generator(_RANDOM_SALT, int(policy.seed), key, call) for key in self.keys]
            scores = torch.stack([torch.rand(N, generator=g) for g in draws]).to(x.device)  # (B, N)
            chosen = scores.argsort(dim=1, stable=True)[:, :n]
        else:
            if self.logvar is None:  # pragma: no cover - a full call always precedes and sets it
                raise RuntimeError("internal error: uncertainty selection without a previous log-variance")
            var = pixel_to_patch(self.logvar.float().exp(), self.patch_size).double()  # (B, N)
            chosen = var.argsort(dim=1, descending=True, stable=True)[:, :n]
        mask = torch.zeros(B, N, dtype=torch.bool, device=x.device)
        return mask.scatter_(1, chosen, True)


def plan_call_kinds(steps: list[tuple[int, bool]], refresh_every: int, dense: bool) -> dict[tuple[bool, bool], int]:
    """How many calls of each kind ``(guided, full)`` a run makes, from its steps ``(calls, guided)``
    in order: what :class:`RefreshClock` decides call by call, counted per stretch of equally guided
    calls in closed form."""
    segments: list[list[Any]] = []
    for n_calls, guided in steps:
        if segments and segments[-1][1] == guided:
            segments[-1][0] += n_calls
        elif n_calls:
            segments.append([n_calls, guided])
    kinds: dict[tuple[bool, bool], int] = {}
    R, mode, since = refresh_every, None, 0
    for m, g in segments:
        if dense:
            full = m
        elif mode != g:  # a switch (or the first call): full, then every R calls
            full, since, mode = 1 + (m - 1) // R, (m - 1) % R + 1, g
        elif m <= R - since:  # no refresh due within the stretch
            full, since = 0, since + m
        else:
            rest = m - (R - since)
            full, since = 1 + (rest - 1) // R, (rest - 1) % R + 1
        for key, count in (((g, True), full), ((g, False), m - full)):
            if count:
                kinds[key] = kinds.get(key, 0) + count
    return kinds
