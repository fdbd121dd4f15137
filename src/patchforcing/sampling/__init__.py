"""Samplers: integrators that only call the model (the names in :data:`SAMPLERS`).

Sampling at scale (sharded, resumable ``.npz`` output, prompts for text models) is in
:mod:`patchforcing.sampling.generate`. Conditioning (class labels, text embeddings) is
:mod:`patchforcing.conditioning`.
"""

from .api import (
    SAMPLING_PRECISIONS,
    NonFiniteSampleError,
    SampleResult,
    accepts_any_size,
    plan_flops,
    sample,
    steps_for_flops,
    steps_for_nfe,
)
from .cache import TokenCache
from .guidance import GuidedModel, Prediction
from .samplers import (
    SAMPLERS,
    CallRecord,
    DualLoop,
    Euler,
    EulerPF,
    LookAhead,
    RandomContext,
    Sampler,
    certain_mask,
    make_sampler,
    make_time_grid,
)

__all__ = [
    "SAMPLERS",
    "SAMPLING_PRECISIONS",
    "CallRecord",
    "accepts_any_size",
    "DualLoop",
    "Euler",
    "EulerPF",
    "GuidedModel",
    "LookAhead",
    "RandomContext",
    "NonFiniteSampleError",
    "Prediction",
    "SampleResult",
    "Sampler",
    "TokenCache",
    "certain_mask",
    "make_sampler",
    "make_time_grid",
    "plan_flops",
    "sample",
    "steps_for_flops",
    "steps_for_nfe",
]
