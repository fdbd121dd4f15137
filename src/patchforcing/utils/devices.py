"""Devices and torchrun's process environment, resolved once with clear errors."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "DeviceError",
    "TorchrunEnv",
    "torchrun_env",
    "resolve_device",
    "module_device",
    "cpu_has_native_bf16",
    "auto_precision",
]

#: CPU flags (``/proc/cpuinfo``) of native bf16 matrix units: Intel AMX, AVX-512 BF16 (Intel, AMD Zen 4+)
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


class DeviceError(ValueError):
    """A device name that does not parse, or names hardware this machine does not have."""


@dataclass(frozen=True)
class TorchrunEnv:
    """What torchrun says about this process (a plain process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1


def torchrun_env() -> TorchrunEnv:
    """Read ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` (defaults: one process)."""

    def get(name: str, default: int) -> int:
        raw = os.environ.get(name, "").strip()
        if not raw:
            return default
        try:
            return int(raw)
        except ValueError:
            raise DeviceError(f"environment variable {name}={raw!r} is not an integer") from None

    world = get("WORLD_SIZE", 1)
    return TorchrunEnv(
        rank=get("RANK", 0),
        world_size=world,
        local_rank=get("LOCAL_RANK", 0),
        local_world_size=get("LOCAL_WORLD_SIZE", world),
    )


def resolve_device(pref: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    """``"auto"``: this process's GPU (``cuda:LOCAL_RANK``) if CUDA is available, else the CPU;
    ``"cuda"`` without an index: ``cuda:local_rank``; otherwise the named device.

    Raises:
        DeviceError: an unparsable name (``"bogus"``) or CUDA/MPS requested where it is absent.
    """
    if str(pref) == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(pref)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(f"unknown device {str(pref)!r} (use auto, cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {str(pref)!r} requested but CUDA is not available on this machine (use cpu or auto)"
            )
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
        elif dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {str(pref)!r} requested but only {torch.cuda.device_count()} GPU(s) are visible")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise DeviceError(f"device {str(pref)!r} requested but MPS is not available on this machine")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"unsupported device {str(pref)!r} (use auto, cpu, cuda, cuda:N or mps)")
    return dev


def module_device(model: nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (the CPU for a module with neither)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies bf16 natively (AMX or AVX-512 BF16 in ``/proc/cpuinfo``'s flags).

    Without such units torch emulates bf16 matmuls on the CPU, several times slower than fp32
    (see benchmarks/RESULTS.md). ``cpuinfo``: the text to read instead of ``/proc/cpuinfo``.
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:  # not Linux: do not guess
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


def auto_precision(device: torch.device, cpuinfo: str | None = None) -> str:
    """``"bf16"`` on CUDA and on CPUs with native bf16 units, ``"fp32"`` elsewhere."""
    if device.type == "cuda":
        return "bf16"
    if device.type == "cpu" and cpu_has_native_bf16(cpuinfo):
        return "bf16"
    return "fp32"
