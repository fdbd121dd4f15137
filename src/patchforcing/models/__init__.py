"""The networks: the Patch Forcing Transformer, its SiT baseline, the text-to-image PFT and the
presets registry."""

from .registry import count_parameters, create_model, is_text_to_image, list_models, parse_model_name
from .t2i import T2IConfig, TextToImageTransformer
from .token_cache import KVStore, forward_flops
from .transformer import Conditioning, ModelConfig, PatchForcingTransformer

__all__ = [
    "Conditioning",
    "KVStore",
    "ModelConfig",
    "PatchForcingTransformer",
    "T2IConfig",
    "TextToImageTransformer",
    "count_parameters",
    "create_model",
    "forward_flops",
    "is_text_to_image",
    "list_models",
    "parse_model_name",
]
