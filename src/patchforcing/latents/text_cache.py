"""A disk cache of caption embeddings: a frozen encoder's states, computed once per distinct caption.

A text encoder is frozen, so a caption's states never change while the encoder does not: they
are computed once (:meth:`TextEmbeddingCache.precompute` for a data set's whole caption list) and
read back at every step (:meth:`TextEmbeddingCache.lookup`), like latents. Layout::

    DIR/<fingerprint[:16]>/encoder.json            the encoder: full fingerprint, spec, dim, max_length
    DIR/<fingerprint[:16]>/shard-*.safetensors     entries: tensor name = key, value = (L_i, D) states

An entry's **key** is ``sha256(fingerprint + "\\n" + caption)``: a content hash of the encoder
(:attr:`~patchforcing.encoders.TextEncoder.fingerprint`: its weights, tokenizer, max_length and
dtype) and the caption. A changed caption has a new key and is the only one computed again; a
changed encoder has a new fingerprint, hence a new directory. An entry holds only the caption's
real tokens (``L_i`` of them; padding is zero and masked anyway), in ``dtype`` (float32 default).

Shards are written atomically under unique names and never rewritten, so several processes (DDP
ranks: ``precompute(..., rank=r, world_size=W)`` splits the missing captions) can fill one cache
at once; :meth:`~TextEmbeddingCache.refresh` picks up shards written by others. Stale entries
(captions no longer used) stay until the directory is removed.

Sized for data sets of up to a few million captions (the index of keys is held in memory); at the
paper's scale (120M captions) run the encoder in the training loop instead.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..conditioning import TextEmbeddings
from ..data.errors import DataError
from ..utils.io import atomic_write, read_json, write_json_atomic

__all__ = ["TEXT_CACHE_FORMAT", "TextCacheError", "TextEmbeddingCache", "caption_key"]

TEXT_CACHE_FORMAT = "patchforcing-text-cache"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_META = "encoder.json"


class TextCacheError(DataError):
    """A caption-embedding cache that cannot be used: no such cache, a caption not in it, a mismatch."""


def caption_key(fingerprint: str, caption: str) -> str:
    """The entry key of ``caption`` under an encoder ``fingerprint``: sha256 hex of both."""
    return hashlib.sha256(f"{fingerprint}\n{caption}".encode()).hexdigest()


class TextEmbeddingCache:
    """Caption -> frozen text-encoder states, on disk.

    Args:
        directory: the cache root (one sub-directory per encoder fingerprint).
        encoder: the :class:`~patchforcing.encoders.TextEncoder` (or anything with
            ``fingerprint``, ``dim``, ``info()`` and ``encoder(captions) -> TextEmbeddings``);
            without one the cache is read-only and ``fingerprint`` names which encoder's entries
            to read (e.g. a training run that precomputed everything and does not load the
            encoder again).
        fingerprint: the encoder fingerprint when no encoder is given.
        dtype: storage dtype of new entries, ``"float32"`` (default, exact), ``"float16"`` or
            ``"bfloat16"``; lookups always return float32.
        shard_size: entries per shard file written.

    Raises:
        TextCacheError: neither encoder nor fingerprint; a read-only cache that does not exist;
            an encoder whose fingerprint differs from ``fingerprint``.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        encoder: Any | None = None,
        *,
        fingerprint: str | None = None,
        dtype: str = "float32",
        shard_size: int = 4096,
    ):
        if encoder is None and not fingerprint:
            raise TextCacheError("a text-embedding cache needs the encoder or its fingerprint")
        if encoder is not None and fingerprint and encoder.fingerprint != fingerprint:
            raise TextCacheError(
                f"the encoder's fingerprint {encoder.fingerprint[:16]}... differs from the one asked for "
                f"({fingerprint[:16]}...): it is a different encoder (weights, tokenizer, max_length or dtype)"
            )
        if dtype not in _DTYPES:
            raise TextCacheError(f"cache dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.encoder = encoder
        self.fingerprint = str(encoder.fingerprint if encoder is not None else fingerprint)
        self.dtype = _DTYPES[dtype]
        self.shard_size = max(1, int(shard_size))
        self.root = Path(directory).expanduser()
        self.path = self.root / self.fingerprint[:16]
        meta_path = self.path / _META
        if meta_path.is_file():
            meta = read_json(meta_path)
            if meta.get("fingerprint") != self.fingerprint:
                raise TextCacheError(f"{meta_path} belongs to another encoder (fingerprint {meta.get('fingerprint')})")
        elif encoder is None:
            raise TextCacheError(
                f"no caption-embedding cache for encoder {self.fingerprint[:16]}... in {str(self.root)!r}; "
                "precompute it with the encoder (TextEmbeddingCache(DIR, encoder).precompute(captions))"
            )
        else:
            info = dict(encoder.info()) if hasattr(encoder, "info") else {}
            meta = {"format": TEXT_CACHE_FORMAT, **info, "fingerprint": self.fingerprint, "dim": int(encoder.dim)}
            write_json_atomic(meta_path, meta)
        self.meta: dict[str, Any] = meta
        self.dim = int(meta["dim"])
        self._index: dict[str, Path] = {}
        self._handles: dict[Path, Any] = {}
        self._pending: dict[str, Tensor] = {}
        self._seen: set[Path] = set()
        self.refresh()

    # ---- the index ----------------------------------------------------------------------------

    def refresh(self) -> int:
        """Read the keys of shards not seen yet (written since, e.g. by other ranks); returns their count."""
        added = 0
        for shard in sorted(self.path.glob("shard-*.safetensors")):
            if shard in self._seen:
                continue
            try:
                with safe_open(str(shard), "pt") as f:
                    keys = list(f.keys())
            except Exception as err:  # a foreign or damaged file: say which
                raise TextCacheError(f"cannot read the cache shard {shard}: {err}") from None
            self._seen.add(shard)
            for k in keys:
                if k not in self._index:
                    self._index[k] = shard
                    added += 1
        return added

    def key(self, caption: str) -> str:
        return caption_key(self.fingerprint, caption)

    def __len__(self) -> int:
        return len(self._index) + len(self._pending)

    def __contains__(self, caption: object) -> bool:
        if not isinstance(caption, str):
            return False
        k = self.key(caption)
        return k in self._index or k in self._pending

    def missing(self, captions: Iterable[str]) -> list[str]:
        """The distinct captions not in the cache, in first-seen order."""
        out, seen = [], set()
        for c in captions:
            if not isinstance(c, str):
                raise TextCacheError(f"captions must be strings, got a {type(c).__name__}: {c!r}")
            if c not in seen:
                seen.add(c)
                if c not in self:
                    out.append(c)
        return out

    # ---- writing ------------------------------------------------------------------------------

    def _need_encoder(self, what: str) -> Any:
        if self.encoder is None:
            raise TextCacheError(
                f"{what} is not in the caption-embedding cache {str(self.path)!r} and no encoder was given "
                "to compute it; precompute the data set's captions first"
            )
        return self.encoder

    def _encode_into_pending(self, captions: Sequence[str], batch_size: int) -> None:
        encoder = self._need_encoder(f"caption {captions[0]!r}" if captions else "a caption")
        for s in range(0, len(captions), batch_size):
            chunk = list(captions[s : s + batch_size])
            emb = encoder(chunk)
            tokens, mask = emb.tokens.detach().cpu(), emb.mask.cpu()
            for i, c in enumerate(chunk):
                self._pending[self.key(c)] = tokens[i][mask[i]].to(self.dtype).contiguous()
            if len(self._pending) >= self.shard_size:
                self.flush()

    def flush(self) -> Path | None:
        """Write the entries computed since the last flush to a new shard; returns its path."""
        if not self._pending:
            return None
        name = f"shard-{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.safetensors"
        shard = self.path / name
        tensors = dict(self._pending)
        meta = {"format": TEXT_CACHE_FORMAT, "fingerprint": self.fingerprint}
        atomic_write(shard, lambda tmp: save_file(tensors, tmp, metadata=meta))
        self._seen.add(shard)
        for k in tensors:
            self._index.setdefault(k, shard)
        self._pending.clear()
        return shard

    def precompute(self, captions: Iterable[str], batch_size: int = 64, rank: int = 0, world_size: int = 1) -> int:
        """Encode every distinct caption not cached yet (and the empty caption, the null value).

        With ``world_size > 1`` rank ``r`` encodes the missing captions ``r, r + W, ...`` (every
        rank must pass the same list); call :meth:`refresh` after a barrier to see the others'.

        Returns:
            the number of captions this process encoded.
        """
        if not 0 <= int(rank) < int(world_size):
            raise TextCacheError(f"rank {rank} is not in [0, world_size={world_size})")
        todo = self.missing(["", *captions])[int(rank) :: int(world_size)]
        if todo:
            self._encode_into_pending(todo, max(1, int(batch_size)))
            self.flush()
        return len(todo)

    # ---- reading ------------------------------------------------------------------------------

    def _read(self, key: str) -> Tensor:
        if key in self._pending:
            return self._pending[key]
        shard = self._index[key]
        handle = self._handles.get(shard)
        if handle is None:
            handle = self._handles[shard] = safe_open(str(shard), "pt")
        return handle.get_tensor(key)

    def get(self, caption: str) -> Tensor:
        """The states of one caption, ``(L_i, D)`` float32 (computed and cached when missing and an
        encoder is at hand)."""
        if caption not in self:
            self._encode_into_pending([caption], 1)
        return self._read(self.key(caption)).float()

    def lookup(self, captions: Sequence[str], device: torch.device | str | None = None) -> TextEmbeddings:
        """The :class:`TextEmbeddings` of ``B`` captions, padded to the longest of the batch.

        Captions not cached are encoded (when the cache has an encoder; they are written at the
        next :meth:`flush` or when a shard's worth has gathered) -- else :class:`TextCacheError`.

        Returns:
            ``tokens`` ``(B, L, D)`` float32 (zero at padding), ``mask`` ``(B, L)`` bool, null: the
            empty caption's states; on ``device`` (default CPU).
        """
        captions = list(captions)
        missing = self.missing(["", *captions])
        if missing:
            self._need_encoder(f"caption {missing[0]!r} ({len(missing)} missing)")
            self._encode_into_pending(missing, 64)
        rows = {c: self._read(self.key(c)).float() for c in dict.fromkeys(captions)}
        null = self._read(self.key("")).float()
        length = max((rows[c].shape[0] for c in captions), default=0)
        tokens = torch.zeros(len(captions), length, self.dim)
        mask = torch.zeros(len(captions), length, dtype=torch.bool)
        for i, c in enumerate(captions):
            n = rows[c].shape[0]
            tokens[i, :n] = rows[c]
            mask[i, :n] = True
        emb = TextEmbeddings(tokens, mask, null, torch.ones(null.shape[0], dtype=torch.bool))
        return emb if device is None else emb.to(device)

    def __getstate__(self) -> dict[str, Any]:  # open shard handles do not pickle (DataLoader workers)
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def close(self) -> None:
        """Write pending entries and drop open shard handles."""
        self.flush()
        self._handles.clear()

    def __enter__(self) -> TextEmbeddingCache:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TextEmbeddingCache({str(self.path)!r}, entries={len(self)}, dim={self.dim})"
