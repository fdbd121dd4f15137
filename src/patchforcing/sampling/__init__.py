"""Samplers: integrators that only call the model (the names in :data:`SAMPLERS`).

Sampling at scale (sharded, resumable ``.npz`` output) is in :mod:`patchforcing.sampling.generate`.
"""

from .api import NonFiniteSampleError, SampleResult, sample, steps_for_nfe
from .guidance import GuidedModel, Prediction
from .samplers import (
    SAMPLERS,
    CallRecord,
    DualLoop,
    Euler,
    EulerPF,
    LookAhead,
    Sampler,
    certain_mask,
    make_sampler,
    make_time_grid,
)

__all__ = [
    "SAMPLERS",
    "CallRecord",
    "DualLoop",
    "Euler",
    "EulerPF",
    "GuidedModel",
    "LookAhead",
    "NonFiniteSampleError",
    "Prediction",
    "SampleResult",
    "Sampler",
    "certain_mask",
    "make_sampler",
    "make_time_grid",
    "sample",
    "steps_for_nfe",
]
