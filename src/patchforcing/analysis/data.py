"""The held-out data of the analysis: ``synthetic``, a config's validation split, folders, files, stores."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..data import DataError, SyntheticShapes, build_dataset, data_argument_kind
from ..latents import LatentDataset
from ..training.config import load_config
from ..training.trainer import build_data, split_train_val

__all__ = ["SYNTHETIC_HELD_OUT_SEED", "as_dataset", "get_autoencoder", "is_pixel_model", "resolve_data"]

#: Data seed of ``DATA = synthetic``: procedural items no preset trains on (they use seed 0).
SYNTHETIC_HELD_OUT_SEED = 9973

_NOT_HELD_OUT = "(not known to be held out; pass the training config to use its held-out split)"


class TensorData(torch.utils.data.Dataset):
    """``(B, C, H, W)`` items with optional ``(B,)`` labels (``-1``: none)."""

    def __init__(self, x: Tensor, y: Tensor | None):
        if x.dim() != 4:
            raise ValueError(f"data tensor must be (B, C, H, W), got {tuple(x.shape)}")
        if y is not None and y.shape != (x.shape[0],):
            raise ValueError(f"labels must be ({x.shape[0]},), got {tuple(y.shape)}")
        self.x, self.y = x, y

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int):
        return self.x[i], (-1 if self.y is None else int(self.y[i]))


def as_dataset(data: Any) -> Any:
    """A ``(B, C, H, W)`` tensor or a ``(tensor, labels)`` pair as a data set; data sets unchanged."""
    if isinstance(data, Tensor):
        return TensorData(data, None)
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
        return TensorData(data[0], None if data[1] is None else torch.as_tensor(data[1]))
    return data


def get_autoencoder(autoencoder: Any) -> Any:
    """An autoencoder object, or a zero-argument loader of one (called here)."""
    if autoencoder is None or hasattr(autoencoder, "spec"):
        return autoencoder
    return autoencoder() if callable(autoencoder) else autoencoder


def is_pixel_model(model: nn.Module, autoencoder: Any) -> bool:
    """Pixel space: an identity autoencoder, or none given and a 3-channel model; a loader
    (callable) means a latent model whose VAE is loaded only if images must be encoded."""
    if autoencoder is not None and hasattr(autoencoder, "spec"):
        return getattr(autoencoder.spec, "kind", "identity") == "identity"
    return autoencoder is None and getattr(model, "in_channels", 3) == 3


def _image_resolution(model: nn.Module, autoencoder: Any) -> int:
    """The image size whose items the model takes (latent models: times the VAE's downsampling)."""
    size = int(model.image_size[0])
    if is_pixel_model(model, autoencoder):
        if model.in_channels != 3:
            raise ValueError(
                f"the model takes {model.in_channels}-channel inputs, not images; give latent data "
                "(a latent store or a data.kind=latents config) or its autoencoder"
            )
        return size
    ae = get_autoencoder(autoencoder)
    if ae is None:
        raise ValueError(
            "this is a latent model: give latent data (a latent store or a data.kind=latents "
            "config) or the autoencoder (--vae) to encode images"
        )
    return size * int(ae.downsample)


def _from_config(spec: str) -> tuple[Any, dict[str, Any]]:
    cfg = load_config(spec)
    if cfg.data.val_size <= 0:
        raise ValueError(
            f"{spec}: data.val_size is 0, so the config holds nothing out; pass the data itself "
            "(folder, .npz, latent store) instead"
        )
    _, ds = split_train_val(build_data(cfg), cfg.data.val_size)
    return ds, {
        "kind": f"config:{cfg.data.kind}",
        "config": spec,
        "path": cfg.data.path,
        "held_out": f"the config's held-out split (data.val_size = {cfg.data.val_size} items, the ones the "
        "trainer computes the validation loss on)",
    }


def resolve_data(
    data: str | os.PathLike, model: nn.Module, *, autoencoder: Any = None, num_images: int | None = None
) -> tuple[torch.utils.data.Dataset, dict[str, Any]]:
    """The held-out data set named by ``data`` and a description of it.

    Args:
        data: ``"synthetic"``; a YAML config or preset name (its ``data`` section, the trainer's
            held-out ``data.val_size`` split, the items it computes the validation loss on); an
            image folder; an ``.npz`` of images; a latent store directory (``index.json``).
        model: the network (its input size and channels decide the image resolution).
        autoencoder: for latent models given image data: an :class:`~patchforcing.autoencoders.Autoencoder`
            or a zero-argument callable returning one (called only when needed).
        num_images: items wanted (sizes the synthetic set).
    Returns:
        ``(dataset, info)``; ``info["held_out"]`` says in what sense the items are held out.
    """
    spec = os.fspath(data)
    p = Path(spec).expanduser()
    kind = data_argument_kind(spec)
    if kind == "synthetic":
        nc = int(model.num_classes) if 1 <= int(getattr(model, "num_classes", 0)) <= 10 else 8
        ds = SyntheticShapes(
            size=_image_resolution(model, autoencoder),
            num_classes=nc,
            length=int(num_images or 256),
            seed=SYNTHETIC_HELD_OUT_SEED,
        )
        info = {
            "kind": "synthetic",
            "num_classes": nc,
            "data_seed": SYNTHETIC_HELD_OUT_SEED,
            "held_out": f"procedural items of data seed {SYNTHETIC_HELD_OUT_SEED} (the presets train on seed 0)",
        }
    elif kind == "latents":
        ds = LatentDataset(p, flip=False, seed=0)
        info = {"kind": "latents", "path": str(p), "held_out": f"the whole latent store {_NOT_HELD_OUT}"}
    elif kind in ("folder", "npz"):
        ds = build_dataset(
            {"kind": kind, "path": str(p), "resolution": _image_resolution(model, autoencoder), "flip": False}
        )
        info = {
            "kind": kind,
            "path": str(p),
            "held_out": f"the whole {'folder' if kind == 'folder' else 'file'} {_NOT_HELD_OUT}",
        }
    elif kind == "config":
        ds, info = _from_config(spec)
    else:
        raise DataError(
            f"DATA {spec!r} is not 'synthetic', a config file or preset, an image folder, an .npz or a "
            "latent store directory"
        )
    info["source"] = spec
    info["num_items"] = len(ds)
    return ds, info
