"""Encoding an image source into a latent store: distributed (torchrun), resumable, verifiable.

Under torchrun rank ``r`` of ``W`` encodes the shards ``k`` with ``k % W == r`` (a gloo group only
for barriers); a shard whose sidecar exists and whose file matches the sidecar's sha256 is skipped;
shards are written atomically; rank 0 writes ``index.json`` after all ranks are done.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..autoencoders import Autoencoder, AutoencoderSpec, load_autoencoder
from ..data import DataError, ImageFolderDataset, NpzImageDataset
from ..encoders.vision import FrozenEncoder, VisionEncoderError, load_vision_encoder
from ..utils.devices import resolve_device, torchrun_env
from .store import (
    _SETTINGS,
    DTYPES,
    FORMAT_VERSION,
    LATENT_FORMAT,
    SCALINGS,
    LatentStoreError,
    _prepare_out,
    _read_json,
    _shard_done,
    _write_index,
    _write_shard,
    read_index,
)

__all__ = ["EncodeResult", "open_image_source", "encode_source"]


def open_image_source(source: str | os.PathLike, resolution: int) -> ImageFolderDataset | NpzImageDataset:
    """The image data set to encode: an ``.npz``/``.npy`` file or an ImageNet-layout folder,
    ADM centre-cropped to ``resolution``, never flipped. Raises :class:`DataError`."""
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() in (".npz", ".npy"):
        return NpzImageDataset(path, resolution, flip=False)
    if path.is_dir():
        return ImageFolderDataset(path, resolution, flip=False)
    raise DataError(f"image source {str(path)!r} is neither an image folder nor an .npz/.npy file")


@dataclass
class EncodeResult:
    """What :func:`encode_source` did (on this rank; ``index`` is read back on every rank)."""

    out: Path
    num_items: int
    num_shards: int
    encoded_shards: list[int] = field(default_factory=list)
    skipped_shards: list[int] = field(default_factory=list)
    images: int = 0
    seconds: float = 0.0
    index: dict[str, Any] = field(default_factory=dict)

    @property
    def images_per_sec(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


class _Dist:
    """torchrun's rank/world (:func:`~patchforcing.utils.devices.torchrun_env`); a gloo group for
    barriers only, with a long timeout."""

    def __init__(self) -> None:
        env = torchrun_env()
        self.world, self.rank, self.local_rank = env.world_size, env.rank, env.local_rank
        self.owned = False
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("gloo", timeout=timedelta(hours=12))
            self.owned = True

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.owned:
            dist.destroy_process_group()
            self.owned = False


def _settings(
    source: Path,
    dataset: Dataset,
    ae: Autoencoder,
    resolution: int,
    flip: bool,
    shard_size: int,
    dtype: str,
    scaling: str,
    repa: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What the shards depend on; a resumed encode must have the same."""
    extra = {"repa": repa} if repa is not None else {}  # (absent without REPA: older stores resume)
    return {
        **extra,
        "format": LATENT_FORMAT,
        "version": FORMAT_VERSION,
        "source": str(source),
        "num_items": len(dataset),
        "num_classes": int(dataset.num_classes),
        "resolution": int(resolution),
        "flip": bool(flip),
        "shard_size": int(shard_size),
        "dtype": dtype,
        "scaling": scaling,
        "autoencoder": ae.spec.to_dict(),
        "latent_shape": [ae.latent_channels, resolution // ae.downsample, resolution // ae.downsample],
    }


def encode_source(
    source: str | os.PathLike,
    out: str | os.PathLike,
    vae: Autoencoder | AutoencoderSpec | str,
    *,
    resolution: int = 256,
    flip: bool = False,
    batch_size: int = 32,
    shard_size: int = 2048,
    dtype: str = "float16",
    scaling: str = "vae",
    vae_kind: str = "auto",
    device: str | torch.device = "auto",
    num_workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    on_shard: Callable[[int], None] | None = None,
    repa_encoder: FrozenEncoder | str | None = None,
) -> EncodeResult:
    """Encode an image folder or ``.npz`` into a sharded latent store (see the module docstring).

    Args:
        source: ImageNet-layout folder (ADM centre crop) or ``.npz`` with ``images``/``labels``.
        out: the store directory (created).
        vae: a loaded :class:`Autoencoder`, a spec, or a source string (hub id or local dir).
        resolution: image side the images are cropped/resized to (the latent side is
            ``resolution / f``).
        flip: also store the posterior of each horizontally mirrored image.
        batch_size: images per VAE call; shard_size: items per shard (the resume unit).
        dtype: storage dtype of mean/std (``float16``, ``bfloat16`` or ``float32``).
        scaling: ``"vae"`` (the VAE's scalar factor) or ``"per-channel"`` (data statistics).
        vae_kind: kind for a plain source string (``auto``, ``kl``, ``tiny``).
        device: where the VAE runs (``auto``: this rank's GPU, else CPU).
        num_workers: image-loading processes (default: 0 for arrays, up to 8 for folders).
        overwrite: discard a store made with other settings instead of refusing.
        progress: tqdm bar (rank 0) with images/s.
        on_shard: called with the shard number after each shard is written.
        repa_encoder: also cache REPA features: a frozen vision encoder or its spec
            (``dinov2-b``, a DINOv2 directory, ``classifier:CKPT``; see
            :func:`~patchforcing.encoders.load_vision_encoder`). Each shard then holds ``repa``
            ``(N, T, D)`` (and ``repa_flip`` with ``flip``): the encoder's float32 features of the
            same cropped image the VAE sees, stored in ``dtype``; the index records the encoder
            (spec, fingerprint, width, token grid).

    Under torchrun every rank calls this with the same arguments; rank ``r`` encodes shards
    ``r, r + W, ...``; rank 0 writes ``index.json`` after all ranks are done.

    Raises:
        DataError / LatentStoreError: unreadable source, settings differing from an existing store.
        AutoencoderError: the VAE cannot be loaded.
    """
    if scaling not in SCALINGS:
        raise LatentStoreError(f"scaling must be one of {', '.join(SCALINGS)}; got {scaling!r}")
    if dtype not in DTYPES:
        raise LatentStoreError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    if batch_size < 1 or shard_size < 1:
        raise LatentStoreError(f"batch_size and shard_size must be >= 1, got {batch_size}, {shard_size}")
    out = Path(out).expanduser().absolute()
    src = Path(source).expanduser().absolute()
    dist = _Dist()
    try:
        dev = resolve_device(device, dist.local_rank)
        dataset = open_image_source(src, resolution)
        if isinstance(vae, Autoencoder):
            ae = vae.to(dev)
        else:
            if isinstance(vae, str) and Path(vae).expanduser().is_dir():
                vae = str(Path(vae).expanduser().absolute())  # stored in the index: keep it usable elsewhere
            ae = load_autoencoder(vae, kind=vae_kind, device=dev)
        if ae.spec.kind == "identity":
            raise LatentStoreError("encoding with the identity autoencoder makes no sense; pass --vae")
        ae.latent_size(resolution)  # divisibility check
        enc, repa = _repa_settings(repa_encoder, resolution, dev)
        settings = _settings(src, dataset, ae, resolution, flip, shard_size, dtype, scaling, repa)
        num_shards = math.ceil(len(dataset) / shard_size)

        if dist.rank == 0:
            _prepare_out(out, settings, overwrite, num_shards)
        dist.barrier()
        if _read_json(out / _SETTINGS) != settings:
            raise LatentStoreError(f"{out}/{_SETTINGS} changed while encoding (another encode into the same --out?)")

        mine = list(range(dist.rank, num_shards, dist.world))
        todo, skipped = [], []
        for k in mine:
            (skipped if _shard_done(out, k, settings) is not None else todo).append(k)
        result = EncodeResult(out, len(dataset), num_shards, skipped_shards=skipped)
        start_time = time.perf_counter()
        result.images = _encode_shards(
            dataset,
            ae,
            out,
            todo,
            shard_size,
            batch_size,
            flip,
            DTYPES[dtype],
            settings,
            num_workers,
            progress and dist.rank == 0,
            f"encode {dist.rank}/{dist.world}" if dist.world > 1 else "encode",
            result.encoded_shards,
            on_shard,
            dev,
            enc,
        )
        result.seconds = time.perf_counter() - start_time
        dist.barrier()
        if dist.rank == 0:
            _write_index(out, settings, num_shards, dataset, ae.spec)
        dist.barrier()
        result.index = read_index(out)
        return result
    finally:
        dist.close()


def _repa_settings(
    encoder: FrozenEncoder | str | None, resolution: int, dev: torch.device
) -> tuple[FrozenEncoder | None, dict[str, Any] | None]:
    """The loaded REPA encoder and what the store records of it (``None, None`` without one)."""
    if encoder is None:
        return None, None
    try:
        enc = load_vision_encoder(encoder, device=dev)
    except VisionEncoderError as err:
        raise LatentStoreError(f"--repa-encoder: {err}") from None
    probe = enc(torch.zeros(1, 3, resolution, resolution, device=dev))  # (1, T, D)
    tokens, dim = int(probe.shape[1]), int(probe.shape[2])
    grid = enc.grid(resolution, resolution) or (math.isqrt(tokens), math.isqrt(tokens))
    if grid[0] * grid[1] != tokens:
        raise LatentStoreError(f"the REPA encoder's {tokens} tokens do not form a grid; give it a grid()")
    info = enc.describe()
    info.update(dim=dim, tokens=tokens, grid=[int(grid[0]), int(grid[1])])
    return enc, info


class _Items(Dataset):
    """The source items of a list of index batches (for a DataLoader with a batch sampler)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        x, y = self.dataset[i]
        return x, int(y)


def _encode_shards(
    dataset,
    ae: Autoencoder,
    out: Path,
    shards: list[int],
    shard_size: int,
    batch_size: int,
    flip: bool,
    dtype: torch.dtype,
    settings: dict[str, Any],
    num_workers: int | None,
    progress: bool,
    desc: str,
    done: list[int],
    on_shard,
    dev: torch.device,
    repa: FrozenEncoder | None = None,
) -> int:
    """Encode ``shards`` in order; returns the number of images encoded."""
    n = len(dataset)
    batches: list[list[int]] = []
    owner: list[int] = []
    for k in shards:
        lo, hi = k * shard_size, min(n, (k + 1) * shard_size)
        for b in range(lo, hi, batch_size):
            batches.append(list(range(b, min(hi, b + batch_size))))
            owner.append(k)
    if not batches:
        return 0
    if num_workers is None:  # arrays are in memory; JPEG decoding wants processes (shared by the ranks)
        world = torchrun_env().local_world_size
        num_workers = 0 if isinstance(dataset, NpzImageDataset) else min(8, max(1, (os.cpu_count() or 2) // world - 1))
    loader = DataLoader(
        _Items(dataset),
        batch_sampler=batches,
        num_workers=num_workers,
        pin_memory=dev.type == "cuda",
        persistent_workers=False,
    )
    total = sum(len(b) for b in batches)
    bar = tqdm(total=total, desc=desc, unit="img", disable=not progress, dynamic_ncols=True, smoothing=0.1)
    parts: dict[str, list[Tensor]] = {}
    count = 0
    try:
        for i, (x, y) in enumerate(loader):
            k = owner[i]
            x = x.to(dev, non_blocking=True)
            inputs = torch.cat([x, x.flip(-1)]) if flip else x
            mean, std = ae.encode_posterior(inputs)
            mean, std = mean.to("cpu", dtype), std.to("cpu", dtype)
            b = x.shape[0]
            parts.setdefault("mean", []).append(mean[:b])
            parts.setdefault("std", []).append(std[:b])
            parts.setdefault("labels", []).append(torch.as_tensor(y, dtype=torch.int64))
            if flip:
                parts.setdefault("mean_flip", []).append(mean[b:])
                parts.setdefault("std_flip", []).append(std[b:])
            if repa is not None:  # REPA features of the same (and the mirrored) image
                feats = repa(inputs).to("cpu", dtype)
                parts.setdefault("repa", []).append(feats[:b])
                if flip:
                    parts.setdefault("repa_flip", []).append(feats[b:])
            count += b
            bar.update(b)
            if i + 1 == len(batches) or owner[i + 1] != k:
                tensors = {name: torch.cat(ts) for name, ts in parts.items()}
                _write_shard(out, k, k * shard_size, tensors, settings)
                done.append(k)
                parts = {}
                if on_shard is not None:
                    on_shard(k)
    finally:
        bar.close()
    return count
