"""Frozen encoders: vision encoders for REPA (:mod:`.vision`) and text encoders for T2I (:mod:`.text`)."""

from .text import (
    DEFAULT_MAX_LENGTH,
    MINILM,
    TextEncoder,
    TextEncoderError,
    load_text_encoder,
    minilm_path,
    patchforcing_cache_dir,
)
from .vision import (
    DINOV2_MODELS,
    ClassifierEncoder,
    Dinov2Encoder,
    FrozenEncoder,
    ModuleEncoder,
    VisionEncoderError,
    load_vision_encoder,
)

__all__ = [
    "DEFAULT_MAX_LENGTH",
    "MINILM",
    "TextEncoder",
    "TextEncoderError",
    "load_text_encoder",
    "minilm_path",
    "patchforcing_cache_dir",
    "DINOV2_MODELS",
    "ClassifierEncoder",
    "Dinov2Encoder",
    "FrozenEncoder",
    "ModuleEncoder",
    "VisionEncoderError",
    "load_vision_encoder",
]
