"""patchforcing: Patch Forcing (difficulty-aware adaptive denoising) for PyTorch.

The public API (re-exports only)::

    import patchforcing as pf
    model = pf.create_model("PFT-B/2", input_size=32, in_channels=4, num_classes=1000)
    v, logvar = model(x, t, y)
    model = pf.load_model(path)
    ts = pf.make_timestep_sampler("ltg")(batch_size, num_patches, generator=g)
    terms = pf.patch_flow_loss(model, x1, y)
    model = pf.create_model("PFT-XL/2", repa=dict(encoder_depth=8, z_dim=768, projector_dim=2048))
    terms = pf.patch_flow_loss(model, x1, y, repa=pf.RepaTarget(pf.load_vision_encoder("dinov2-b"), images))
    res = pf.sample(model, noise, sampler="look_ahead", steps=50, y=y)
    res = pf.sample(model, noise, sampler="look_ahead", nfe=40, y=y, cache=pf.TokenCache(active=0.5, refresh_every=4))
    res.token_flops, res.full_flops             # matmul FLOPs spent vs. the dense run; pf.forward_flops(model, B)
    enc = pf.load_text_encoder("minilm")        # or a hub id / local dir; enc(captions) -> TextEmbeddings
    model = pf.create_model("PFT-T2I-1.2B", in_channels=32, text_dim=2048)   # v, lv = model(x, t, text)
    vae = pf.load_autoencoder_for(path, vae="stabilityai/sd-vae-ft-ema", model=model)
    images = vae.decode(res.x)                  # or pf.decode_to_images(res.x, path)
"""

__version__ = "0.1.0"

from .autoencoders import AutoencoderSpec, decode_to_images, load_autoencoder, load_autoencoder_for
from .checkpoints import CheckpointError, load_model, save_model
from .encoders.text import TextEncoder, load_text_encoder
from .encoders.vision import FrozenEncoder, load_vision_encoder
from .flow.loss import RepaTarget, patch_flow_loss
from .flow.timesteps import make_timestep_sampler
from .models import PatchForcingTransformer, TextToImageTransformer, create_model, forward_flops, list_models
from .sampling import SampleResult, TokenCache, make_sampler, sample

__all__ = [
    "__version__",
    "AutoencoderSpec",
    "decode_to_images",
    "load_autoencoder",
    "load_autoencoder_for",
    "CheckpointError",
    "FrozenEncoder",
    "PatchForcingTransformer",
    "RepaTarget",
    "SampleResult",
    "TextEncoder",
    "TextToImageTransformer",
    "TokenCache",
    "create_model",
    "forward_flops",
    "list_models",
    "load_model",
    "load_text_encoder",
    "load_vision_encoder",
    "make_sampler",
    "make_timestep_sampler",
    "patch_flow_loss",
    "sample",
    "save_model",
]
