"""The network: the Patch Forcing Transformer, its SiT baseline and the presets registry."""

from .registry import create_model, list_models, parse_model_name
from .transformer import Conditioning, ModelConfig, PatchForcingTransformer

__all__ = [
    "Conditioning",
    "ModelConfig",
    "PatchForcingTransformer",
    "create_model",
    "list_models",
    "parse_model_name",
]
