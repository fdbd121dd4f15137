"""Speed options of the training step, resolved from the config: the attention kernel
(``train.attention``) and AdamW's fused kernel (``optim.fused``).

The ``auto`` choices follow measurements (``benchmarks/train_speed.py``; ``benchmarks/RESULTS.md``):

* attention, on an "Intel(R) Xeon(R) Processor" with AMX-BF16 and AVX512-BF16 (1 thread, torch
  2.13, PFT-T/4 shapes: batch 64, 3 heads, 64 tokens of width 64): forward + backward of SDPA took
  36 ms in bf16 against 10.5 ms for the explicit matmul-softmax (``"math"``, 3.4x faster), while in
  fp32 SDPA was the faster (13 ms against 17.5 ms). So ``auto`` is ``math`` for bf16 on a CPU and
  ``sdpa`` for fp32 (whose numerics stay as they were) and on GPUs (where SDPA's flash and
  memory-efficient kernels are the fast path; not measured here). On a CPU without bf16 units
  ``train.precision: auto`` trains in fp32, hence with SDPA.
* AdamW on the same CPU (1 thread): the fused step took 4.4 ms against 12.3 ms for the default
  multi-tensor (``foreach``) step on PFT-T/4's 4.2 M parameters, 37 ms against 126 ms on PFT-S/2's
  33 M; the two agree to float32 rounding (``tests/test_training_speed_options.py``), and FSDP2's
  sharded parameters take the fused step too (``tests/test_fsdp.py``). PyTorch documents the fused
  kernel as its fastest on CUDA. So ``auto`` is fused on CPU and CUDA.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..models.attention import ATTENTION_KERNELS

__all__ = ["FUSED_ADAMW_DEVICES", "resolve_attention_kernel", "resolve_fused", "build_adamw"]

#: device types on which ``optim.fused: auto`` picks AdamW's fused kernel
FUSED_ADAMW_DEVICES: tuple[str, ...] = ("cpu", "cuda")


def resolve_attention_kernel(choice: str, precision: str, device: torch.device) -> str:
    """The attention kernel of ``train.attention = choice`` for a run in ``precision`` (``fp32`` or
    ``bf16``, already resolved) on ``device``: ``sdpa`` or ``math`` as given; ``auto`` = ``math``
    for bf16 on a CPU, ``sdpa`` otherwise (see the module docstring for the measurements).

    Raises:
        ValueError: an unknown choice.
    """
    if choice == "auto":
        return "math" if precision == "bf16" and torch.device(device).type == "cpu" else "sdpa"
    if choice not in ATTENTION_KERNELS:
        raise ValueError(f"train.attention must be one of auto, {', '.join(ATTENTION_KERNELS)}; got {choice!r}")
    return choice


def resolve_fused(choice: bool | str, device: torch.device) -> bool:
    """Whether AdamW uses its fused kernel for ``optim.fused = choice``: ``true``/``false`` (bools or
    their text, any case) as given; ``auto`` = on the devices of :data:`FUSED_ADAMW_DEVICES`.

    Raises:
        ValueError: an unknown choice.
    """
    if isinstance(choice, bool):
        return choice
    text = str(choice).lower()
    if text == "auto":
        return torch.device(device).type in FUSED_ADAMW_DEVICES
    if text in ("true", "false"):
        return text == "true"
    raise ValueError(f"optim.fused must be one of auto, true, false; got {choice!r}")


def build_adamw(
    params: Iterable[nn.Parameter],
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    fused: bool,
) -> torch.optim.AdamW:
    """AdamW with the fused kernel (``fused=True``; torch has it for CPU, CUDA, MPS and XPU tensors
    and checks at the first step) or torch's default otherwise (the multi-tensor ``foreach`` kernel
    where available)."""
    return torch.optim.AdamW(
        list(params), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True if fused else None
    )
