"""WebDataset tar shards of captioned images, streamed: items ``(image (3, R, R) in [-1, 1], caption)``.

The format the authors' T2I data uses: each shard is a ``.tar`` whose members are grouped into
samples by key (the member name up to its first dot), e.g. ``000017.jpg`` + ``000017.txt``. The
image is the first of the ``jpg, jpeg, png, webp, bmp, tif, tiff, ppm`` members, decoded as an
image folder's files are (RGB, transparency on white) and ADM centre-cropped to ``resolution``
(:func:`~patchforcing.data.folder.center_crop_adm`); the caption is the ``txt`` member (UTF-8,
stripped), else ``caption``, else a ``json`` member's ``"caption"`` or ``"text"`` field. Shards
are read through the ``webdataset`` package (``pip install 'patchforcing[shards]'``), which also
opens ``pipe:`` and ``http(s)://`` URLs; ``path`` may be a brace pattern
(``shards/{000000..000999}.tar``), a list, or a directory (all its ``*.tar``, sorted).

**Splitting, explicitly.** Epoch ``e`` puts the shards in one order on every rank (shuffled by
``(seed, e)`` when ``shuffle``), and the stream is split over the ``W * K`` readers (``W`` ranks
with ``K`` DataLoader workers each; reader ``g = rank * K + worker``):

* at least as many shards as readers: reader ``g`` reads shards ``g, g + W*K, ...`` of that
  order, each shard by one reader;
* fewer shards than readers: every reader reads every shard and keeps the samples ``n`` with
  ``n % (W*K) == g`` (``n`` counts the epoch's samples in shard order), so none is idle.

Either way each sample is yielded exactly once per epoch over all ranks and workers (ranks may
get a few more or fewer than others: iterate by steps, not by epoch length). ``shuffle_buffer``
adds a per-reader shuffle of that many samples (seeded by ``(seed, e, g)``). Rank and world size
come from ``torch.distributed`` when it is initialised, else torchrun's ``RANK``/``WORLD_SIZE``, or
are given. Call :meth:`ShardDataset.set_epoch` before each epoch; DataLoader workers see it when
they are started anew for the epoch (the default, ``persistent_workers=False``).

A sample without an image or caption, or that fails to decode, is skipped with a warning
(``handler="raise"``: a :class:`~patchforcing.data.DataError` instead).
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import random
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from ..utils.devices import torchrun_env
from ..utils.seeding import item_hash
from .augment import hflip_flag
from .convert import to_float
from .errors import DataError
from .folder import center_crop_adm, to_rgb

__all__ = ["IMAGE_KEYS", "CAPTION_KEYS", "ShardDataset", "expand_shards", "split_shards"]

#: member suffixes read as the image, in order of preference
IMAGE_KEYS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm")
#: member suffixes read as the caption, in order of preference (``json``: its "caption"/"text")
CAPTION_KEYS: tuple[str, ...] = ("txt", "caption", "json")
_SHUFFLE_SALT = 0x5A_4D_05_11
_ORDER_SALT = 0x0D_E2_5E_ED


def _import_webdataset() -> Any:
    try:
        import webdataset
    except ImportError:
        raise DataError("WebDataset shards need the webdataset package: pip install 'patchforcing[shards]'") from None
    return webdataset


def _is_url(s: str) -> bool:
    return s.startswith("pipe:") or "://" in s


def expand_shards(path: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """The shard list of a brace pattern (``a/{000..009}.tar``, ``::``-separated patterns), a list,
    or a directory (its ``*.tar``, sorted). Local shards must exist.

    Raises:
        DataError: no shards, or a local shard that does not exist (the first one named).
    """
    if isinstance(path, (str, os.PathLike)):
        spec = os.fspath(path)
        local = Path(spec).expanduser()
        if not _is_url(spec) and local.is_dir():
            urls = sorted(glob.glob(os.path.join(glob.escape(str(local)), "*.tar")))
            if not urls:
                raise DataError(f"shard directory {spec!r} has no .tar files")
            return urls
        urls = _import_webdataset().shardlists.expand_urls(spec)
    else:
        urls = [os.fspath(p) for p in path]
    urls = [u if _is_url(u) else os.path.expanduser(u) for u in urls]
    if not urls:
        raise DataError(f"no shards in {path!r}")
    absent = [u for u in urls if not _is_url(u) and not os.path.isfile(u)]
    if absent:
        raise DataError(
            f"{len(absent)} of {len(urls)} shards do not exist (e.g. {absent[0]!r}); expected WebDataset "
            ".tar files (a brace pattern like shards/{000000..000099}.tar, a list, or a directory)"
        )
    return urls


def split_shards(num_shards: int, reader: int, readers: int) -> tuple[list[int], int]:
    """Which positions of the epoch's shard order reader ``reader`` of ``readers`` reads, and the
    sample stride: ``(positions, 1)`` when there are at least as many shards as readers, else
    ``(all positions, readers)`` (keep samples ``n % readers == reader``)."""
    if not 0 <= reader < readers:
        raise ValueError(f"reader {reader} is not in [0, {readers})")
    if num_shards >= readers:
        return list(range(reader, num_shards, readers)), 1
    return list(range(num_shards)), readers


class ShardDataset(IterableDataset):
    """Captioned images from WebDataset tar shards, split over ranks and workers without duplicates.

    Args:
        path: shards: a brace pattern, a list, or a directory (see :func:`expand_shards`).
        resolution: output side in pixels.
        flip: random horizontal flip, a fair coin per ``(seed, epoch, sample key)``; default off
            (captions may name directions).
        seed: seed of shard order, shuffle buffer and flips.
        shuffle: shuffle the shard order per epoch (the same order on every rank).
        shuffle_buffer: per-reader sample shuffle buffer (0: none).
        rank, world_size: this process's place (default: ``torch.distributed``, else torchrun's env).
        handler: ``"warn"`` (skip bad samples with a warning) or ``"raise"``.

    Items: ``(image float32 (3, resolution, resolution) in [-1, 1], caption str)``.
    Attributes: ``shards`` (the list), ``resolution``, ``channels`` (3), ``epoch``.
    """

    channels: int = 3

    def __init__(
        self,
        path: str | os.PathLike | Sequence[str | os.PathLike],
        resolution: int,
        flip: bool = False,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        handler: str = "warn",
    ) -> None:
        super().__init__()
        if int(resolution) < 1:
            raise DataError(f"ShardDataset: resolution must be >= 1, got {resolution!r}")
        if handler not in ("warn", "raise"):
            raise DataError(f"handler must be 'warn' or 'raise', got {handler!r}")
        if (rank is None) != (world_size is None):
            raise DataError("give both rank and world_size, or neither")
        if rank is not None and not 0 <= int(rank) < int(world_size):
            raise DataError(f"rank {rank} is not in [0, world_size={world_size})")
        self.shards = expand_shards(path)
        self.resolution = int(resolution)
        self.flip = bool(flip)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.shuffle_buffer = max(0, int(shuffle_buffer))
        self.rank = None if rank is None else int(rank)
        self.world_size = None if world_size is None else int(world_size)
        self.handler = handler
        self.epoch = 0

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    def set_epoch(self, epoch: int) -> None:
        """Select the shard order, shuffle and flips of ``epoch`` (on every rank alike)."""
        self.epoch = int(epoch)

    def shard_order(self, epoch: int | None = None) -> list[str]:
        """The shards in the order of ``epoch`` (the same on every rank)."""
        e = self.epoch if epoch is None else int(epoch)
        if not self.shuffle:
            return list(self.shards)
        perm = np.random.default_rng(item_hash(_ORDER_SALT, self.seed, e)).permutation(len(self.shards))
        return [self.shards[i] for i in perm]

    def _place(self) -> tuple[int, int]:
        if self.rank is not None and self.world_size is not None:
            return self.rank, self.world_size
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        env = torchrun_env()
        return env.rank, env.world_size

    # ---- reading ------------------------------------------------------------------------------

    def _on_error(self, err: BaseException) -> bool:
        if self.handler == "raise":
            raise DataError(f"bad WebDataset shard or sample: {err}") from None
        warnings.warn(f"skipping a bad shard or sample ({type(err).__name__}: {err})", stacklevel=2)
        return True

    def _samples(self, shards: list[str], select: Any = None) -> Iterator[dict[str, Any]]:
        wds = _import_webdataset()
        src = [{"url": u} for u in shards]
        return iter(wds.tariterators.tarfile_samples(src, handler=self._on_error, select_files=select))

    @staticmethod
    def _caption(sample: dict[str, Any]) -> str | None:
        for k in CAPTION_KEYS:
            if k in sample:
                raw = sample[k]
                if k == "json":
                    obj = json.loads(raw)
                    text = obj.get("caption", obj.get("text")) if isinstance(obj, dict) else None
                    if isinstance(text, str):
                        return text.strip()
                    continue
                return bytes(raw).decode("utf-8").strip()
        return None

    def _decode(self, sample: dict[str, Any]) -> tuple[torch.Tensor, str] | None:
        key = f"{os.path.basename(str(sample.get('__url__', '')))}/{sample.get('__key__', '')}"
        try:
            image_key = next((k for k in IMAGE_KEYS if k in sample), None)
            caption = self._caption(sample)
            if image_key is None or caption is None:
                what = "image" if image_key is None else "caption"
                raise ValueError(
                    f"sample {key!r} has no {what} (members: {sorted(k for k in sample if k[:2] != '__')})"
                )
            with Image.open(io.BytesIO(sample[image_key])) as img:
                img.load()
                arr = center_crop_adm(to_rgb(img), self.resolution)
        except (OSError, ValueError, SyntaxError, EOFError, UnicodeDecodeError, Image.DecompressionBombError) as err:
            self._on_error(err)
            return None
        if self.flip:
            h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
            if hflip_flag(self.seed, self.epoch, h):
                arr = arr[:, ::-1]
        x = to_float(torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))))
        return x, caption

    def __iter__(self) -> Iterator[tuple[torch.Tensor, str]]:
        rank, world = self._place()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        readers, reader = world * workers, rank * workers + worker
        order = self.shard_order()
        positions, stride = split_shards(len(order), reader, readers)
        items = self._items([order[p] for p in positions], reader if stride > 1 else 0, stride)
        if self.shuffle_buffer > 1:
            items = self._buffer_shuffle(items, random.Random(item_hash(_SHUFFLE_SALT, self.seed, self.epoch, reader)))
        return items

    def _items(self, shards: list[str], offset: int, stride: int) -> Iterator[tuple[torch.Tensor, str]]:
        for n, sample in enumerate(self._samples(shards)):
            if stride > 1 and n % stride != offset:
                continue
            item = self._decode(sample)
            if item is not None:
                yield item

    def _buffer_shuffle(self, items: Iterator[Any], rng: random.Random) -> Iterator[Any]:
        buf: list[Any] = []
        for item in items:
            buf.append(item)
            if len(buf) >= self.shuffle_buffer:
                j = rng.randrange(len(buf))
                buf[j], buf[-1] = buf[-1], buf[j]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf

    def iter_captions(self) -> Iterator[str]:
        """Every sample's caption, in the shards' listed order, without decoding images (e.g. to
        precompute a caption-embedding cache)."""

        def select(name: str) -> bool:
            return name.rsplit("/", 1)[-1].partition(".")[2].lower() in CAPTION_KEYS

        for sample in self._samples(list(self.shards), select=select):
            try:
                caption = self._caption(sample)
            except (ValueError, UnicodeDecodeError) as err:
                self._on_error(err)
                continue
            if caption is not None:
                yield caption
