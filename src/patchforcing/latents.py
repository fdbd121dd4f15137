"""Latent data: pre-extracted VAE posteriors on disk, and VAE encoding in the loop.

**The store** (``patchforcing encode SOURCE --vae VAE --out DIR``) is a directory::

    DIR/encode.json                 the settings (a second run must match them, or --overwrite)
    DIR/shard-00000.safetensors     tensors of items [0, S): mean, std (N, c, h, w), labels (N,) int64,
                                    and with --flip also mean_flip, std_flip (the mirrored image)
    DIR/shard-00000.json            written after the shard: count, sha256, channel sums
    DIR/index.json                  written last: every shard with its count and sha256, the
                                    autoencoder spec with its scaling, resolution, flip, classes

Posteriors are stored *unscaled* (``mean``/``std`` of the VAE, ``float16`` by default), so the
scaling can be chosen later; the index holds the scaling to use (the VAE's scalar 0.18215, or
per-channel statistics of the data with ``--scaling per-channel``). Shard ``k`` holds items
``[k * S, (k + 1) * S)`` of the source in its own order (class folders sorted, files sorted).

Encoding is *distributed* (under torchrun, rank ``r`` of ``W`` encodes the shards ``k`` with
``k % W == r``; a gloo group only for barriers), *resumable* (a shard whose sidecar exists and
whose file matches the sidecar's sha256 is skipped; shards are written atomically) and
*verifiable* (:func:`verify_latent_store` re-checks counts and checksums).

**Training** reads a store with :class:`LatentDataset`: item ``i`` in epoch ``e`` is the scaled
posterior sample ``scale(mean + std * eps)``, ``eps`` drawn from a generator seeded by
``hash(seed, e, i)``; with ``flip`` the mirrored posterior is used when
:func:`patchforcing.data.augment.hflip_flag` says so (the latent grid is mirrored when the store
has no flipped posterior). Everything is a function of ``(seed, epoch, index)``: resumable and
identical in every worker/rank. :class:`OnlineEncodedDataset` does the same for an image data set
with the VAE in the loop (small data sets).

Public API: :func:`encode_source`, :class:`EncodeResult`, :func:`open_image_source`,
:func:`read_index`, :func:`verify_latent_store`, :class:`LatentDataset`,
:class:`OnlineEncodedDataset`, :func:`build_latent_dataset`, :func:`build_online_dataset`,
:class:`LatentStoreError`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .autoencoders import Autoencoder, AutoencoderSpec, load_autoencoder
from .checkpoints import atomic_write
from .data import DataError, ImageFolderDataset, NpzImageDataset
from .data.augment import hflip_flag, item_hash

__all__ = [
    "LATENT_FORMAT",
    "SCALINGS",
    "LatentStoreError",
    "EncodeResult",
    "open_image_source",
    "encode_source",
    "read_index",
    "verify_latent_store",
    "LatentDataset",
    "OnlineEncodedDataset",
    "build_latent_dataset",
    "build_online_dataset",
]

LATENT_FORMAT = "patchforcing-latents"
FORMAT_VERSION = 1
#: ``--scaling`` choices: the VAE's own (scalar 0.18215 for the SD VAE) or per-channel data statistics
SCALINGS: tuple[str, ...] = ("vae", "per-channel")
_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}
_NOISE_SALT = 0x1A7E_47_0000_0003
_INDEX, _SETTINGS = "index.json", "encode.json"


class LatentStoreError(DataError):
    """A latent store that cannot be written, resumed or read (mismatched settings, bad shard)."""


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------


def _shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def _sidecar_name(k: int) -> str:
    return f"shard-{k:05d}.json"


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _write_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=1, sort_keys=False)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise LatentStoreError(f"cannot read {path}: {err}") from None


def _pick_device(pref: str | torch.device, local_rank: int = 0) -> torch.device:
    if str(pref) == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(pref)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev


def _noise(seed: int, epoch: int, index: int, shape: tuple[int, ...]) -> Tensor:
    """Standard normal noise fixed per ``(seed, epoch, index)`` (the posterior sample's eps)."""
    g = torch.Generator().manual_seed(item_hash(_NOISE_SALT, seed, epoch, index) & ((1 << 63) - 1))
    return torch.randn(shape, generator=g)


def open_image_source(source: str | os.PathLike, resolution: int) -> ImageFolderDataset | NpzImageDataset:
    """The image data set to encode: an ``.npz``/``.npy`` file or an ImageNet-layout folder,
    ADM centre-cropped to ``resolution``, never flipped. Raises :class:`DataError`."""
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() in (".npz", ".npy"):
        return NpzImageDataset(path, resolution, flip=False)
    if path.is_dir():
        return ImageFolderDataset(path, resolution, flip=False)
    raise DataError(f"image source {str(path)!r} is neither an image folder nor an .npz/.npy file")


# --------------------------------------------------------------------------------------------
# encoding
# --------------------------------------------------------------------------------------------


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
    """torchrun's rank/world (a gloo group for barriers only, long timeout)."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.owned = False
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("gloo", timeout=timedelta(hours=12))
                self.owned = True

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.owned:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.owned = False


def _settings(source: Path, dataset: Dataset, ae: Autoencoder, resolution: int, flip: bool,
              shard_size: int, dtype: str, scaling: str) -> dict[str, Any]:
    """What the shards depend on; a resumed encode must have the same."""
    return {
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


def _shard_done(out: Path, k: int, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The sidecar of shard ``k`` if the shard is complete and intact, else ``None``."""
    side, shard = out / _sidecar_name(k), out / _shard_name(k)
    if not (side.is_file() and shard.is_file()):
        return None
    try:
        info = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if info.get("settings_sha256") != _settings_hash(settings):
        return None
    if shard.stat().st_size != info.get("bytes") or _sha256(shard) != info.get("sha256"):
        return None
    return info


def _settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _write_shard(out: Path, k: int, start: int, tensors: dict[str, Tensor], settings: dict[str, Any]) -> dict[str, Any]:
    """Write shard ``k`` then its sidecar (both atomically); returns the sidecar."""
    from safetensors.torch import save_file

    path = out / _shard_name(k)
    # no safetensors metadata: its key order is not stable, and equal latents should give equal bytes
    atomic_write(path, lambda tmp: save_file({n: t.contiguous() for n, t in tensors.items()}, tmp))
    mean = tensors["mean"].double()
    var = tensors["std"].double() ** 2
    n_pix = mean.shape[0] * mean.shape[2] * mean.shape[3]
    info = {
        "file": path.name,
        "shard": k,
        "start": start,
        "count": int(mean.shape[0]),
        "bytes": path.stat().st_size,
        "sha256": _sha256(path),
        "settings_sha256": _settings_hash(settings),
        # per-channel sums over items and pixels, for --scaling per-channel
        "stats": {
            "pixels": int(n_pix),
            "sum_mean": mean.sum(dim=(0, 2, 3)).tolist(),
            "sum_mean_sq": (mean ** 2).sum(dim=(0, 2, 3)).tolist(),
            "sum_var": var.sum(dim=(0, 2, 3)).tolist(),
        },
    }
    _write_json(out / _sidecar_name(k), info)
    return info


def _channel_scaling(sidecars: list[dict[str, Any]], base: AutoencoderSpec) -> AutoencoderSpec:
    """Per-channel mean/std of posterior *samples* over the data: ``E[mu]`` and
    ``sqrt(Var[mu] + E[sigma^2])`` (exact, from the shards' sums)."""
    pixels = sum(s["stats"]["pixels"] for s in sidecars)
    c = len(sidecars[0]["stats"]["sum_mean"])
    tot = {key: np.zeros(c) for key in ("sum_mean", "sum_mean_sq", "sum_var")}
    for s in sidecars:
        for key in tot:
            tot[key] += np.asarray(s["stats"][key], dtype=np.float64)
    mean = tot["sum_mean"] / pixels
    var = np.maximum(tot["sum_mean_sq"] / pixels - mean ** 2, 0.0) + tot["sum_var"] / pixels
    std = np.sqrt(np.maximum(var, 1e-12))
    return AutoencoderSpec(kind=base.kind, source=base.source, scale_factor=1.0, shift_factor=0.0,
                           latents_mean=tuple(mean.tolist()), latents_std=tuple(std.tolist()))


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

    Under torchrun every rank calls this with the same arguments; rank ``r`` encodes shards
    ``r, r + W, ...``; rank 0 writes ``index.json`` after all ranks are done.

    Raises:
        DataError / LatentStoreError: unreadable source, settings differing from an existing store.
        AutoencoderError: the VAE cannot be loaded.
    """
    if scaling not in SCALINGS:
        raise LatentStoreError(f"scaling must be one of {', '.join(SCALINGS)}; got {scaling!r}")
    if dtype not in _DTYPES:
        raise LatentStoreError(f"dtype must be one of {', '.join(_DTYPES)}; got {dtype!r}")
    if batch_size < 1 or shard_size < 1:
        raise LatentStoreError(f"batch_size and shard_size must be >= 1, got {batch_size}, {shard_size}")
    out = Path(out).expanduser().absolute()
    src = Path(source).expanduser().absolute()
    dist = _Dist()
    try:
        dev = _pick_device(device, dist.local_rank)
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
        settings = _settings(src, dataset, ae, resolution, flip, shard_size, dtype, scaling)
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
        result.images = _encode_shards(dataset, ae, out, todo, shard_size, batch_size, flip, _DTYPES[dtype],
                                       settings, num_workers, progress and dist.rank == 0,
                                       f"encode {dist.rank}/{dist.world}" if dist.world > 1 else "encode",
                                       result.encoded_shards, on_shard, dev)
        result.seconds = time.perf_counter() - start_time
        dist.barrier()
        if dist.rank == 0:
            _write_index(out, settings, num_shards, dataset, ae.spec)
        dist.barrier()
        result.index = read_index(out)
        return result
    finally:
        dist.close()


def _prepare_out(out: Path, settings: dict[str, Any], overwrite: bool, num_shards: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    existing = out / _SETTINGS
    if existing.is_file():
        old = _read_json(existing)
        if old != settings:
            if not overwrite:
                diff = [k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
                raise LatentStoreError(
                    f"{out} holds latents encoded with other settings (differing: {', '.join(diff)}); "
                    "choose another --out, or pass --overwrite to re-encode everything")
            for p in list(out.glob("shard-*.safetensors")) + list(out.glob("shard-*.json")) + [out / _INDEX]:
                if p.exists():
                    p.unlink()
    elif any(out.glob("shard-*")):
        raise LatentStoreError(f"{out} holds shards but no {_SETTINGS}; not a store made by this version "
                               "(choose another --out or remove it)")
    if (out / _INDEX).exists():  # rewritten at the end, after all shards are checked
        (out / _INDEX).unlink()
    for p in out.glob("shard-*.safetensors"):  # stale shards beyond the current count
        if int(p.stem.split("-")[1]) >= num_shards:
            p.unlink()
    _write_json(existing, settings)


class _Items(Dataset):
    """The source items of a list of index batches (for a DataLoader with a batch sampler)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        x, y = self.dataset[i]
        return x, int(y)


def _encode_shards(dataset, ae: Autoencoder, out: Path, shards: list[int], shard_size: int, batch_size: int,
                   flip: bool, dtype: torch.dtype, settings: dict[str, Any], num_workers: int | None,
                   progress: bool, desc: str, done: list[int], on_shard, dev: torch.device) -> int:
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
        world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        num_workers = 0 if isinstance(dataset, NpzImageDataset) else min(8, max(1, (os.cpu_count() or 2) // world - 1))
    loader = DataLoader(_Items(dataset), batch_sampler=batches, num_workers=num_workers,
                        pin_memory=dev.type == "cuda", persistent_workers=False)
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


def _write_index(out: Path, settings: dict[str, Any], num_shards: int, dataset, spec: AutoencoderSpec) -> None:
    sidecars = []
    for k in range(num_shards):
        side, shard = out / _sidecar_name(k), out / _shard_name(k)
        info = _read_json(side) if side.is_file() else None  # checksums: verified when skipped, fresh when written
        if (info is None or info.get("settings_sha256") != _settings_hash(settings) or not shard.is_file()
                or shard.stat().st_size != info.get("bytes")):
            raise LatentStoreError(f"shard {k} of {out} is missing after encoding; run the same command again to resume")
        sidecars.append(info)
    total = sum(s["count"] for s in sidecars)
    if total != settings["num_items"]:
        raise LatentStoreError(f"{out}: the shards hold {total} items, the source {settings['num_items']}")
    if settings["scaling"] == "per-channel":
        spec = _channel_scaling(sidecars, spec)
    class_names = getattr(dataset, "class_names", None)
    index = {
        "format": LATENT_FORMAT,
        "version": FORMAT_VERSION,
        "num_items": total,
        "num_classes": settings["num_classes"],
        "class_names": list(class_names) if class_names else None,
        "resolution": settings["resolution"],
        "latent_shape": settings["latent_shape"],
        "flip": settings["flip"],
        "dtype": settings["dtype"],
        "shard_size": settings["shard_size"],
        "scaling": settings["scaling"],
        "autoencoder": spec.to_dict(),
        "source": settings["source"],
        "shards": [{k: s[k] for k in ("file", "start", "count", "bytes", "sha256")} for s in sidecars],
    }
    _write_json(out / _INDEX, index)


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


def read_index(path: str | os.PathLike) -> dict[str, Any]:
    """The ``index.json`` of a finished store (raises :class:`LatentStoreError` when there is
    none: the encode did not finish; run it again to resume)."""
    path = Path(path).expanduser()
    idx = path / _INDEX
    if not path.is_dir():
        raise LatentStoreError(f"latent store {str(path)!r} does not exist; make it with `patchforcing encode "
                               f"IMAGES --vae VAE --out {path}`")
    if not idx.is_file():
        hint = (" (an encode into it did not finish: run the same `patchforcing encode` command again to resume)"
                if (path / _SETTINGS).is_file() else "; make it with `patchforcing encode IMAGES --vae VAE --out DIR`")
        raise LatentStoreError(f"{str(path)!r} has no {_INDEX}{hint}")
    index = _read_json(idx)
    if not isinstance(index, dict) or index.get("format") != LATENT_FORMAT:
        raise LatentStoreError(f"{idx} is not a {LATENT_FORMAT} index")
    if int(index.get("version", 0)) > FORMAT_VERSION:
        raise LatentStoreError(f"{idx} has format version {index['version']}; this patchforcing reads <= {FORMAT_VERSION}")
    return index


def verify_latent_store(path: str | os.PathLike, checksums: bool = True) -> dict[str, Any]:
    """Check every shard of a store against its index: present, item count, size and (with
    ``checksums``) sha256. Returns the index; raises :class:`LatentStoreError` listing the bad shards."""
    from safetensors import safe_open

    path = Path(path).expanduser()
    index = read_index(path)
    bad = []
    total = 0
    for s in index["shards"]:
        f = path / s["file"]
        if not f.is_file():
            bad.append(f"{s['file']}: missing")
            continue
        if f.stat().st_size != s["bytes"]:
            bad.append(f"{s['file']}: {f.stat().st_size} bytes, index says {s['bytes']}")
            continue
        if checksums and _sha256(f) != s["sha256"]:
            bad.append(f"{s['file']}: sha256 mismatch (corrupt)")
            continue
        try:
            with safe_open(str(f), framework="pt") as h:
                n = h.get_slice("labels").get_shape()[0]
        except Exception as err:  # unreadable safetensors
            bad.append(f"{s['file']}: unreadable ({err})")
            continue
        if n != s["count"]:
            bad.append(f"{s['file']}: {n} items, index says {s['count']}")
        total += n
    if not bad and total != index["num_items"]:
        bad.append(f"{total} items in the shards, index says {index['num_items']}")
    if bad:
        raise LatentStoreError(f"latent store {path} failed verification:\n  " + "\n  ".join(bad)
                               + "\nre-run `patchforcing encode` with the same arguments to re-encode bad shards")
    return index


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

    Attributes:
        num_classes, class_names, resolution (image side the latents came from), input_size
        (latent side), channels (latent channels), latent_shape, autoencoder_spec, has_flip,
        index, labels (``int64 (N,)``, read on first use).
    """

    def __init__(self, path: str | os.PathLike, flip: bool = True, seed: int = 0, sample_posterior: bool = True,
                 spec: AutoencoderSpec | None = None, verify: bool = False):
        self.path = Path(path).expanduser()
        self.index = verify_latent_store(self.path) if verify else read_index(self.path)
        for s in self.index["shards"]:
            f = self.path / s["file"]
            if not f.is_file() or f.stat().st_size != s["bytes"]:
                raise LatentStoreError(f"{f} is missing or has the wrong size; re-run `patchforcing encode` "
                                       f"with the same arguments (verify with patchforcing encode --verify)")
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
            from safetensors import safe_open

            h = self._handles[k] = safe_open(str(self.path / self.index["shards"][k]["file"]), framework="pt")
        return h

    @property
    def labels(self) -> np.ndarray:
        if self._labels is None:
            self._labels = np.concatenate([self._shard(k).get_tensor("labels").numpy()
                                           for k in range(len(self.index["shards"]))]).astype(np.int64)
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

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        i = int(index) + (self._n if int(index) < 0 else 0)
        flipped = self.flip and hflip_flag(self.seed, self.epoch, i)
        mean, std, label = self.posterior(i, flipped)
        z = mean
        if self.sample_posterior:
            z = mean + std * _noise(self.seed, self.epoch, i, tuple(mean.shape))
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

    def __init__(self, images: Dataset, autoencoder: Autoencoder, seed: int = 0, device: str | torch.device = "cpu",
                 sample_posterior: bool = True):
        self.images = images
        self.autoencoder = autoencoder.cpu()
        self.autoencoder_spec = autoencoder.spec
        self.seed = int(seed)
        self.epoch = 0
        self.device = torch.device(device)
        self.sample_posterior = bool(sample_posterior)
        self.num_classes = int(images.num_classes)
        self.resolution = int(images.resolution)
        self.channels = autoencoder.latent_channels
        self.input_size = autoencoder.latent_size(self.resolution)

    def __len__(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.images, "set_epoch"):
            self.images.set_epoch(epoch)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        from torch.utils.data import get_worker_info

        i = int(index) + (len(self) if int(index) < 0 else 0)
        x, label = self.images[i]
        dev = torch.device("cpu") if get_worker_info() is not None else self.device
        if self.autoencoder.device != dev:
            self.autoencoder.to(dev)
        mean, std = self.autoencoder.encode_posterior(x[None].to(dev))
        mean, std = mean[0].float().cpu(), std[0].float().cpu()
        z = mean + std * _noise(self.seed, self.epoch, i, tuple(mean.shape)) if self.sample_posterior else mean
        return self.autoencoder_spec.scale(z), int(label)


# --------------------------------------------------------------------------------------------
# builders used by the trainer
# --------------------------------------------------------------------------------------------


def _section_spec(base: AutoencoderSpec, section: Any | None) -> AutoencoderSpec:
    """``base`` with the overrides of a config ``autoencoder`` section (None fields keep base)."""
    if section is None:
        return base
    source = getattr(section, "source", None)
    if source and Path(source).expanduser().is_dir():
        source = str(Path(source).expanduser().absolute())  # recorded in checkpoints: keep it usable
    kind = getattr(section, "kind", "auto")
    if kind not in ("auto", base.kind):
        raise LatentStoreError(f"autoencoder.kind is {kind!r} but the latents were made by a {base.kind!r} "
                               f"autoencoder ({base.source}); set autoencoder.kind=auto or {base.kind}")
    return base.with_overrides(
        source=source,
        scale_factor=getattr(section, "scale_factor", None),
        shift_factor=getattr(section, "shift_factor", None),
        latents_mean=getattr(section, "latents_mean", None),
        latents_std=getattr(section, "latents_std", None),
    )


def build_latent_dataset(data: Any, autoencoder: Any | None = None) -> LatentDataset:
    """The :class:`LatentDataset` of a config's ``data`` section (``kind: latents``).

    ``data``: needs ``path``, ``flip``, ``seed``, ``resolution`` (checked against the store) and
    ``num_classes`` (``None``, or at least the store's). ``autoencoder``: the config's
    ``autoencoder`` section; its set fields (source, scaling) override the store's spec (the
    scaling applied to the stored posteriors, and where the VAE for sample grids is).
    """
    if not getattr(data, "path", None):
        raise LatentStoreError("data.path is required for data.kind 'latents' (a directory made by patchforcing encode)")
    path = Path(os.path.expanduser(str(data.path)))
    index = read_index(path)
    spec = _section_spec(AutoencoderSpec.from_dict(index["autoencoder"]), autoencoder)
    ds = LatentDataset(path, flip=bool(data.flip), seed=int(data.seed), spec=spec)
    res = getattr(data, "resolution", None)
    if res is not None and int(res) != ds.resolution:
        raise LatentStoreError(f"data.resolution is {res} but the latents in {str(path)!r} were encoded at "
                               f"{ds.resolution}x{ds.resolution}; set data.resolution={ds.resolution}")
    nc = getattr(data, "num_classes", None)
    if nc is not None and int(nc) < ds.num_classes:
        raise LatentStoreError(f"{str(path)!r} has {ds.num_classes} classes but data.num_classes={nc}")
    return ds


def build_online_dataset(images: Dataset, autoencoder: Any, seed: int = 0,
                         device: str | torch.device = "auto") -> OnlineEncodedDataset:
    """Wrap an image data set for online encoding with the VAE of a config ``autoencoder``
    section (``source``, ``kind``, scaling overrides); ``device`` as in ``train.device``."""
    source = getattr(autoencoder, "source", None)
    if not source:
        raise LatentStoreError("autoencoder.online needs autoencoder.source (hub id or local VAE folder)")
    kind = getattr(autoencoder, "kind", "auto")
    ae = load_autoencoder(source, kind=kind)
    spec = ae.spec.with_overrides(
        scale_factor=getattr(autoencoder, "scale_factor", None),
        shift_factor=getattr(autoencoder, "shift_factor", None),
        latents_mean=getattr(autoencoder, "latents_mean", None),
        latents_std=getattr(autoencoder, "latents_std", None),
    )
    ae.spec = spec
    return OnlineEncodedDataset(images, ae, seed=seed, device=_pick_device(device, int(os.environ.get("LOCAL_RANK", "0"))))
