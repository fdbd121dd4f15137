"""``sample()``: noise in, :class:`SampleResult` out."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .guidance import GuidedModel
from .samplers import CallRecord, Sampler, StepContext, TimeGrid, _Recorder, make_sampler, make_time_grid

__all__ = ["SampleResult", "sample", "steps_for_nfe"]


@dataclass
class SampleResult:
    """The outcome of :func:`sample`.

    Attributes:
        x: ``(B, C, H, W)`` final sample.
        calls: network forward passes made.
        nfe: function evaluations per image (a guided call counts 2).
        steps: outer steps ``K``; grid: ``(K + 1,)`` float64 time grid used.
        sampler: sampler name; options: its options (p, n_inner, ...).
        seconds: wall-clock time of the integration.
        record: per-call :class:`CallRecord` list when ``record=True``, else ``None``.
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


def steps_for_nfe(sampler: Sampler, budget: int, guided: GuidedModel, grid: TimeGrid = None) -> int:
    """The largest step count whose NFE per image fits ``budget`` (for equal-compute comparisons)."""
    if budget < 1:
        raise ValueError(f"the NFE budget must be >= 1, got {budget}")
    best = 0
    for k in range(1, int(budget) + 1):  # nfe >= calls >= k
        _, nfe = sampler.plan(make_time_grid(k, grid), guided.guided_at)
        if nfe <= budget:
            best = k
    if best == 0:
        raise ValueError(f"no step count fits an NFE budget of {budget} with sampler {sampler.name!r}")
    return best


def _check(model: nn.Module, noise: Tensor, y: Tensor | None, cfg_scale: float, sampler: Sampler) -> Tensor | None:
    size = tuple(getattr(model, "image_size", noise.shape[-2:]))
    C = getattr(model, "in_channels", noise.shape[1])
    if noise.dim() != 4 or noise.shape[1] != C or tuple(noise.shape[-2:]) != size:
        raise ValueError(f"noise must have shape (B, {C}, {size[0]}, {size[1]}) for this model, got {tuple(noise.shape)}")
    if sampler.needs_uncertainty and not getattr(model, "predict_uncertainty", False):
        raise ValueError(
            f"sampler {sampler.name!r} needs a model with an uncertainty head (a PFT); "
            "use 'euler' for models without one"
        )
    if sampler.needs_uncertainty and not getattr(model, "per_patch_time", False):
        raise ValueError(f"sampler {sampler.name!r} needs a model with per-patch times (a PFT)")
    if y is not None:
        y = torch.as_tensor(y, device=noise.device)
        if y.shape != (noise.shape[0],):
            raise ValueError(f"y must have shape ({noise.shape[0]},), got {tuple(y.shape)}")
        if y.is_floating_point():
            raise ValueError(f"y must hold integer class labels, got dtype {y.dtype}")
        y = y.long()
        K = model.num_classes
        if bool(((y < 0) | (y > K)).any()):
            raise ValueError(f"labels must lie in [0, {K}] ({K} = null class), got min {int(y.min())}, max {int(y.max())}")
    elif cfg_scale != 1.0:
        raise ValueError("classifier-free guidance (cfg_scale != 1) needs labels y")
    return y


def sample(
    model: nn.Module,
    noise: Tensor,
    sampler: str | Sampler = "euler_pf",
    steps: int | None = None,
    *,
    y: Tensor | None = None,
    cfg_scale: float = 1.0,
    nfe: int | None = None,
    time_grid: TimeGrid = None,
    guidance_interval: tuple[float, float] | None = None,
    guide_uncertainty: bool = True,
    record: bool = False,
    progress: bool = False,
    **sampler_options: Any,
) -> SampleResult:
    """Integrate from ``noise`` (t = 0) to data (t = 1).

    Args:
        model: ``model(x, t, y) -> (v, logvar)``, e.g. a PFT or SiT.
        noise: ``(B, C, H, W)`` standard normal noise.
        sampler: ``"euler"``, ``"euler_pf"``, ``"dual_loop"``, ``"look_ahead"`` or a sampler object.
        steps: outer steps ``K`` (default 50 when neither ``nfe`` nor an explicit grid is given).
        y: ``(B,)`` long labels; ``None`` samples unconditionally (null class).
        cfg_scale: classifier-free guidance scale (1 = none).
        nfe: NFE budget per image instead of ``steps``: the largest ``K`` whose NFE fits.
        time_grid: ``"uniform"`` (default), a callable ``K -> grid`` or explicit increasing times.
        guidance_interval: ``(lo, hi)``: guide only steps starting within it.
        guide_uncertainty: guide the log-variance like the velocity (default).
        record: keep a :class:`CallRecord` per call (CPU copies) for pictures.
        progress: show a tqdm bar over the steps.
        **sampler_options: e.g. ``p=0.4``, ``n_inner=4``, ``context_ratio=1.4``.
    Returns:
        :class:`SampleResult` with ``x``, ``calls``, ``nfe`` (per image), ``steps``, ``grid``.
    """
    sampler_obj = make_sampler(sampler, **sampler_options)
    y = _check(model, noise, y, cfg_scale, sampler_obj)
    guided = GuidedModel(model, y, cfg_scale, guidance_interval, guide_uncertainty)

    explicit_grid = time_grid is not None and not callable(time_grid) and not isinstance(time_grid, str)
    if nfe is not None:
        if steps is not None or explicit_grid:
            raise ValueError("give either an NFE budget or steps / an explicit time grid, not both")
        steps = steps_for_nfe(sampler_obj, nfe, guided, time_grid)
    elif steps is None:
        steps = 50
    grid = make_time_grid(steps, time_grid)
    K = grid.numel() - 1
    planned_calls, planned_nfe = sampler_obj.plan(grid, guided.guided_at)

    patch = getattr(model, "patch_size", 1)
    num_patches = getattr(model, "num_patches", noise.shape[-2] * noise.shape[-1] // (patch * patch))
    recorder = _Recorder(record, patch, num_patches)
    ctx = StepContext(guided, patch, num_patches, recorder)
    x = noise.float() if not noise.is_floating_point() else noise
    times = grid.tolist()
    start = time.perf_counter()
    with torch.no_grad():
        for k in tqdm(range(K), desc=f"sampling ({sampler_obj.name})", disable=not progress, leave=False):
            x = sampler_obj.step(ctx, x, k, times[k], times[k + 1])
    seconds = time.perf_counter() - start
    if (guided.calls, guided.nfe) != (planned_calls, planned_nfe):  # pragma: no cover - internal invariant
        raise RuntimeError(
            f"internal error: sampler {sampler_obj.name} made {guided.calls} calls / {guided.nfe} NFE, "
            f"planned {planned_calls} / {planned_nfe}"
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
    )
