"""Deterministic per-item augmentation: ``hash(seed, epoch, index)`` instead of a shared RNG.

A data set that draws its augmentation from a hash of ``(seed, epoch, index)`` gives the same item
in every process (DataLoader workers, DDP ranks) and on every rerun, with no RNG state to carry.
The hash itself is :func:`patchforcing.utils.seeding.item_hash` (re-exported here).
"""

from __future__ import annotations

from ..utils.seeding import item_hash

__all__ = ["item_hash", "hflip_flag"]

_FLIP_SALT = 0x5F1A_9E37_0000_0001


def hflip_flag(seed: int, epoch: int, index: int) -> bool:
    """Whether item ``index`` is mirrored in ``epoch`` for ``seed``: a fair coin, fixed per triple."""
    return bool(item_hash(_FLIP_SALT, seed, epoch, index) >> 63)
