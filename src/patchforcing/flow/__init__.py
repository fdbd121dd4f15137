"""The path/objective: patch-wise interpolation, timestep samplers, the Patch Forcing loss."""

from .loss import (
    RepaTarget,
    gaussian_nll,
    patch_flow_loss,
    repa_alignment,
    resample_tokens,
    segment_losses,
    segment_terms,
)
from .path import clean_estimate, interpolate, patch_to_pixel, pixel_to_patch, target_velocity
from .timesteps import TIMESTEP_SAMPLERS, TimestepSampler, make_timestep_sampler

__all__ = [
    "RepaTarget",
    "TIMESTEP_SAMPLERS",
    "TimestepSampler",
    "clean_estimate",
    "gaussian_nll",
    "interpolate",
    "make_timestep_sampler",
    "patch_flow_loss",
    "patch_to_pixel",
    "pixel_to_patch",
    "repa_alignment",
    "resample_tokens",
    "segment_losses",
    "segment_terms",
    "target_velocity",
]
