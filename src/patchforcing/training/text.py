"""Text-to-image training pieces: the captioned data, the frozen encoder with its embedding cache,
CFG caption dropout, and the stream of micro-batches from WebDataset shards.

The trainer stays one loop for both kinds of model: a batch is ``(x, y)`` with ``y`` class
labels or a list of captions, and :class:`TextConditioner` turns captions into the
:class:`~patchforcing.conditioning.TextEmbeddings` the model takes (``docs/t2i.md``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ..conditioning import TextEmbeddings
from ..data.captions import build_captioned_dataset
from ..encoders.text import TextEncoderError, load_text_encoder, patchforcing_cache_dir
from ..latents.datasets import load_online_autoencoder
from ..latents.text_cache import TextEmbeddingCache
from .config import ExperimentConfig
from .distributed import DistEnv

__all__ = [
    "EncodedStream",
    "TextConditioner",
    "build_captioned_data",
    "caption_dropout",
    "stream_micro_batches",
]


def build_captioned_data(cfg: ExperimentConfig) -> Dataset:
    """The captioned data set of a text-to-image config: items ``(x, caption)``."""
    d = cfg.data
    spec: dict[str, Any] = {"kind": d.kind, "path": d.path, "resolution": d.resolution, "flip": d.flip, "seed": d.seed}
    return build_captioned_dataset(spec)


class EncodedStream(IterableDataset):
    """Streamed images (WebDataset shards) that the training step encodes with a VAE, a batch at a
    time on the training device (``autoencoder.online`` with ``data.kind: shards``).

    Iterating gives the wrapped stream's ``(image, caption)`` items unchanged; :meth:`encode_batch`
    turns a batch of images into scaled latents (a posterior sample drawn from the step's
    generator). Attributes as latent data sets: ``autoencoder_spec``, ``channels``, ``input_size``,
    ``resolution``.
    """

    def __init__(self, stream: IterableDataset, autoencoder_section: Any, device: torch.device):
        super().__init__()
        self.stream = stream
        self.autoencoder = load_online_autoencoder(autoencoder_section).to(device)
        self.autoencoder_spec = self.autoencoder.spec
        self.resolution = int(stream.resolution)
        self.channels = self.autoencoder.latent_channels
        self.input_size = self.autoencoder.latent_size(self.resolution)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.stream, "set_epoch"):
            self.stream.set_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.stream)

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers read the stream only
        state = dict(self.__dict__)
        state["autoencoder"] = None
        return state

    @torch.no_grad()
    def encode_batch(self, images: Tensor, generator: torch.Generator | None) -> Tensor:
        """``(B, 3, H, W)`` images in ``[-1, 1]`` -> ``(B, c, h, w)`` scaled latents (fp32)."""
        with torch.autocast(images.device.type, enabled=False):
            return self.autoencoder.encode(images.float(), generator=generator)


def caption_dropout(cond: TextEmbeddings, p: float, generator: torch.Generator | None) -> TextEmbeddings:
    """Replace each caption by the empty caption with probability ``p`` (CFG training).

    Draws one ``torch.rand(B)`` from ``generator`` on the condition's device (nothing when
    ``p <= 0``) -- the same draw the class path's label dropout makes; row ``i`` is dropped
    where it is ``< p``.
    """
    if p <= 0:
        return cond
    drop = torch.rand((cond.batch_size,), generator=generator, device=cond.device) < p
    return cond.drop(drop)


class TextConditioner:
    """The frozen text encoder of a run and its caption-embedding cache.

    Args:
        cfg: the config (``text.encoder``, ``text.max_length``, ``text.cache_dir``).
        device: where the encoder runs and the embeddings go.
        env: the process group; with several ranks the captions are encoded split over them.
    Raises:
        TextEncoderError: the encoder cannot be loaded (the message says how to get it).
    """

    def __init__(self, cfg: ExperimentConfig, device: torch.device, env: DistEnv):
        t = cfg.text
        self.encoder = load_text_encoder(t.encoder, max_length=t.max_length, device=device)
        root = t.cache_dir or (patchforcing_cache_dir() / "caption-embeddings")
        self.cache = TextEmbeddingCache(root, self.encoder)
        self.device = device
        self.env = env

    @property
    def dim(self) -> int:
        return int(self.encoder.dim)

    def info(self) -> dict[str, Any]:
        """What a checkpoint records of the encoder (spec, family, dim, max_length, fingerprint)."""
        return dict(self.encoder.info())

    def precompute(self, captions: Sequence[str]) -> int:
        """Encode every caption not cached yet (split over the ranks); returns this rank's count."""
        n = self.cache.precompute(list(captions), rank=self.env.rank, world_size=self.env.world_size)
        if self.env.distributed:
            torch.distributed.barrier()
            self.cache.refresh()
        return n

    def __call__(self, captions: Sequence[str]) -> TextEmbeddings:
        """``B`` captions -> :class:`TextEmbeddings` on the device (misses are encoded and cached)."""
        if isinstance(captions, str):
            raise TextEncoderError("a batch of captions must be a list of strings, not one string")
        return self.cache.lookup(list(captions), device=self.device)

    def flush(self) -> None:
        self.cache.flush()


def stream_micro_batches(
    data: IterableDataset, micro_batch: int, num_workers: int, start_epoch: int, pin_memory: bool = False
) -> Iterator[tuple[Tensor, list[str]]]:
    """Micro-batches of ``micro_batch`` items from a streamed (sharded) data set, epoch after epoch.

    Each rank and worker reads its own part of the shards (:class:`~patchforcing.data.shards.
    ShardDataset`); epoch ``e`` has its own shard order and flips. A resumed run starts a new
    epoch (``start_epoch``): streamed data resumes at an epoch boundary, not at the exact sample.
    """
    epoch = start_epoch
    while True:
        if hasattr(data, "set_epoch"):
            data.set_epoch(epoch)
        loader = DataLoader(
            data, batch_size=micro_batch, num_workers=num_workers, drop_last=True, pin_memory=pin_memory
        )
        got = False
        for batch in loader:
            got = True
            yield batch
        if not got:
            raise ValueError(f"the shards gave fewer than one micro-batch ({micro_batch} items) in epoch {epoch}")
        epoch += 1
