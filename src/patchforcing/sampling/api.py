"""``sample()``: noise in, :class:`SampleResult` out."""

from __future__ import annotations

import bisect
import math
import numbers
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..conditioning import Condition, TextEmbeddings, as_condition, condition_kind
from ..models.attention import attention_kernel_scope
from .cache import TokenCache, plan_call_kinds
from .guidance import GuidedModel, check_guidance
from .samplers import SAMPLERS, CallRecord, Sampler, StepContext, TimeGrid, _Recorder, make_sampler, make_time_grid

__all__ = [
    "SampleResult",
    "NonFiniteSampleError",
    "sample",
    "steps_for_nfe",
    "steps_for_flops",
    "plan_run",
    "plan_flops",
    "accepts_any_size",
    "check_noise_shape",
    "SAMPLING_PRECISIONS",
    "check_precision",
    "network_precision",
]


class NonFiniteSampleError(ValueError):
    """A sampling run produced NaN or inf (NaN weights in the checkpoint, an overflow, ...).

    Attributes:
        call: index of the first network call whose output was not finite (``None`` when every
            output was finite but the state overflowed).
        step: the outer step that call belongs to (the last step for an overflowed state).
    """

    def __init__(self, message: str, call: int | None, step: int):
        super().__init__(message)
        self.call = call
        self.step = step


@dataclass
class SampleResult:
    """The outcome of :func:`sample`.

    Attributes:
        x: ``(B, C, H, W)`` final sample.
        calls: network forward passes made.
        nfe: function evaluations per image (a guided call counts 2).
        steps: outer steps ``K``; grid: ``(K + 1,)`` float64 time grid used.
        sampler: sampler name; options: its options (quantile, n_inner, ...).
        seconds: wall-clock time of the integration.
        record: per-call :class:`CallRecord` list when ``record=True``, else ``None``.
        token_flops: matmul FLOPs the network calls spent (counted from shapes,
            :func:`~patchforcing.models.token_cache.forward_flops`); ``None`` for a model whose
            cost is unknown.
        full_flops: what the same calls would have cost densely (``== token_flops`` without a cache).
        cache: the token cache's options (:meth:`TokenCache.options`), ``None`` without one.
    """

    x: Tensor
    calls: int
    nfe: int
    steps: int
    grid: Tensor
    sampler: str
    options: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    record: list[CallRecord] | None = None
    token_flops: int | None = None
    full_flops: int | None = None
    cache: dict[str, Any] | None = None


# --------------------------------------------------------------------------------------------
# planning: calls and NFE of a run, and the step count that fits an NFE budget
# --------------------------------------------------------------------------------------------


def _breakpoints(sampler: Sampler, guided: GuidedModel) -> list[float] | None:
    """Sorted times between which a step's cost (calls x guidance) is constant; ``None``: unknown."""
    a, b = sampler.cost_breakpoints(), guided.guidance_breakpoints()
    if a is None or b is None:
        return None
    points = sorted({float(v) for v in (*a, *b)})
    if not all(math.isfinite(v) for v in points):
        return None
    return points


def _step_cost(sampler: Sampler, guided: GuidedModel, s: float) -> tuple[int, int]:
    n = sampler.calls_per_step(s)
    return n, n * (2 if guided.guided_at(s) else 1)


def plan_run(sampler: Sampler, grid: Tensor, guided: GuidedModel) -> tuple[int, int]:
    """``(calls, nfe per image)`` of a run over ``grid``; the same as ``sampler.plan(grid,
    guided.guided_at)``, but with the step costs' breakpoints known, each constant piece is counted
    with a binary search over the (sorted) step starts instead of asking every step."""
    points = _breakpoints(sampler, guided)
    if points is None:
        return sampler.plan(grid, guided.guided_at)
    starts = grid[:-1].tolist()
    calls = nfe = 0
    edges = [-math.inf, *points, math.inf]
    for lo, hi in zip(edges[:-1], edges[1:]):  # steps starting in the open piece (lo, hi)
        n = bisect.bisect_left(starts, hi) - bisect.bisect_right(starts, lo)
        if n:
            if math.isfinite(lo) and math.isfinite(hi):
                mid = (lo + hi) / 2
            else:
                mid = hi - 1.0 if math.isfinite(hi) else (lo + 1.0 if math.isfinite(lo) else 0.5)
            c, f = _step_cost(sampler, guided, mid)
            calls, nfe = calls + n * c, nfe + n * f
    for b in points:  # steps starting exactly at a breakpoint
        n = bisect.bisect_right(starts, b) - bisect.bisect_left(starts, b)
        if n:
            c, f = _step_cost(sampler, guided, b)
            calls, nfe = calls + n * c, nfe + n * f
    return calls, nfe


def _uniform_window(sampler: Sampler, guided: GuidedModel, budget: int) -> int | None:
    """An upper bound on the step counts a uniform grid can fit in ``budget`` NFE, within a
    constant of the answer; ``None`` when the cost structure is unknown.

    With cost ``f`` per step constant on pieces of ``[0, 1]``, the ``K`` uniform step starts put
    ``len * K`` (+-2, float rounding included) of them in each piece, so
    ``|nfe(K) - K A| <= E`` with ``A`` the integral of ``f`` and ``E`` a constant: every ``K``
    above ``(budget + E) / A`` overshoots and every one below ``(budget - E) / A`` fits."""
    points = _breakpoints(sampler, guided)
    if points is None:
        return None
    edges = [0.0, *[b for b in points if 0.0 < b < 1.0], 1.0]
    area, total, fmax = 0.0, 0, 0
    for lo, hi in zip(edges[:-1], edges[1:]):
        f = _step_cost(sampler, guided, (lo + hi) / 2)[1]
        area += f * (hi - lo)
        total += f
        fmax = max(fmax, f)
    fmax = max([fmax] + [_step_cost(sampler, guided, b)[1] for b in edges])
    if not area > 0:
        return None
    slack = 2 * total + (len(edges) + 1) * fmax + 1
    return min(budget, int(math.floor((budget + slack) / area)) + 1)


def _check_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def steps_for_nfe(sampler: Sampler, budget: int, guided: GuidedModel, grid: TimeGrid = None) -> int:
    """The largest step count ``K`` in ``[1, budget]`` whose NFE per image fits ``budget`` (for
    equal-compute comparisons).

    Plans only a constant number of step counts for the uniform grid (any sampler whose cost
    breakpoints are known); other grids are scanned (each plan ``O(log K)``).

    Raises:
        ValueError: ``budget`` not a positive integer, or no step count fits.
    """
    budget = _check_count("the NFE budget", budget)
    uniform = grid is None or (isinstance(grid, str) and grid == "uniform")
    top = _uniform_window(sampler, guided, budget) if uniform else None
    if top is not None:
        for k in range(top, 0, -1):  # at most a constant number of plans above the first fit
            # make_time_grid(k)'s uniform grid, without its (here needless) checks
            if plan_run(sampler, torch.linspace(0.0, 1.0, k + 1, dtype=torch.float64), guided)[1] <= budget:
                return k
    else:
        best = 0
        for k in range(1, budget + 1):  # nfe >= calls >= k; the NFE need not grow with k
            if plan_run(sampler, make_time_grid(k, grid), guided)[1] <= budget:
                best = k
        if best:
            return best
    raise ValueError(f"no step count fits an NFE budget of {budget} with sampler {sampler.name!r}")


def plan_flops(
    sampler: Sampler, grid: Tensor, guided: GuidedModel, batch_size: int, image_size: tuple[int, int]
) -> tuple[int | None, int] | None:
    """``(token_flops, full_flops)`` of a run over ``grid`` on ``batch_size`` images of model-space
    ``image_size``, without a network call (the call pattern and the token cache's refresh pattern
    are known in advance). ``None`` when the model's cost is unknown; ``token_flops`` is ``None``
    when a callable mask decides the active count at run time."""
    costs = guided.call_costs(batch_size, image_size)
    if costs is None:
        return None
    cache, N = guided.cache, costs.num_tokens
    if cache is None or cache.is_dense(N):
        calls, nfe = plan_run(sampler, grid, guided)
        dense = (nfe - calls) * costs(True) + (2 * calls - nfe) * costs(False)
        return dense, dense
    steps = [(sampler.calls_per_step(s), guided.guided_at(s)) for s in grid[:-1].tolist()]
    kinds = plan_call_kinds(steps, cache.refresh_every, dense=False)
    full = sum(count * costs(g) for (g, _), count in kinds.items())
    n = cache.count(N)
    if n is None:
        return None, full
    return sum(count * (costs(g) if is_full else costs(g, n)) for (g, is_full), count in kinds.items()), full


#: the most steps :func:`steps_for_flops` plans (a larger budget is refused, not searched)
MAX_FLOP_STEPS = 100_000


def _check_flops_budget(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"the FLOP budget must be a finite number > 0, got {value!r}")
    return float(value)


def steps_for_flops(
    sampler: Sampler,
    budget: float,
    guided: GuidedModel,
    batch_size: int,
    image_size: tuple[int, int],
    grid: TimeGrid = None,
) -> int:
    """The largest step count ``K`` whose planned FLOPs (:func:`plan_flops`, ``token_flops`` of the
    run on ``batch_size`` images: the whole batch, a guided call counting its doubled rows) fit
    ``budget``.

    Every call costs at least ``f_min`` per NFE (the cheapest kind of call), so only step counts
    whose NFE fits ``budget / f_min`` (:func:`steps_for_nfe`) are planned, from the largest down.

    Raises:
        ValueError: a budget that is not a positive number, a model whose cost is unknown, a token
            cache whose active count is decided at run time (a callable mask), or no step count fits.
    """
    budget = _check_flops_budget(budget)
    costs = guided.call_costs(batch_size, image_size)
    if costs is None:
        raise ValueError(
            f"a FLOP budget needs a model whose FLOPs are known (PFT, SiT, text-to-image PFT), got "
            f"{type(guided.model).__name__}"
        )
    cache, N = guided.cache, costs.num_tokens
    n = None
    if cache is not None and not cache.is_dense(N):
        n = cache.count(N)
        if n is None:
            raise ValueError("a FLOP budget needs a known active count: use TokenCache(active=...) or a mask tensor")
    f_min = min(costs(False, n), costs(True, n) / 2)
    nfe_cap = int(budget // f_min)
    fail = ValueError(f"no step count fits a budget of {budget:.4g} FLOPs with sampler {sampler.name!r}")
    if nfe_cap < 1:
        raise fail
    try:
        top = steps_for_nfe(sampler, nfe_cap, guided, grid)
    except ValueError:
        raise fail from None
    if top > MAX_FLOP_STEPS:
        raise ValueError(
            f"a budget of {budget:.4g} FLOPs allows more than {MAX_FLOP_STEPS} steps with sampler {sampler.name!r}; "
            "give steps= or a smaller budget"
        )
    for k in range(top, 0, -1):
        planned = plan_flops(sampler, make_time_grid(k, grid), guided, batch_size, image_size)
        if planned[0] <= budget:
            return k
    raise fail


# --------------------------------------------------------------------------------------------
# sample()
# --------------------------------------------------------------------------------------------


def accepts_any_size(model: nn.Module) -> bool:
    """Whether ``model`` takes any ``H, W`` divisible by its patch size (2-D RoPE, no fixed
    position table): its ``accepts_any_size`` attribute when it has one, else True for a text
    model (the T2I design) and False for a class model (a fixed position table)."""
    flag = getattr(model, "accepts_any_size", None)
    if flag is not None:
        return bool(flag)
    return condition_kind(model) == "text"


def check_noise_shape(model: nn.Module, noise: Tensor) -> None:
    """``noise`` must be ``(B, C, H, W)`` with the model's channels and a size it takes.

    Raises:
        ValueError: naming the expected shape.
    """
    C = getattr(model, "in_channels", noise.shape[1] if noise.dim() == 4 else None)
    if accepts_any_size(model):
        p = getattr(model, "patch_size", 1)
        if noise.dim() != 4 or noise.shape[1] != C or noise.shape[-2] % p or noise.shape[-1] % p:
            raise ValueError(
                f"noise must have shape (B, {C}, H, W) with H and W divisible by the patch size {p} for this "
                f"model, got {tuple(noise.shape)}"
            )
        return
    size = tuple(getattr(model, "image_size", noise.shape[-2:]))
    if noise.dim() != 4 or noise.shape[1] != C or tuple(noise.shape[-2:]) != size:
        raise ValueError(
            f"noise must have shape (B, {C}, {size[0]}, {size[1]}) for this model, got {tuple(noise.shape)}"
        )


def _check(model: nn.Module, noise: Tensor, y: Any, text: Any, cfg_scale: float, sampler: Sampler) -> Condition | None:
    """Validate the inputs of :func:`sample`; returns the condition on ``noise.device`` (``None``:
    a class model sampled unconditionally, which the network gets as ``None``)."""
    check_noise_shape(model, noise)
    if noise.is_floating_point() and not bool(torch.isfinite(noise).all()):
        raise ValueError("noise holds NaN or inf values")
    if sampler.needs_uncertainty and not getattr(model, "predict_uncertainty", False):
        raise ValueError(
            f"sampler {sampler.name!r} needs a model with an uncertainty head (a PFT); "
            f"use one of {sorted(n for n, c in SAMPLERS.items() if not c.needs_uncertainty)} for models without one"
        )
    if sampler.needs_uncertainty and not getattr(model, "per_patch_time", False):
        raise ValueError(f"sampler {sampler.name!r} needs a model with per-patch times (a PFT)")
    if text is not None:
        if y is not None:
            raise ValueError("give the conditioning as y= or as text=, not both")
        if not isinstance(text, TextEmbeddings):
            raise ValueError(f"text must be TextEmbeddings (e.g. text=encoder(prompts)), got {type(text).__name__}")
        y = text
    if y is None and condition_kind(model) != "text":
        if cfg_scale != 1.0:
            raise ValueError("classifier-free guidance (cfg_scale != 1) needs labels y")
        return None
    return as_condition(y, model, noise.shape[0], device=noise.device)


def _raise_if_not_finite(
    guided: GuidedModel, x: Tensor, first_call_of_step: list[int], times: list[float], sampler: Sampler
) -> None:
    """One host sync per run: the first call whose network output was NaN/inf, or an overflowed state."""
    call = guided.first_nonfinite_call()
    hint = (
        "check the checkpoint for NaN/inf weights (or a half-precision overflow), and the guidance "
        f"scale (cfg_scale={guided.cfg_scale:g})"
    )
    if call is not None:
        k = bisect.bisect_right(first_call_of_step, call) - 1
        raise NonFiniteSampleError(
            f"sampling with {sampler.name!r} produced non-finite values: the network output of call {call} "
            f"(step {k}, s = {times[k]:.4g}) holds NaN or inf; {hint}",
            call=call,
            step=k,
        )
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        k = len(first_call_of_step) - 1
        raise NonFiniteSampleError(
            f"sampling with {sampler.name!r} produced non-finite values: the state overflowed to inf by the end of "
            f"step {k}; {hint}",
            call=None,
            step=k,
        )


#: the precisions :func:`sample` runs the network in
SAMPLING_PRECISIONS: tuple[str, ...] = ("fp32", "bf16")


def check_precision(precision: Any) -> str:
    """``precision`` if it is one of :data:`SAMPLING_PRECISIONS`.

    Raises:
        ValueError: naming the bad value and the choices."""
    if not isinstance(precision, str) or precision not in SAMPLING_PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(SAMPLING_PRECISIONS)}, got {precision!r}")
    return precision


@contextmanager
def network_precision(model: nn.Module, precision: str, device: torch.device) -> Iterator[None]:
    """The context the network calls of a run are made in: nothing for ``"fp32"``; bf16 autocast on
    ``device`` for ``"bf16"``, on a CPU also with the matmul-softmax attention kernel (restored after)."""
    if check_precision(precision) == "fp32":
        yield
        return
    with torch.autocast(device.type, dtype=torch.bfloat16):
        if device.type == "cpu":
            with attention_kernel_scope(model, "math"):
                yield
        else:
            yield


def sample(
    model: nn.Module,
    noise: Tensor,
    sampler: str | Sampler = "euler_pf",
    steps: int | None = None,
    *,
    y: Tensor | Condition | None = None,
    text: TextEmbeddings | None = None,
    cfg_scale: float = 1.0,
    nfe: int | None = None,
    flops: float | None = None,
    time_grid: TimeGrid = None,
    guidance_interval: tuple[float, float] | None = None,
    guide_uncertainty: bool = True,
    cache: TokenCache | None = None,
    precision: str = "fp32",
    record: bool = False,
    progress: bool = False,
    **sampler_options: Any,
) -> SampleResult:
    """Integrate from ``noise`` (t = 0) to data (t = 1).

    Args:
        model: ``model(x, t, cond) -> (v, logvar)``, e.g. a PFT or SiT (class labels), or a text
            model (``condition_kind = "text"``, :class:`~patchforcing.conditioning.TextTokens`).
        noise: ``(B, C, H, W)`` standard normal noise (any ``H, W`` divisible by the patch size
            for a model that takes any size, see :func:`accepts_any_size`).
        sampler: a name in :data:`~patchforcing.sampling.SAMPLERS` or a sampler object.
        steps: outer steps ``K``, a positive integer (default 50 when neither ``nfe`` nor an
            explicit grid is given).
        y: ``(B,)`` long labels or any :class:`~patchforcing.conditioning.Condition`; ``None``
            samples a class model unconditionally (null class).
        text: :class:`~patchforcing.conditioning.TextEmbeddings` of ``B`` captions (e.g.
            ``encoder(prompts)``) for a text model; give ``y`` or ``text``, exactly one for a text model.
        cfg_scale: classifier-free guidance scale, finite and ``>= 0`` (1 = none, 0 = unconditional).
        nfe: NFE budget per image (a positive integer) instead of ``steps``: the largest ``K``
            whose NFE fits.
        flops: a budget of matmul FLOPs for the whole batch instead of ``steps`` or ``nfe``: the
            largest ``K`` whose planned ``token_flops`` fit (:func:`steps_for_flops`), for
            comparisons of cached and dense samplers at equal compute.
        time_grid: ``"uniform"`` (default), a callable ``K -> grid`` or explicit increasing times.
        guidance_interval: ``(lo, hi)`` with ``0 <= lo < hi <= 1``: guide only steps starting within it.
        guide_uncertainty: guide the log-variance like the velocity (default).
        cache: :class:`~patchforcing.sampling.cache.TokenCache`: recompute only the active tokens
            at most calls (``None``: every call dense). ``active=1`` or ``refresh_every=1`` give the
            dense run bit for bit.
        precision: ``"fp32"`` (default: the network in float32, as the reference implementation) or
            ``"bf16"``: the network calls run under bf16 autocast (on a CPU with the matmul-softmax
            attention kernel, :func:`~patchforcing.models.attention.attention_kernel_scope`, whose
            bf16 path is faster there); the sampler's state, CFG and updates stay float32. Faster
            where the hardware has bf16 units (measured in ``benchmarks/RESULTS.md``), not bit-equal.
        record: keep a :class:`CallRecord` per call (CPU copies) for pictures.
        progress: show a tqdm bar over the steps.
        **sampler_options: e.g. ``quantile=0.4`` (in ``[0, 1]``; ``p=`` is a deprecated alias),
            ``n_inner=4`` (integer ``>= 1``), ``context_ratio=1.4`` (``>= 1``).
    Returns:
        :class:`SampleResult` with ``x``, ``calls``, ``nfe`` (per image), ``steps``, ``grid``,
        ``token_flops`` and ``full_flops``.
    Raises:
        ValueError: an invalid option (named), before any network call.
        NonFiniteSampleError: the network produced NaN/inf; names the first call and its step.
    """
    sampler_obj = make_sampler(sampler, **sampler_options)
    cfg_scale, guidance_interval = check_guidance(cfg_scale, guidance_interval)
    if steps is not None:
        steps = _check_count("steps", steps)
    if nfe is not None:
        nfe = _check_count("nfe", nfe)
    if flops is not None:
        flops = _check_flops_budget(flops)
    if cache is not None and not isinstance(cache, TokenCache):
        raise ValueError(f"cache must be a TokenCache (e.g. pf.TokenCache(active=0.5)), got {type(cache).__name__}")
    precision = check_precision(precision)
    cond = _check(model, noise, y, text, cfg_scale, sampler_obj)
    patch = getattr(model, "patch_size", 1)
    num_patches = (noise.shape[-2] // patch) * (noise.shape[-1] // patch)  # of this noise, not a default size
    if cache is not None:
        cache.check(model, noise.shape[0], num_patches)
    guided = GuidedModel(model, cond, cfg_scale, guidance_interval, guide_uncertainty, cache=cache)
    batch, size = noise.shape[0], (noise.shape[-2], noise.shape[-1])

    explicit_grid = time_grid is not None and not callable(time_grid) and not isinstance(time_grid, str)
    if nfe is not None and flops is not None:
        raise ValueError("give either an NFE budget or a FLOP budget, not both")
    if nfe is not None or flops is not None:
        if steps is not None or explicit_grid:
            what = "an NFE budget" if nfe is not None else "a FLOP budget"
            raise ValueError(f"give either {what} or steps / an explicit time grid, not both")
        if nfe is not None:
            steps = steps_for_nfe(sampler_obj, nfe, guided, time_grid)
        else:
            steps = steps_for_flops(sampler_obj, flops, guided, batch, size, time_grid)
    elif steps is None:
        steps = 50
    grid = make_time_grid(steps, time_grid)
    K = grid.numel() - 1
    planned_calls, planned_nfe = plan_run(sampler_obj, grid, guided)
    planned_flops = plan_flops(sampler_obj, grid, guided, batch, size)
    recorder = _Recorder(record, patch, num_patches)
    ctx = StepContext(guided, patch, num_patches, recorder)
    x = noise.float() if not noise.is_floating_point() else noise
    times = grid.tolist()
    first_call_of_step: list[int] = []
    start = time.perf_counter()
    with torch.no_grad(), network_precision(model, precision, noise.device):
        for k in tqdm(range(K), desc=f"sampling ({sampler_obj.name})", disable=not progress, leave=False):
            first_call_of_step.append(guided.calls)
            x = sampler_obj.step(ctx, x, k, times[k], times[k + 1])
    _raise_if_not_finite(guided, x, first_call_of_step, times, sampler_obj)
    seconds = time.perf_counter() - start
    if (guided.calls, guided.nfe) != (planned_calls, planned_nfe):  # pragma: no cover - internal invariant
        raise RuntimeError(
            f"internal error: sampler {sampler_obj.name} made {guided.calls} calls / {guided.nfe} NFE, "
            f"planned {planned_calls} / {planned_nfe}"
        )
    if planned_flops is not None and (
        planned_flops[1] != guided.full_flops or planned_flops[0] not in (None, guided.token_flops)
    ):  # pragma: no cover - internal invariant
        raise RuntimeError(
            f"internal error: the run spent {guided.token_flops} of {guided.full_flops} FLOPs, planned {planned_flops}"
        )
    return SampleResult(
        x=x,
        calls=guided.calls,
        nfe=guided.nfe,
        steps=K,
        grid=grid,
        sampler=sampler_obj.name,
        options=sampler_obj.options(),
        seconds=seconds,
        record=recorder.items if record else None,
        token_flops=guided.token_flops,
        full_flops=guided.full_flops,
        cache=None if cache is None else cache.options(),
    )
