"""Frozen vision encoders for REPA: clean images in ``[-1, 1]`` -> patch features ``(B, T, D)``.

One small interface, :class:`FrozenEncoder`: ``encoder(images)`` with ``images`` ``(B, 3, H, W)``
in ``[-1, 1]`` returns ``(B, T, D)`` float32 patch features (row-major over the ``encoder.grid(H,
W)`` token grid), computed without gradients, in float32 with autocast off. The encoder is frozen
(``requires_grad`` off), stays in eval mode whatever ``.train()`` is called with, and is never
part of a model's state_dict or an optimiser: the trainer holds it beside the model, and a
checkpoint records only its spec. ``.dim`` is ``D``; ``.fingerprint`` identifies weights and
preprocessing (latent stores with cached features record it).

Three kinds, made by :func:`load_vision_encoder`:

* **DINOv2** ViT-S/B/L/G through ``transformers.Dinov2Model`` (the ``transformers`` extra), from an
  alias ``dinov2-s``/``dinov2-b``/``dinov2-l``/``dinov2-g`` (hub ids ``facebook/dinov2-small``, ...),
  any hub id or a local directory (``save_pretrained`` / ``hf download ... --local-dir``). REPA's
  preprocessing: ``[-1, 1] -> [0, 1]``, ImageNet mean/std normalisation, bicubic resize to
  ``224 * max(1, H // 256)`` (224 for 256x256 images), the final layer-normed tokens with the CLS
  token dropped: 16x16 = 256 tokens at patch size 14.
* **classifier**: ``classifier:PATH``, the project's ``patchforcing train-classifier`` network
  (offline, small data): the feature map after its block 2 (of 0-3), ``R/4 x R/4`` tokens of
  ``4 * width`` channels. A much weaker stand-in for DINOv2: trained on the same small data set
  with labels only, it knows nothing beyond that data (``docs/repa.md``).
* **any** ``nn.Module`` (:class:`ModuleEncoder`): returns ``(B, T, D)`` tokens or a ``(B, D, h, w)``
  feature map, with an optional preprocessing callable.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..evaluation.classifier import SmallClassifier, load_classifier
from ..utils.hub import HubError, probe_hub_file
from ..utils.io import is_offline

__all__ = [
    "DINOV2_MODELS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "VisionEncoderError",
    "FrozenEncoder",
    "Dinov2Encoder",
    "ClassifierEncoder",
    "ModuleEncoder",
    "load_vision_encoder",
]

#: aliases -> hub ids of the DINOv2 ViTs (without registers, as REPA uses)
DINOV2_MODELS: dict[str, str] = {
    "dinov2-s": "facebook/dinov2-small",
    "dinov2-b": "facebook/dinov2-base",
    "dinov2-l": "facebook/dinov2-large",
    "dinov2-g": "facebook/dinov2-giant",
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VisionEncoderError(ValueError):
    """A vision encoder that cannot be had: missing weights, unknown spec, wrong kind of model."""


class FrozenEncoder(nn.Module):
    """The frozen-encoder interface: ``(B, 3, H, W)`` in ``[-1, 1]`` -> ``(B, T, D)`` features.

    Subclasses implement :meth:`preprocess` (images -> the network's input), :meth:`features`
    (network input -> ``(B, T, D)``) and :meth:`grid`; the wrapped network is ``self.net``.

    Args:
        net: the network (frozen here: ``requires_grad_(False)``, eval mode).
        dim: feature width ``D`` (``None``: known after the first call).
        spec: what :func:`load_vision_encoder` was given (recorded with cached features).
    """

    kind = "module"

    def __init__(self, net: nn.Module, dim: int | None, spec: str):
        super().__init__()
        self.net = net
        self.dim = dim
        self.spec = spec
        self._fingerprint: str | None = None
        net.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenEncoder:
        """Always eval mode (dropout off, norm statistics fixed), whatever ``mode`` says."""
        return super().train(False)

    def grid(self, height: int, width: int) -> tuple[int, int] | None:
        """The ``(h, w)`` token grid of an ``height x width`` input (``T = h * w``); ``None``:
        unknown, a square grid of ``T`` is assumed."""
        return None

    def preprocess(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` float32 in ``[-1, 1]`` -> the network's input."""
        return images

    def features(self, x: Tensor) -> Tensor:
        """The network's input -> ``(B, T, D)``."""
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` in ``[-1, 1]`` -> ``(B, T, D)`` float32 features (no grad, no autocast)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"a vision encoder takes (B, 3, H, W) images in [-1, 1], got shape {tuple(images.shape)}")
        with torch.autocast(images.device.type, enabled=False):
            out = self.features(self.preprocess(images.float()))
        if self.dim is None:
            self.dim = int(out.shape[-1])
        return out.float()

    def describe(self) -> dict[str, Any]:
        """What identifies the encoder: spec, kind, width, preprocessing and the weights' fingerprint."""
        return {"spec": self.spec, "kind": self.kind, "dim": self.dim, "fingerprint": self.fingerprint}

    @property
    def fingerprint(self) -> str:
        """sha256 (hex) of the kind, the preprocessing settings and every weight (names, dtypes, bytes)."""
        if self._fingerprint is None:
            h = hashlib.sha256(json.dumps({"kind": self.kind, **self._settings()}, sort_keys=True).encode())
            for name, t in sorted(self.net.state_dict().items()):
                t = t.detach().cpu().contiguous().reshape(-1)
                h.update(f"{name}:{t.dtype}:{t.numel()};".encode())
                h.update(t.view(torch.uint8).numpy().tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def _settings(self) -> dict[str, Any]:
        """Preprocessing settings that change the features (part of the fingerprint)."""
        return {}


# --------------------------------------------------------------------------------------------
# DINOv2 (transformers)
# --------------------------------------------------------------------------------------------


class Dinov2Encoder(FrozenEncoder):
    """A ``transformers`` ``Dinov2Model`` with REPA's preprocessing (module docstring).

    Args:
        model: a ``Dinov2Model``.
        resolution: the side images are resized to (default ``224 * max(1, H // 256)``, REPA's).
        spec: the alias, hub id or directory it came from.
    """

    kind = "dinov2"

    def __init__(self, model: nn.Module, resolution: int | None = None, spec: str = "dinov2"):
        super().__init__(model, int(model.config.hidden_size), spec)
        self.patch_size = int(model.config.patch_size)
        self.resolution = resolution
        self.num_prefix_tokens = 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def input_side(self, height: int) -> int:
        """The side the encoder sees for images of height ``height``."""
        return int(self.resolution) if self.resolution else 224 * max(1, height // 256)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        side = self.input_side(height) // self.patch_size
        return side, side

    def preprocess(self, images: Tensor) -> Tensor:
        x = ((images + 1) / 2 - self.mean) / self.std
        side = self.input_side(images.shape[-2])
        if tuple(x.shape[-2:]) != (side, side):
            x = F.interpolate(x, size=(side, side), mode="bicubic", align_corners=False)
        return x

    def features(self, x: Tensor) -> Tensor:
        out = self.net(pixel_values=x.to(next(self.net.parameters()).dtype))
        return out.last_hidden_state[:, self.num_prefix_tokens :]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "resolution": self.resolution, "patch_size": self.patch_size}

    def _settings(self) -> dict[str, Any]:
        return {"resolution": self.resolution, "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "resize": "bicubic"}


def _missing_message(spec: str, repo: str, why: str) -> str:
    return (
        f"cannot load the vision encoder {spec!r}: {why}. Download it once with\n"
        f"    hf download {repo} --local-dir DIR    (older huggingface_hub: huggingface-cli download "
        f"{repo} --local-dir DIR)\n"
        "and pass repa.encoder=DIR (patchforcing train) or --repa-encoder DIR (patchforcing encode); "
        "offline, the project's own classifier works too: repa.encoder=classifier:CKPT (see docs/repa.md)"
    )


def _load_dinov2(spec: str, target: str, local: bool, resolution: int | None) -> Dinov2Encoder:
    try:
        from transformers import Dinov2Model
    except ImportError:
        raise VisionEncoderError(
            "DINOv2 encoders need transformers: pip install 'patchforcing[repa]' (or pip install transformers)"
        ) from None
    repo = target if not local else DINOV2_MODELS["dinov2-b"]
    local_only = local or is_offline()
    unreachable = None
    if not local_only:
        try:  # one quick request instead of transformers' retries on a machine without network
            probe_hub_file(target, "config.json")
        except HubError as err:  # the cache may still have it
            local_only, unreachable = True, f"tried hub repo {target!r}: {err}"
    try:
        model = Dinov2Model.from_pretrained(target, local_files_only=local_only)
    except (OSError, ValueError) as err:
        if unreachable is not None:
            why = unreachable
        elif local_only and not local:
            why = "offline and not in the Hugging Face cache"
        else:
            why = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        raise VisionEncoderError(_missing_message(spec, repo, why)) from None
    except Exception as err:  # network errors of huggingface_hub/httpx: report plainly
        raise VisionEncoderError(_missing_message(spec, repo, f"{type(err).__name__}: {err}")) from None
    return Dinov2Encoder(model.float().eval(), resolution=resolution, spec=spec)


# --------------------------------------------------------------------------------------------
# The project's small classifier (offline stand-in)
# --------------------------------------------------------------------------------------------


class ClassifierEncoder(FrozenEncoder):
    """The feature map of a ``patchforcing train-classifier`` network after block ``block``.

    Images of another size are resized (bilinear, antialiased) to the classifier's resolution
    ``R``, as ``eval --features classifier:CKPT`` does; block ``b`` (0-3) gives a
    ``ceil(R / 2^b)``-sided grid of ``width * (1, 2, 4, 4)[b]`` channels.
    """

    kind = "classifier"

    def __init__(self, classifier: SmallClassifier, block: int = 2, spec: str = "classifier"):
        if not 0 <= block < len(classifier.blocks):
            raise VisionEncoderError(f"classifier block must be in 0..{len(classifier.blocks) - 1}, got {block}")
        dim = int(classifier.blocks[block].conv.out_channels)
        super().__init__(classifier, dim, spec)
        self.block = block
        self.resolution = int(classifier.config.resolution)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        side = self.resolution
        for b in range(1, self.block + 1):
            side = math.ceil(side / self.net.blocks[b].conv.stride[0])
        return side, side

    def preprocess(self, images: Tensor) -> Tensor:
        r = self.resolution
        if tuple(images.shape[-2:]) != (r, r):
            images = F.interpolate(images, size=(r, r), mode="bilinear", antialias=True, align_corners=False)
        return images

    def features(self, x: Tensor) -> Tensor:
        for b in range(self.block + 1):
            x = self.net.blocks[b](x)
        return x.flatten(2).transpose(1, 2)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "resolution": self.resolution, "block": self.block}

    def _settings(self) -> dict[str, Any]:
        return {"resolution": self.resolution, "block": self.block}


# --------------------------------------------------------------------------------------------
# Any module
# --------------------------------------------------------------------------------------------


class ModuleEncoder(FrozenEncoder):
    """Wrap a user network: ``module(preprocess(images))`` -> ``(B, T, D)`` tokens or a ``(B, D, h, w)``
    feature map (flattened row-major to tokens).

    Args:
        module: the network (frozen here).
        preprocess: images in ``[-1, 1]`` -> the module's input (default: unchanged).
        grid: ``(height, width) -> (h, w)`` of its tokens (default: a square grid of ``T``).
        dim: its width ``D`` (default: known after the first call).
    """

    kind = "module"

    def __init__(
        self,
        module: nn.Module,
        preprocess: Callable[[Tensor], Tensor] | None = None,
        grid: Callable[[int, int], tuple[int, int]] | None = None,
        dim: int | None = None,
        spec: str = "module",
    ):
        super().__init__(module, dim, spec)
        self._preprocess, self._grid = preprocess, grid

    def grid(self, height: int, width: int) -> tuple[int, int] | None:
        return tuple(self._grid(height, width)) if self._grid is not None else None

    def preprocess(self, images: Tensor) -> Tensor:
        return self._preprocess(images) if self._preprocess is not None else images

    def features(self, x: Tensor) -> Tensor:
        out = self.net(x)
        if out.dim() == 4:  # (B, D, h, w) feature map
            out = out.flatten(2).transpose(1, 2)
        if out.dim() != 3:
            raise ValueError(f"the wrapped encoder must return (B, T, D) or (B, D, h, w), got {tuple(out.shape)}")
        return out


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_vision_encoder(
    spec: str | nn.Module,
    *,
    device: torch.device | str | None = None,
    resolution: int | None = None,
) -> FrozenEncoder:
    """A frozen encoder from a spec.

    Args:
        spec: ``dinov2-s|b|l|g``; a DINOv2 hub id (``facebook/dinov2-base``) or local directory
            (``config.json`` of a ``dinov2`` model + weights); ``classifier:PATH`` (a
            ``patchforcing train-classifier`` checkpoint); a :class:`FrozenEncoder` (returned as is)
            or any ``nn.Module`` (wrapped in :class:`ModuleEncoder`).
        device: where it runs (default: where it is, the CPU for loaded weights).
        resolution: DINOv2 input side (default ``224 * max(1, H // 256)``, REPA's).

    Raises:
        VisionEncoderError: unknown spec, missing weights (offline: the message names the ``hf
            download`` command), a directory that is not a DINOv2 model, no ``transformers``.
    """
    if isinstance(spec, FrozenEncoder):
        enc = spec
    elif isinstance(spec, nn.Module):
        enc = ModuleEncoder(spec)
    elif not isinstance(spec, str) or not spec.strip():
        raise VisionEncoderError(f"a vision encoder spec must be a non-empty string or an nn.Module, got {spec!r}")
    else:
        enc = _load_spec(spec.strip(), resolution)
    return enc.to(device) if device is not None else enc


def _load_spec(spec: str, resolution: int | None) -> FrozenEncoder:
    if spec.lower().startswith("classifier:"):
        path = Path(spec.split(":", 1)[1]).expanduser()
        if not path.is_file():
            raise VisionEncoderError(
                f"no classifier checkpoint at {str(path)!r} (repa encoder {spec!r}); train one with\n"
                f"    patchforcing train-classifier DATA --out {path}\n"
                "on the training data (see docs/repa.md)"
            )
        classifier, _ = load_classifier(path)
        return ClassifierEncoder(classifier, spec=f"classifier:{path.absolute()}")
    if spec.lower() in DINOV2_MODELS:
        return _load_dinov2(spec.lower(), DINOV2_MODELS[spec.lower()], local=False, resolution=resolution)
    path = Path(spec).expanduser()
    if path.is_dir():
        cfg_path = path / "config.json"
        try:
            model_type = json.loads(cfg_path.read_text()).get("model_type")
        except (OSError, ValueError) as err:
            raise VisionEncoderError(
                f"{str(path)!r} is not a transformers model directory (cannot read config.json: {err}); "
                "expected the folder of `hf download facebook/dinov2-base --local-dir DIR` or save_pretrained"
            ) from None
        if model_type != "dinov2":
            raise VisionEncoderError(f"{cfg_path} describes a {model_type!r} model; REPA encoders here are DINOv2")
        return _load_dinov2(str(path.absolute()), str(path), local=True, resolution=resolution)
    if "/" in spec and not spec.startswith((".", "/", "~")) and spec.count("/") == 1:
        return _load_dinov2(spec, spec, local=False, resolution=resolution)
    raise VisionEncoderError(
        f"unknown vision encoder {spec!r}: expected {', '.join(DINOV2_MODELS)}, a DINOv2 hub id or local "
        "directory, or classifier:CKPT"
    )
