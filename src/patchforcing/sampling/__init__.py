"""Samplers: integrators that only call the model (``euler``, ``euler_pf``, ``dual_loop``, ``look_ahead``)."""

from .api import SampleResult, sample, steps_for_nfe
from .guidance import GuidedModel, Prediction
from .samplers import SAMPLERS, CallRecord, DualLoop, Euler, EulerPF, LookAhead, Sampler, certain_mask, make_sampler, make_time_grid

__all__ = [
    "SAMPLERS",
    "CallRecord",
    "DualLoop",
    "Euler",
    "EulerPF",
    "GuidedModel",
    "LookAhead",
    "Prediction",
    "SampleResult",
    "Sampler",
    "certain_mask",
    "make_sampler",
    "make_time_grid",
    "sample",
    "steps_for_nfe",
]
