"""One network evaluation inside a sampler: classifier-free guidance, NFE accounting.

A *call* is one forward pass of the network; the NFE of an image counts a guided call twice
(the doubled batch :meth:`Condition.doubled <patchforcing.conditioning.Condition.doubled>`: the
null condition first -- the null class, or the empty caption -- then the real one). Guidance
combines **both** outputs: ``v = v_u + w (v_c - v_u)`` and, with ``guide_uncertainty``,
``logvar = lv_u + w (lv_c - lv_u)``. The network is called ``model(x, t, cond.model_input())``:
class labels reach it as the ``(B,)`` label tensor (exactly as before conditions existed), text as
:class:`~patchforcing.conditioning.TextTokens`.

Every call also notes, on the device and without a host sync, whether the network's outputs were
finite; :meth:`GuidedModel.first_nonfinite_call` reads those notes once, at the end of a run.

With a :class:`~patchforcing.sampling.cache.TokenCache` the GuidedModel owns the run's token cache
(most calls recompute only the active tokens; :mod:`patchforcing.sampling.cache`), and it counts
the matmul FLOPs of every call (``token_flops``) next to those of the same call made densely
(``full_flops``) for models whose cost is known (PFT, SiT, T2I; ``None`` otherwise).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..conditioning import ClassLabels, Condition
from .cache import CallCosts, TokenCache, TokenCacheRun, text_lengths_of

__all__ = ["Prediction", "GuidedModel", "check_guidance"]


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def check_guidance(cfg_scale: Any, guidance_interval: Any) -> tuple[float, tuple[float, float] | None]:
    """Validate the guidance options; returns ``(cfg_scale, guidance_interval)`` as floats.

    Raises:
        ValueError: naming the option: ``cfg_scale`` not a finite number >= 0 (0 = unconditional,
            1 = no guidance), or ``guidance_interval`` not ``(lo, hi)`` with ``0 <= lo < hi <= 1``.
    """
    if not _is_number(cfg_scale):
        raise ValueError(f"cfg_scale must be a number, got {cfg_scale!r}")
    w = float(cfg_scale)
    if not (math.isfinite(w) and w >= 0.0):
        raise ValueError(f"cfg_scale must be a finite number >= 0 (1 = no guidance), got {w}")
    if guidance_interval is None:
        return w, None
    try:
        lo, hi = guidance_interval
    except (TypeError, ValueError):
        raise ValueError(f"guidance_interval must be a pair (lo, hi), got {guidance_interval!r}") from None
    if not (_is_number(lo) and _is_number(hi)):
        raise ValueError(f"guidance_interval must hold two numbers, got {guidance_interval!r}")
    lo, hi = float(lo), float(hi)
    if not (0.0 <= lo < hi <= 1.0):
        raise ValueError(f"guidance_interval (lo, hi) needs 0 <= lo < hi <= 1, got ({lo}, {hi})")
    return w, (lo, hi)


@dataclass
class Prediction:
    """One (possibly guided) evaluation.

    Attributes:
        v: ``(B, C, H, W)`` guided velocity (the plain one without guidance).
        logvar: ``(B, 1, H, W)`` guided (or conditional) log-variance, ``None`` without a head.
        v_cond: ``(B, C, H, W)`` conditional, unguided velocity (``v`` itself without guidance).
        active: ``(B, N)`` bool, the tokens a token-cached partial call recomputed (the others kept
            their last outputs); ``None`` for a full call (every token computed).
    """

    v: Tensor
    logvar: Tensor | None
    v_cond: Tensor
    active: Tensor | None = None


class GuidedModel:
    """Calls ``model(x, t, cond.model_input()) -> (v, logvar)`` with optional CFG and counts the work done.

    Args:
        model: the network.
        cond: a :class:`~patchforcing.conditioning.Condition` of ``B`` rows (class labels, text
            embeddings); ``(B,)`` integer labels (class labels with null class
            ``model.num_classes``); or ``None`` (the network gets ``None``: a class model's null
            class; never guided).
        cfg_scale: guidance scale ``w``; 1 means no guidance (one plain call).
        guidance_interval: ``(lo, hi)``: guidance only at steps whose start time ``s`` satisfies
            ``lo <= s <= hi``; ``None`` means everywhere.
        guide_uncertainty: combine the log-variances with the same rule as the velocities
            (default, as in the paper); otherwise use the conditional log-variance.
        cache: token caching options (``None``: every call dense); the run's cache state lives here.

    Attributes:
        calls, nfe: network calls made, NFE per image.
        token_flops, full_flops: matmul FLOPs spent so far, and what the same calls cost densely
            (equal without a cache); ``None`` for a model whose cost is unknown.
    """

    def __init__(
        self,
        model: nn.Module | None,
        cond: Condition | Tensor | None,
        cfg_scale: float = 1.0,
        guidance_interval: tuple[float, float] | None = None,
        guide_uncertainty: bool = True,
        cache: TokenCache | None = None,
    ):
        if cond is not None and not isinstance(cond, Condition):
            cond = ClassLabels(torch.as_tensor(cond), model.num_classes)
        self.model = model
        self.cond = cond
        self.cfg_scale, self.guidance_interval = check_guidance(cfg_scale, guidance_interval)
        self.guide_uncertainty = guide_uncertainty
        self.calls = 0
        self.nfe = 0
        self._finite: list[Tensor] = []  # per call: 0-dim bool, all outputs finite (on the device)
        # the network's third argument, plain and doubled (null rows first), built once per run
        self._input: Any = None if cond is None else cond.model_input()
        self._doubled_input: Any = None
        if cond is not None and self.cfg_scale != 1.0:
            self._doubled_input = cond.doubled().model_input()
        if cache is not None and not isinstance(cache, TokenCache):
            raise ValueError(f"cache must be a TokenCache, got {type(cache).__name__}")
        self.cache = cache
        self._cache_run: TokenCacheRun | None = None  # made at the first call (the patch count is known then)
        self._costs: CallCosts | None = None
        self._costs_known = True
        self.token_flops: int | None = 0
        self.full_flops: int | None = 0

    @property
    def y(self) -> Any:
        """What the network gets as its third argument in an unguided call (labels, text tokens, ``None``)."""
        return self._input

    def guided_at(self, s: float) -> bool:
        """Whether a call made in a step starting at time ``s`` is guided (costs 2 NFE)."""
        if self._doubled_input is None:
            return False
        if self.guidance_interval is None:
            return True
        lo, hi = self.guidance_interval
        return lo <= s <= hi

    def guidance_breakpoints(self) -> tuple[float, ...] | None:
        """The times at which :meth:`guided_at` may change value (it is constant between them):
        the interval's ends, ``()`` when guidance is on everywhere or nowhere, ``None`` when
        unknown (a subclass overriding ``guided_at``)."""
        if type(self).guided_at is not GuidedModel.guided_at:
            return None
        if self._doubled_input is None or self.guidance_interval is None:
            return ()
        return tuple(self.guidance_interval)

    def __call__(self, x: Tensor, t: Tensor, s: float) -> Prediction:
        """Evaluate at state ``x`` ``(B, C, H, W)`` and times ``t`` ``(B,)`` or ``(B, N)``.

        ``s`` is the start time of the sampler step this call belongs to (for the interval).
        """
        self.calls += 1
        if not self.guided_at(s):
            self.nfe += 1
            v, logvar, active = self._network(x, x, t, self._input, False)
            self._note_finite(v, logvar)
            v = v.to(x.dtype)
            logvar = None if logvar is None else logvar.to(x.dtype)
            self._observe(logvar)
            return Prediction(v, logvar, v, active)
        self.nfe += 2
        w = self.cfg_scale
        v2, lv2, active = self._network(x, torch.cat([x, x]), torch.cat([t, t]), self._doubled_input, True)
        self._note_finite(v2, lv2)
        v_u, v_c = v2.to(x.dtype).chunk(2)
        v = v_u + w * (v_c - v_u)
        logvar = None
        if lv2 is not None:
            lv_u, lv_c = lv2.to(x.dtype).chunk(2)
            logvar = lv_u + w * (lv_c - lv_u) if self.guide_uncertainty else lv_c
        self._observe(logvar)
        return Prediction(v, logvar, v_c, active)

    def _network(
        self, x: Tensor, x_in: Tensor, t_in: Tensor, cond_in: Any, guided: bool
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """The network on ``x_in, t_in, cond_in`` (``x``: the images, ``B`` rows): ``(v, logvar, active)``."""
        p = getattr(self.model, "patch_size", 1)
        N = (x.shape[-2] // p) * (x.shape[-1] // p)
        cached = self.cache is not None and not self.cache.is_dense(N)
        if cached and self._cache_run is None:
            self.cache.check(self.model, x.shape[0], N)  # (sample() checked already; a direct use is checked here)
            self._cache_run = TokenCacheRun(self.cache, self.model)
        if cached:
            v, logvar, active, n = self._cache_run.evaluate(x, x_in, t_in, cond_in, guided)
        else:
            v, logvar = self.model(x_in, t_in, cond_in)
            active = n = None
        self._count(x, guided, n)
        return v, logvar, active

    def _observe(self, logvar: Tensor | None) -> None:
        if self._cache_run is not None:
            self._cache_run.observe(logvar)

    def call_costs(self, batch_size: int, image_size: tuple[int, int]) -> CallCosts | None:
        """The :class:`~patchforcing.sampling.cache.CallCosts` of this run's calls on ``batch_size``
        images of model-space ``image_size`` (``None``: the model's cost is unknown)."""
        if getattr(self.model, "config", None) is None:
            return None
        try:
            costs = CallCosts(
                self.model, batch_size, image_size, text_lengths_of(self.model, self._input, self._doubled_input)
            )
            costs(False)
        except (ValueError, AttributeError, TypeError):
            return None
        return costs

    def _count(self, x: Tensor, guided: bool, active: int | None) -> None:
        if not self._costs_known:
            return
        if self._costs is None:
            self._costs = self.call_costs(x.shape[0], (x.shape[-2], x.shape[-1]))
            if self._costs is None:
                self._costs_known = False
                self.token_flops = self.full_flops = None
                return
        self.token_flops += self._costs(guided, active)
        self.full_flops += self._costs(guided)

    def _note_finite(self, v: Tensor, logvar: Tensor | None) -> None:
        ok = torch.isfinite(v).all()
        if logvar is not None:
            ok = ok & torch.isfinite(logvar).all()
        self._finite.append(ok)

    def first_nonfinite_call(self) -> int | None:
        """Index of the first call whose network output held a NaN or inf (``None``: none did).

        One host sync for the whole run."""
        if not self._finite:
            return None
        ok = torch.stack(self._finite)
        if bool(ok.all()):
            return None
        return int((~ok).nonzero()[0, 0])
