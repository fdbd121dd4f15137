"""Process-group helpers for torchrun: NCCL on GPU, gloo on CPU, device from LOCAL_RANK."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..utils.devices import resolve_device, torchrun_env

__all__ = ["DistEnv", "init_distributed", "shutdown_distributed", "all_reduce_mean", "any_rank"]


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: ``rank`` of ``world_size``, ``local_rank`` on its node, its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistEnv:
    """Read torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and join the group.

    Without those variables (a plain ``patchforcing train``), a single process on ``device``.
    Multi-node safe: the device index comes from ``LOCAL_RANK``, never from ``RANK``.

    Raises:
        DeviceError: ``device`` does not parse or names hardware this machine lacks, or a
            torchrun variable is not an integer (:func:`patchforcing.utils.devices.resolve_device`).
    """
    te = torchrun_env()
    world, rank, local_rank = te.world_size, te.rank, te.local_rank
    dev = resolve_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, **kwargs)
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def shutdown_distributed() -> None:
    """Leave the process group (call after freeing DDP models: gloo may abort otherwise)."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def all_reduce_mean(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Mean of a tensor over ranks (identity in a single process)."""
    if not env.distributed:
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / env.world_size


def any_rank(flag: bool, env: DistEnv) -> bool:
    """True on every rank if ``flag`` is true on any rank (e.g. a stop request)."""
    if not env.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
