"""Process-group helpers for torchrun (NCCL on GPU, gloo on CPU, device from LOCAL_RANK) and the
opt-in FSDP2 strategy (``train.strategy: fsdp``).

FSDP (torch's FSDP2, :func:`torch.distributed.fsdp.fully_shard`): every transformer block (each
child of the model's ``nn.ModuleList`` s, see :func:`fsdp_units`) and then the root are sharded
over all ranks, so each rank holds ``1 / world_size`` of the weights, gradients and AdamW state.
The helpers below keep checkpoints in today's single-file format: :func:`full_model_state` and
:func:`full_optimizer_state` gather full (unsharded) state dicts to rank 0 on the CPU, and
:func:`loadable` / :func:`load_optimizer_state` load such full dicts back into sharded modules.
They are collectives under FSDP (every rank must call them) and plain ``state_dict`` /
``load_state_dict`` otherwise, so callers need no branch. Works on CPU with gloo (tested with two
processes in ``tests/test_fsdp.py``) and on CUDA with NCCL.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from ..utils.devices import resolve_device, torchrun_env

__all__ = [
    "DistEnv",
    "init_distributed",
    "shutdown_distributed",
    "all_reduce_mean",
    "any_rank",
    "STRATEGIES",
    "fsdp_units",
    "shard_model",
    "is_sharded",
    "full_model_state",
    "full_optimizer_state",
    "loadable",
    "load_optimizer_state",
    "local_value",
]

#: allowed ``train.strategy`` values: ``ddp`` (default; replicated weights) or ``fsdp`` (FSDP2)
STRATEGIES: tuple[str, ...] = ("ddp", "fsdp")


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


# --------------------------------------------------------------------------------------------
# FSDP2
# --------------------------------------------------------------------------------------------


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules sharded one by one (each its own all-gather unit): ``model.fsdp_units()`` if the
    model defines it, else the children of every ``nn.ModuleList`` attribute of the model itself
    (the transformer blocks, a text refiner's blocks), in module order. Lists nested deeper (e.g.
    the layers of a small mapping network) stay with the root, whose parameters are gathered once
    per forward."""
    custom = getattr(model, "fsdp_units", None)
    if callable(custom):
        return list(custom())
    return [block for child in model.children() if isinstance(child, nn.ModuleList) for block in child]


def shard_model(model: nn.Module, env: DistEnv, precision: str = "fp32", training: bool = True) -> nn.Module:
    """Shard ``model`` in place with FSDP2 over all ``env.world_size`` ranks: each of
    :func:`fsdp_units`, then the root (the embeddings, final layer and anything else left).

    The model may live on the CPU: ``fully_shard`` moves each rank's shards to ``env.device``,
    one unit at a time, so the full model never has to fit the device. ``precision="bf16"``: the
    mixed-precision policy all-gathers and computes in bf16 and reduce-scatters gradients in
    fp32, the sharded master weights (what the optimiser, the EMA and checkpoints see) stay fp32.
    Inputs are not cast (``cast_forward_inputs=False``: the per-patch times keep fp32 precision;
    the trainer's bf16 autocast handles the matmuls). ``training``: the root keeps its gathered
    parameters from the forward to the backward (they are resharded after the backward). Pass
    ``training=False`` for a forward-only copy such as the EMA, whose weights change between
    forwards without a backward: its root then reshards after every forward, so no forward sees
    stale gathered weights. Returns ``model`` (now an ``FSDPModule``).
    """
    if not env.distributed:
        raise ValueError("train.strategy=fsdp needs more than one process (launch with torchrun)")
    mesh = init_device_mesh(env.device.type, (env.world_size,))
    if precision == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
    else:
        policy = MixedPrecisionPolicy(cast_forward_inputs=False)
    for unit in fsdp_units(model):
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=not training)
    return model


def is_sharded(module: Any) -> bool:
    """Whether ``module`` was sharded by :func:`shard_model` (an FSDP2 module)."""
    return isinstance(module, FSDPModule)


_FULL_CPU = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` in today's checkpoint layout (full tensors, plain keys).

    Sharded (collective: call on every rank): gathered to rank 0 on the CPU; other ranks get ``{}``.
    """
    if not is_sharded(model):
        return model.state_dict()
    return get_model_state_dict(model, options=_FULL_CPU)


def _optimizer_param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names (in ``model``) of the parameters ``optimizer`` holds, in the index order of
    ``optimizer.state_dict()`` (its param groups, flattened)."""
    names = {id(p): n for n, p in model.named_parameters()}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    missing = sum(id(p) not in names for p in params)
    if missing:
        raise ValueError(f"the optimizer holds {missing} parameters that are not the model's")
    return [names[id(p)] for p in params]


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` in today's layout (parameters by index into the optimiser's
    list, full tensors), for an optimiser over (some of) ``model``'s parameters.

    Sharded (collective): gathered to rank 0 on the CPU and re-keyed from parameter names to
    indices, so a checkpoint of an FSDP run resumes under DDP and vice versa; other ranks get ``{}``.
    """
    if not is_sharded(model):
        return optimizer.state_dict()
    osd = get_optimizer_state_dict(model, optimizer, options=_FULL_CPU)
    if not osd or not osd.get("param_groups"):
        return {}
    index = {n: i for i, n in enumerate(_optimizer_param_names(model, optimizer))}
    return {
        "state": {index[n]: v for n, v in osd["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in osd["param_groups"]],
    }


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
    """Inverse of :func:`full_optimizer_state` (collective when sharded: every rank passes the
    full dict). Raises ``ValueError``/``KeyError`` when the state does not fit the optimiser."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    names = _optimizer_param_names(model, optimizer)

    def name(i: Any) -> str:
        if not isinstance(i, int) or not 0 <= i < len(names):
            raise ValueError(f"optimizer state names parameter {i!r}; the optimizer holds {len(names)}")
        return names[i]

    groups = list(state["param_groups"])
    if sum(len(g["params"]) for g in groups) != len(names):
        raise ValueError(
            f"optimizer state covers {sum(len(g['params']) for g in groups)} parameters; the optimizer holds {len(names)}"
        )
    osd = {
        "state": {name(i): v for i, v in state["state"].items()},
        "param_groups": [{**g, "params": [name(i) for i in g["params"]]} for g in groups],
    }
    set_optimizer_state_dict(model, optimizer, osd, options=StateDictOptions(full_state_dict=True))


class _FullStateLoader:
    """``state_dict()`` / ``load_state_dict(sd, strict)`` of a sharded module in full-tensor
    terms (the keys and global shapes of :func:`full_model_state`), so
    :func:`patchforcing.checkpoints.load_state_dict_strict` checks and loads it as usual."""

    def __init__(self, module: nn.Module):
        self.module = module

    def state_dict(self) -> dict[str, Tensor]:
        return self.module.state_dict()  # DTensors: their .shape is the global (full) shape

    def load_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True) -> None:
        set_model_state_dict(
            self.module, dict(state_dict), options=StateDictOptions(full_state_dict=True, strict=strict)
        )


def loadable(module: nn.Module) -> Any:
    """``module`` itself, or for a sharded one an adapter whose ``load_state_dict`` takes a full
    state dict (collective: every rank loads the same full dict, each keeps its shard)."""
    return _FullStateLoader(module) if is_sharded(module) else module


def local_value(t: Tensor) -> Tensor:
    """A plain tensor of ``t``'s full value (a replicated/sharded ``DTensor`` -> its full tensor;
    a plain tensor unchanged), e.g. the gradient norm ``clip_grad_norm_`` returns under FSDP."""
    return t.full_tensor() if isinstance(t, DTensor) else t
