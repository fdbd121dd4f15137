"""The order in which training examples are visited: a function of (seed, epoch, position) only.

The global sample stream is ``perm_e[j]`` for epoch ``e`` (a seeded permutation; the last
incomplete global batch of an epoch is dropped). Optimiser step ``k`` consumes global positions
``[k * G, (k + 1) * G)`` with ``G`` the global batch; micro-batch ``m`` of rank ``r`` takes the
slice ``k * G + (m * world + r) * b + [0, b)`` with ``b = G / (world * accum)``. The position in
the data is therefore the step itself, and a resumed run -- on any number of processes -- visits
exactly the same examples in the same steps.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, Sampler

__all__ = ["StepBatchSampler", "EpochIndexed", "micro_batch_size"]


def micro_batch_size(global_batch: int, world_size: int, grad_accum: int) -> int:
    """Per-rank micro-batch ``b = G / (world * accum)``; raises if it does not divide."""
    denom = world_size * grad_accum
    if global_batch % denom:
        raise ValueError(
            f"global batch {global_batch} is not divisible by world_size x grad_accum = {world_size} x {grad_accum}"
        )
    return global_batch // denom


class StepBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields this rank's micro-batches as lists of ``(epoch, index)`` pairs, from ``start_step``.

    Args:
        num_items: data set length.
        global_batch: ``G`` over all ranks and accumulation steps.
        world_size, rank: the process group.
        grad_accum: micro-batches per optimiser step.
        seed: data-order seed.
        start_step, max_steps: the optimiser steps to cover.
    """

    def __init__(
        self,
        num_items: int,
        global_batch: int,
        world_size: int,
        rank: int,
        grad_accum: int,
        seed: int,
        start_step: int,
        max_steps: int,
    ):
        self.local = micro_batch_size(global_batch, world_size, grad_accum)
        if num_items < global_batch:
            raise ValueError(f"the data set has {num_items} items, fewer than one global batch ({global_batch})")
        self.num_items = num_items
        self.global_batch = global_batch
        self.world_size = world_size
        self.rank = rank
        self.grad_accum = grad_accum
        self.seed = seed
        self.start_step = start_step
        self.max_steps = max_steps
        self.epoch_len = num_items // global_batch * global_batch
        self._perm_epoch = -1
        self._perm: torch.Tensor | None = None

    def permutation(self, epoch: int) -> torch.Tensor:
        """The visiting order of epoch ``epoch`` (``(num_items,)`` long)."""
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.num_items, generator=g)
            self._perm_epoch = epoch
        return self._perm

    def micro_batch(self, step: int, micro: int) -> list[tuple[int, int]]:
        """``(epoch, index)`` pairs of micro-batch ``micro`` of optimiser step ``step`` on this rank."""
        start = step * self.global_batch + (micro * self.world_size + self.rank) * self.local
        out = []
        for pos in range(start, start + self.local):
            epoch, j = divmod(pos, self.epoch_len)
            out.append((epoch, int(self.permutation(epoch)[j])))
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start_step, self.max_steps):
            for micro in range(self.grad_accum):
                yield self.micro_batch(step, micro)

    def __len__(self) -> int:
        return max(0, self.max_steps - self.start_step) * self.grad_accum


class EpochIndexed(Dataset):
    """Wraps a data set so that items are addressed by ``(epoch, index)``.

    The epoch reaches ``dataset.set_epoch`` (per-epoch augmentation such as flips) inside
    DataLoader workers too, without any state shared between processes.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        return self.dataset[index]
