"""The networks: the Patch Forcing Transformer, its SiT baseline, the text-to-image PFT and the
presets registry."""

from .registry import count_parameters, create_model, is_text_to_image, list_models, parse_model_name
from .t2i import T2IConfig, TextToImageTransformer
from .transformer import Conditioning, ModelConfig, PatchForcingTransformer

__all__ = [
    "Conditioning",
    "ModelConfig",
    "PatchForcingTransformer",
    "T2IConfig",
    "TextToImageTransformer",
    "count_parameters",
    "create_model",
    "is_text_to_image",
    "list_models",
    "parse_model_name",
]
