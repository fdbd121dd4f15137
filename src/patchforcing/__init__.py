"""patchforcing: Patch Forcing (difficulty-aware adaptive denoising) for PyTorch.

The public API (re-exports only)::

    import patchforcing as pf
    model = pf.create_model("PFT-B/2", input_size=32, in_channels=4, num_classes=1000)
    v, logvar = model(x, t, y)
    model = pf.load_model(path)
    ts = pf.make_timestep_sampler("ltg")(batch_size, num_patches, generator=g)
    terms = pf.patch_flow_loss(model, x1, y)
    res = pf.sample(model, noise, sampler="look_ahead", steps=50, y=y)
    vae = pf.load_autoencoder_for(path, vae="stabilityai/sd-vae-ft-ema", model=model)
    images = vae.decode(res.x)                  # or pf.decode_to_images(res.x, path)
"""

__version__ = "0.1.0"

from .autoencoders import AutoencoderSpec, decode_to_images, load_autoencoder, load_autoencoder_for
from .checkpoints import CheckpointError, load_model, save_model
from .flow.loss import patch_flow_loss
from .flow.timesteps import make_timestep_sampler
from .models import PatchForcingTransformer, create_model, list_models
from .sampling import SampleResult, make_sampler, sample

__all__ = [
    "__version__",
    "AutoencoderSpec",
    "decode_to_images",
    "load_autoencoder",
    "load_autoencoder_for",
    "CheckpointError",
    "PatchForcingTransformer",
    "SampleResult",
    "create_model",
    "list_models",
    "load_model",
    "make_sampler",
    "make_timestep_sampler",
    "patch_flow_loss",
    "sample",
    "save_model",
]
