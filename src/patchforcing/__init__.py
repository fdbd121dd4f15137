"""patchforcing: Patch Forcing (difficulty-aware adaptive denoising) for PyTorch."""

__version__ = "0.1.0"

from .models import create_model, list_models

__all__ = ["__version__", "create_model", "list_models"]
