"""Training data from latents: a latent store (:class:`LatentDataset`) or an image data set with
the VAE in the loop (:class:`OnlineEncodedDataset`), and the builders the trainer uses.

Item ``i`` in epoch ``e`` is the scaled posterior sample ``scale(mean + std * eps)``, ``eps`` drawn
from a generator seeded by ``hash(seed, e, i)`` (63 bits); everything is a function of
``(seed, epoch, index)``: resumable and identical in every worker/rank.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor
from torch.utils.data import Dataset, get_worker_info

from ..autoencoders import Autoencoder, AutoencoderSpec, load_autoencoder
from ..data.augment import hflip_flag
from ..utils.devices import resolve_device, torchrun_env
from ..utils.seeding import hashed_generator
from .store import LatentStoreError, read_index, verify_latent_store

__all__ = [
    "LatentDataset",
    "OnlineEncodedDataset",
    "build_latent_dataset",
    "build_online_dataset",
    "load_online_autoencoder",
]

_NOISE_SALT = 0x1A7E_47_0000_0003


def _noise(seed: int, epoch: int, index: int, shape: tuple[int, ...]) -> Tensor:
    """Standard normal noise fixed per ``(seed, epoch, index)`` (the posterior sample's eps)."""
    return torch.randn(shape, generator=hashed_generator(_NOISE_SALT, seed, epoch, index, bits=63))


class LatentDataset(Dataset):
    """Training items from a latent store: ``(scaled latent float32 (c, h, w), label int)``.

    Args:
        path: the store directory (``index.json`` and shards).
        flip: random horizontal flips, a fair coin per ``(seed, epoch, index)``; the stored
            mirrored posterior is used when the store has one, else the latent grid is mirrored.
        seed: seed of flips and posterior noise.
        sample_posterior: ``mean + std * eps`` (the authors' practice) instead of ``mean``.
        spec: the autoencoder spec to scale with (default: the index's); e.g. a local VAE
            folder as its source, or another scaling.
        verify: check every shard's sha256 at construction (reads the whole store).
        repa_features: items are ``(latent, label, features (T, D) float32)``, the cached REPA
            features of the same (flipped or not) image (``encode --repa-encoder``); a store
            without mirrored features mirrors the token grid, as for the latents.

    Attributes:
        num_classes, class_names, resolution (image side the latents came from), input_size
        (latent side), channels (latent channels), latent_shape, autoencoder_spec, has_flip,
        index, labels (``int64 (N,)``, read on first use), repa_info (the index's record of the
        REPA encoder: spec, fingerprint, dim, tokens, grid; ``None`` without features).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        flip: bool = True,
        seed: int = 0,
        sample_posterior: bool = True,
        spec: AutoencoderSpec | None = None,
        verify: bool = False,
        repa_features: bool = False,
    ):
        self.path = Path(path).expanduser()
        self.index = verify_latent_store(self.path) if verify else read_index(self.path)
        for s in self.index["shards"]:
            f = self.path / s["file"]
            if not f.is_file() or f.stat().st_size != s["bytes"]:
                raise LatentStoreError(
                    f"{f} is missing or has the wrong size; re-run `patchforcing encode` "
                    f"with the same arguments (verify with patchforcing encode --verify)"
                )
        self.flip = bool(flip)
        self.seed = int(seed)
        self.epoch = 0
        self.sample_posterior = bool(sample_posterior)
        self.autoencoder_spec = spec or AutoencoderSpec.from_dict(self.index["autoencoder"])
        self.num_classes = int(self.index["num_classes"])
        self.class_names = self.index.get("class_names")
        self.resolution = int(self.index["resolution"])
        self.latent_shape = tuple(int(v) for v in self.index["latent_shape"])
        self.channels, self.input_size = self.latent_shape[0], self.latent_shape[1]
        self.has_flip = bool(self.index["flip"])
        self.shard_size = int(self.index["shard_size"])
        self._n = int(self.index["num_items"])
        self._handles: dict[int, Any] = {}
        self._labels: np.ndarray | None = None
        self.repa_info: dict[str, Any] | None = self.index.get("repa")
        self.repa_features = bool(repa_features)
        if self.repa_features and self.repa_info is None:
            raise LatentStoreError(
                f"the latents in {str(self.path)!r} have no REPA features (repa.source=cached); encode them with "
                f"`patchforcing encode IMAGES --vae VAE --repa-encoder SPEC --out DIR`, or use repa.source=online"
            )

    def __getstate__(self) -> dict[str, Any]:  # open shard handles do not travel to workers
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def __len__(self) -> int:
        return self._n

    def set_epoch(self, epoch: int) -> None:
        """Select the flips and posterior noise of ``epoch``."""
        self.epoch = int(epoch)

    def _shard(self, k: int):
        h = self._handles.get(k)
        if h is None:
            h = self._handles[k] = safe_open(str(self.path / self.index["shards"][k]["file"]), framework="pt")
        return h

    @property
    def labels(self) -> np.ndarray:
        if self._labels is None:
            self._labels = np.concatenate(
                [self._shard(k).get_tensor("labels").numpy() for k in range(len(self.index["shards"]))]
            ).astype(np.int64)
        return self._labels

    def posterior(self, index: int, flipped: bool = False) -> tuple[Tensor, Tensor, int]:
        """The stored unscaled ``(mean, std)`` (float32 ``(c, h, w)``) and label of item ``index``
        (of the mirrored image with ``flipped``; mirrored latents when the store has none)."""
        i = int(index)
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(f"index {index} out of range for {self._n} latents in {str(self.path)!r}")
        k, j = divmod(i, self.shard_size)
        h = self._shard(k)
        names = ("mean_flip", "std_flip") if flipped and self.has_flip else ("mean", "std")
        mean = h.get_slice(names[0])[j : j + 1][0].float()
        std = h.get_slice(names[1])[j : j + 1][0].float()
        if flipped and not self.has_flip:
            mean, std = mean.flip(-1), std.flip(-1)
        label = int(h.get_slice("labels")[j : j + 1][0])
        return mean, std, label

    def repa(self, index: int, flipped: bool = False) -> Tensor:
        """The cached REPA features ``(T, D)`` float32 of item ``index`` (of the mirrored image with
        ``flipped``: the stored ``repa_flip``, else the token grid mirrored)."""
        if self.repa_info is None:
            raise LatentStoreError(f"the latents in {str(self.path)!r} have no REPA features")
        k, j = divmod(int(index), self.shard_size)
        name = "repa_flip" if flipped and self.has_flip else "repa"
        feats = self._shard(k).get_slice(name)[j : j + 1][0].float()
        if flipped and not self.has_flip:
            h, w = self.repa_info["grid"]
            feats = feats.view(h, w, -1).flip(1).reshape(h * w, -1)
        return feats

    def __getitem__(self, index: int) -> tuple[Tensor, int] | tuple[Tensor, int, Tensor]:
        i = int(index) + (self._n if int(index) < 0 else 0)
        flipped = self.flip and hflip_flag(self.seed, self.epoch, i)
        mean, std, label = self.posterior(i, flipped)
        z = mean
        if self.sample_posterior:
            z = mean + std * _noise(self.seed, self.epoch, i, tuple(mean.shape))
        if self.repa_features:
            return self.autoencoder_spec.scale(z), label, self.repa(i, flipped)
        return self.autoencoder_spec.scale(z), label


class OnlineEncodedDataset(Dataset):
    """An image data set encoded by a VAE when read: ``(scaled latent (c, h, w), label)``.

    Item ``i`` of epoch ``e`` is ``scale(mean + std * eps)`` of the (possibly flipped) image,
    ``eps`` fixed per ``(seed, e, i)``, like :class:`LatentDataset`. The VAE runs on ``device``
    in the main process and on the CPU in DataLoader workers (use ``data.num_workers=0`` to encode
    on the GPU). Meant for small data sets; pre-extract (:func:`encode_source`) for large ones.

    Attributes: num_classes, resolution (image side), input_size (latent side), channels,
    autoencoder_spec, images (the wrapped image data set).
    """

    def __init__(
        self,
        images: Dataset,
        autoencoder: Autoencoder,
        seed: int = 0,
        device: str | torch.device = "cpu",
        sample_posterior: bool = True,
    ):
        self.images = images
        self.autoencoder = autoencoder.cpu()
        self.autoencoder_spec = autoencoder.spec
        self.seed = int(seed)
        self.epoch = 0
        self.device = torch.device(device)
        self.sample_posterior = bool(sample_posterior)
        self.num_classes = int(getattr(images, "num_classes", 0) or 0)
        if hasattr(images, "captions"):  # a captioned data set: its captions, for the embedding cache
            self.captions = images.captions
        self.resolution = int(images.resolution)
        self.channels = autoencoder.latent_channels
        self.input_size = autoencoder.latent_size(self.resolution)

    def __len__(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.images, "set_epoch"):
            self.images.set_epoch(epoch)

    def __getitem__(self, index: int) -> tuple[Tensor, int | str]:
        i = int(index) + (len(self) if int(index) < 0 else 0)
        x, label = self.images[i]
        dev = torch.device("cpu") if get_worker_info() is not None else self.device
        if self.autoencoder.device != dev:
            self.autoencoder.to(dev)
        mean, std = self.autoencoder.encode_posterior(x[None].to(dev))
        mean, std = mean[0].float().cpu(), std[0].float().cpu()
        z = mean + std * _noise(self.seed, self.epoch, i, tuple(mean.shape)) if self.sample_posterior else mean
        # the second item passes through: a class label, or a caption (str) of a captioned data set
        return self.autoencoder_spec.scale(z), label if isinstance(label, str) else int(label)


def _section_spec(base: AutoencoderSpec, section: Any | None) -> AutoencoderSpec:
    """``base`` with the overrides of a config ``autoencoder`` section (None fields keep base)."""
    if section is None:
        return base
    source = getattr(section, "source", None)
    if source and Path(source).expanduser().is_dir():
        source = str(Path(source).expanduser().absolute())  # recorded in checkpoints: keep it usable
    kind = getattr(section, "kind", "auto")
    if kind not in ("auto", base.kind):
        raise LatentStoreError(
            f"autoencoder.kind is {kind!r} but the latents were made by a {base.kind!r} "
            f"autoencoder ({base.source}); set autoencoder.kind=auto or {base.kind}"
        )
    return base.with_overrides(
        source=source,
        scale_factor=getattr(section, "scale_factor", None),
        shift_factor=getattr(section, "shift_factor", None),
        latents_mean=getattr(section, "latents_mean", None),
        latents_std=getattr(section, "latents_std", None),
    )


def build_latent_dataset(data: Any, autoencoder: Any | None = None, repa_features: bool = False) -> LatentDataset:
    """The :class:`LatentDataset` of a config's ``data`` section (``kind: latents``); with
    ``repa_features`` its items carry the cached REPA features.

    ``data``: needs ``path``, ``flip``, ``seed``, ``resolution`` (checked against the store) and
    ``num_classes`` (``None``, or at least the store's). ``autoencoder``: the config's
    ``autoencoder`` section; its set fields (source, scaling) override the store's spec (the
    scaling applied to the stored posteriors, and where the VAE for sample grids is).
    """
    if not getattr(data, "path", None):
        raise LatentStoreError(
            "data.path is required for data.kind 'latents' (a directory made by patchforcing encode)"
        )
    path = Path(os.path.expanduser(str(data.path)))
    index = read_index(path)
    spec = _section_spec(AutoencoderSpec.from_dict(index["autoencoder"]), autoencoder)
    ds = LatentDataset(path, flip=bool(data.flip), seed=int(data.seed), spec=spec, repa_features=repa_features)
    res = getattr(data, "resolution", None)
    if res is not None and int(res) != ds.resolution:
        raise LatentStoreError(
            f"data.resolution is {res} but the latents in {str(path)!r} were encoded at "
            f"{ds.resolution}x{ds.resolution}; set data.resolution={ds.resolution}"
        )
    nc = getattr(data, "num_classes", None)
    if nc is not None and int(nc) < ds.num_classes:
        raise LatentStoreError(f"{str(path)!r} has {ds.num_classes} classes but data.num_classes={nc}")
    return ds


def build_online_dataset(
    images: Dataset, autoencoder: Any, seed: int = 0, device: str | torch.device = "auto"
) -> OnlineEncodedDataset:
    """Wrap an image data set for online encoding with the VAE of a config ``autoencoder``
    section (``source``, ``kind``, scaling overrides); ``device`` as in ``train.device``."""
    ae = load_online_autoencoder(autoencoder)
    return OnlineEncodedDataset(images, ae, seed=seed, device=resolve_device(device, torchrun_env().local_rank))


def load_online_autoencoder(autoencoder: Any) -> Autoencoder:
    """The VAE of a config ``autoencoder`` section for online encoding (``source``, ``kind``, and
    the scaling overrides applied to its spec)."""
    source = getattr(autoencoder, "source", None)
    if not source:
        raise LatentStoreError("autoencoder.online needs autoencoder.source (hub id or local VAE folder)")
    kind = getattr(autoencoder, "kind", "auto")
    ae = load_autoencoder(source, kind=kind)
    ae.spec = ae.spec.with_overrides(
        scale_factor=getattr(autoencoder, "scale_factor", None),
        shift_factor=getattr(autoencoder, "shift_factor", None),
        latents_mean=getattr(autoencoder, "latents_mean", None),
        latents_std=getattr(autoencoder, "latents_std", None),
    )
    return ae
