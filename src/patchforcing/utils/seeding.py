"""Deterministic per-item randomness: a hash of integer keys instead of a shared RNG.

Anything drawn from ``hashed_generator(salt, seed, index)`` is the same in every process (DataLoader
workers, DDP ranks), for any batch composition and on every rerun, with no RNG state to carry.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["item_hash", "hashed_generator", "indexed_randn"]

_MASK64 = (1 << 64) - 1
_MASK63 = (1 << 63) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def item_hash(*keys: int) -> int:
    """A well-mixed 64-bit hash of a sequence of integers (negative ones allowed); order matters."""
    h = 0
    for k in keys:
        h = _splitmix64(h ^ (int(k) & _MASK64))
    return h


def hashed_generator(*keys: int, bits: int = 64) -> torch.Generator:
    """A CPU generator seeded by ``item_hash(*keys)`` (its low 63 bits when ``bits=63``)."""
    h = item_hash(*keys)
    if bits == 63:
        h &= _MASK63
    elif bits != 64:
        raise ValueError(f"bits must be 63 or 64, got {bits}")
    return torch.Generator().manual_seed(h)


def indexed_randn(salt: int, seed: int, indices: Sequence[int], shape: Sequence[int]) -> Tensor:
    """``(len(indices), *shape)`` float32 standard normal noise; row ``k`` depends only on
    ``(salt, seed, indices[k])``, so a sample's noise is the same in any batch or process."""
    out = torch.empty(len(indices), *shape)
    for k, i in enumerate(indices):
        out[k] = torch.randn(*shape, generator=hashed_generator(salt, int(seed), int(i)))
    return out
