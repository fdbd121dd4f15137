"""The attention kernel of the networks, chosen at run time (not part of the weights or the config
of a model): PyTorch's fused ``scaled_dot_product_attention`` (``"sdpa"``, the default) or the
same computation written as two matmuls and a softmax (``"math"``).

Both compute ``softmax(q k^T / sqrt(hd) + mask) v``. ``"math"`` forms the ``(B, heads, N, L)``
score matrix explicitly and takes the softmax in float32 whatever the inputs' dtype (under bf16
autocast the two matmuls run in bf16, the softmax in fp32, its output is cast back to bf16 for the
second matmul). It exists for speed: on CPUs, SDPA's fused kernel has a slow bf16 backward for the
short sequences of the small models (``benchmarks/train_speed.py``); in fp32 the two agree to
float32 rounding (``tests/test_training_speed_options.py``), but are not bit-identical, so
sampling and fp32 training keep ``"sdpa"``.

The kernel is a plain attribute of each attention module (``attention_kernel``; absent = ``"sdpa"``):
:func:`set_attention_kernel` sets it for a whole network. Copies of a network (``copy.deepcopy``,
the EMA) keep the attribute; ``state_dict`` and checkpoints never hold it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ATTENTION_KERNELS", "attention", "attention_kernel_of", "attention_kernel_scope", "set_attention_kernel"]

#: the kernels :func:`attention` offers
ATTENTION_KERNELS: tuple[str, ...] = ("sdpa", "math")
#: the module attribute naming a module's kernel
_ATTR = "attention_kernel"


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, kernel: str = "sdpa") -> Tensor:
    """``softmax(q k^T / sqrt(hd) + mask) v`` with the chosen kernel.

    Args:
        q: ``(B, heads, N, hd)`` queries.
        k: ``(B, heads, L, hd)`` keys.
        v: ``(B, heads, L, hd_v)`` values.
        attn_mask: ``None`` or a bool mask broadcastable to ``(B, heads, N, L)`` (True = attend), as
            SDPA takes it; every query row must keep at least one key (otherwise the row is NaN, with
            either kernel).
        kernel: ``"sdpa"`` (``F.scaled_dot_product_attention``) or ``"math"`` (explicit matmuls,
            softmax in float32).
    Returns:
        ``(B, heads, N, hd_v)`` in the dtype SDPA would return (the inputs', or autocast's).
    """
    if kernel == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    if kernel != "math":
        raise ValueError(f"unknown attention kernel {kernel!r}; choose one of {', '.join(ATTENTION_KERNELS)}")
    scores = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)  # (B, heads, N, L)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)
    return torch.matmul(weights, v)


def attention_kernel_of(module: nn.Module) -> str:
    """The kernel an attention module uses: its ``attention_kernel`` attribute, ``"sdpa"`` if unset."""
    return getattr(module, _ATTR, "sdpa")


def _attention_module_types() -> tuple[type, ...]:
    from .t2i import CrossAttention, SelfAttention  # (lazy: those modules import this one)
    from .transformer import Attention

    return (Attention, SelfAttention, CrossAttention)


def set_attention_kernel(model: nn.Module, kernel: str) -> int:
    """Make every attention layer of ``model`` (PFT/SiT self-attention; T2I self- and cross-attention,
    text refiner included) use ``kernel``. Returns how many layers were set.

    Raises:
        ValueError: an unknown kernel name.
    """
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"unknown attention kernel {kernel!r}; choose one of {', '.join(ATTENTION_KERNELS)}")
    types = _attention_module_types()
    n = 0
    for m in model.modules():
        if isinstance(m, types):
            setattr(m, _ATTR, kernel)
            n += 1
    return n


@contextmanager
def attention_kernel_scope(model: nn.Module, kernel: str) -> Iterator[nn.Module]:
    """``with attention_kernel_scope(model, "math"):`` every attention layer of ``model`` uses
    ``kernel`` inside the block; afterwards each layer has its own previous kernel again (also
    when the block raises).

    Raises:
        ValueError: an unknown kernel name (before anything is changed).
    """
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"unknown attention kernel {kernel!r}; choose one of {', '.join(ATTENTION_KERNELS)}")
    types = _attention_module_types()
    layers = [m for m in model.modules() if isinstance(m, types)]
    before = [(m, m.__dict__.get(_ATTR)) for m in layers]
    for m in layers:
        setattr(m, _ATTR, kernel)
    try:
        yield model
    finally:
        for m, old in before:
            if old is None:
                m.__dict__.pop(_ATTR, None)
            else:
                setattr(m, _ATTR, old)
