"""Deterministic per-item randomness: ``hash(seed, epoch, index)`` instead of a shared RNG.

A data set that draws its augmentation from a hash of ``(seed, epoch, index)`` gives the same item
in every process (DataLoader workers, DDP ranks) and on every rerun, with no RNG state to carry.
"""

from __future__ import annotations

__all__ = ["item_hash", "hflip_flag"]

_MASK64 = (1 << 64) - 1
_FLIP_SALT = 0x5F1A_9E37_0000_0001


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


def hflip_flag(seed: int, epoch: int, index: int) -> bool:
    """Whether item ``index`` is mirrored in ``epoch`` for ``seed``: a fair coin, fixed per triple."""
    return bool(item_hash(_FLIP_SALT, seed, epoch, index) >> 63)
