"""The path/objective: patch-wise interpolation, timestep samplers, the Patch Forcing loss."""

from .loss import gaussian_nll, patch_flow_loss, segment_losses
from .path import clean_estimate, interpolate, patch_to_pixel, pixel_to_patch, target_velocity
from .timesteps import TIMESTEP_SAMPLERS, TimestepSampler, make_timestep_sampler

__all__ = [
    "TIMESTEP_SAMPLERS",
    "TimestepSampler",
    "clean_estimate",
    "gaussian_nll",
    "interpolate",
    "make_timestep_sampler",
    "patch_flow_loss",
    "patch_to_pixel",
    "pixel_to_patch",
    "segment_losses",
    "target_velocity",
]
