"""Latent data: pre-extracted VAE posteriors on disk, and VAE encoding in the loop.

**The store** (``patchforcing encode SOURCE --vae VAE --out DIR``) is a directory::

    DIR/encode.json                 the settings (a second run must match them, or --overwrite)
    DIR/shard-00000.safetensors     tensors of items [0, S): mean, std (N, c, h, w), labels (N,) int64,
                                    and with --flip also mean_flip, std_flip (the mirrored image);
                                    with --repa-encoder also repa (N, T, D) [, repa_flip] (REPA features)
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

The package: :mod:`.store` (the file format: index, shards, verification), :mod:`.encode`
(:func:`encode_source`, the distributed encoder) and :mod:`.datasets` (the training data sets and
their builders). Every public name is importable from ``patchforcing.latents``.
"""

from .datasets import LatentDataset, OnlineEncodedDataset, build_latent_dataset, build_online_dataset
from .encode import EncodeResult, encode_source, open_image_source
from .store import FORMAT_VERSION, LATENT_FORMAT, SCALINGS, LatentStoreError, read_index, verify_latent_store
from .text_cache import TextCacheError, TextEmbeddingCache

__all__ = [
    "LATENT_FORMAT",
    "FORMAT_VERSION",
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
    "TextCacheError",
    "TextEmbeddingCache",
]
