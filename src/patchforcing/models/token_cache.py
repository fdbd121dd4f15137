"""Token caching, model side: the key/value store of a full call, and FLOP counts from shapes.

The networks (:class:`~.transformer.PatchForcingTransformer`, :class:`~.t2i.TextToImageTransformer`)
offer ``forward_cached(x, t, cond, store=KVStore(), idx=None)``:

* ``idx=None`` -- a **full call**: the ordinary forward (the same numbers, bit for bit), which also
  records, per block, the self-attention keys and values of every image token into ``store``
  (after QK-norm and RoPE for the T2I model). Returns the token outputs ``(B, N, p * p * K)``.
* ``idx`` ``(B, n)`` long -- a **partial call** on the active tokens only: patch embedding,
  conditioning, every block (fresh ``q, k, v`` of the active tokens; their attention reads the
  stored ``k, v`` of the last full call with the active positions replaced by the fresh ones;
  T2I cross-attention and the MLP for the active tokens only) and the final layer. Returns the
  outputs of the active tokens ``(B, n, p * p * K)`` in the order of ``idx``.

The keys are replaced by a *scatter into a copy* of the stored ``(B, heads, N, hd)`` tensor rather
than a concatenation ``[stored inactive, fresh active]``: the key order stays the token order, so a
partial call with every token active attends over exactly the keys of a full call (in the same
order), no mask is needed to hide the stale copies of the active positions, and the store itself
is never modified (every partial call after a refresh reads the same full-call keys). The copy
moves ``2 B N D`` numbers per block, against ``~12 B n D^2`` multiply-adds of the block's matmuls.

The model knows nothing of samplers; which tokens are active, and when to refresh, is the
sampling side's policy (:mod:`patchforcing.sampling.cache`).

FLOPs (:func:`forward_flops`) are matmul FLOPs, ``2 x`` multiply-adds, counted from shapes:
patch embedding, the time (mapping) embedding, every adaptive-norm modulation, self-attention
(qkv, the score matrix ``q k^T``, the weighted sum of values, output projection), cross-attention
of the T2I model (q, the text K/V projection, scores, weighted sum, output projection), the text
refiner, the MLP and the final linear. Elementwise work (norms, softmax, activations, RoPE,
gather/scatter) is not counted. Layers that the implementation evaluates on at least
:data:`~.transformer.MIN_ROWS` rows (the batch-invariance padding of per-conditioning layers, and of
every linear of the T2I model) are counted with the padded rows, i.e. as evaluated. The
conditioning layers are counted for **one conditioning vector per image and call** -- what a call
evaluates when each image's patches share one time (Euler calls, the first call of every step) and
what keeps a run's count a deterministic function of its call pattern. Calls with several times
per image (dual-loop inner calls, look-ahead context calls) evaluate one vector per distinct
(time, label) pair instead (2 per image for those samplers); the difference is at most
``(U - B) * depth * 6 D^2`` multiply-adds, under 1 % of a call at ``N >= 64`` tokens.
With the attention kernel ``"math"`` the count equals ``torch.utils.flop_counter.FlopCounterMode``'s
for a dense forward; with ``"sdpa"`` on the CPU the counter misses the attention matmuls (it has no
formula for the CPU flash kernel).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "KVStore",
    "KVLayer",
    "check_active_index",
    "gather_tokens",
    "patches_of",
    "unpatchify",
    "text_length",
    "forward_flops",
    "FlopBreakdown",
]

#: rows below which the per-conditioning layers are padded (the models' ``MIN_ROWS``; kept equal by a test)
_MIN_ROWS = 32


# --------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------


@dataclass
class KVStore:
    """Self-attention keys and values of every image token, per block, from the last full call.

    Attributes:
        keys, values: block index -> ``(B, heads, N, hd)`` (the T2I model's keys after QK-norm and RoPE).

    Size: ``2 * B * N * D * depth`` numbers (PFT-B/2, 256 tokens, fp32: 19 MB per image row; a
    guided call has two rows per image).
    """

    keys: dict[int, Tensor] = field(default_factory=dict)
    values: dict[int, Tensor] = field(default_factory=dict)

    def layer(self, index: int, idx: Tensor | None) -> KVLayer:
        """The view block ``index`` uses: records (``idx is None``) or reads (``idx`` ``(B, n)``)."""
        return KVLayer(self, index, idx)

    def clear(self) -> None:
        self.keys.clear()
        self.values.clear()

    @property
    def batch_size(self) -> int | None:
        """Rows of the recorded call (``None`` before any)."""
        return next(iter(self.keys.values())).shape[0] if self.keys else None

    @property
    def num_tokens(self) -> int | None:
        """Image tokens ``N`` of the recorded call (``None`` before any)."""
        return next(iter(self.keys.values())).shape[2] if self.keys else None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.keys, self.values) for t in d.values())


@dataclass
class KVLayer:
    """One block's access to a :class:`KVStore`; called by the attention as ``k, v = kv(k, v)``.

    Full call (``idx is None``): stores ``k, v`` ``(B, heads, N, hd)`` and returns them unchanged.
    Partial call: ``k, v`` are the active tokens' ``(B, heads, n, hd)``; returns the stored
    ``(B, heads, N, hd)`` with positions ``idx`` replaced by them (a copy; the store is unchanged).
    """

    store: KVStore
    index: int
    idx: Tensor | None

    def __call__(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.idx is None:  # (contiguous copies: the views would keep the whole qkv buffer, q included, alive)
            self.store.keys[self.index], self.store.values[self.index] = k.contiguous(), v.contiguous()
            return k, v
        old_k, old_v = self.store.keys.get(self.index), self.store.values.get(self.index)
        if old_k is None or old_v is None:
            raise ValueError(f"partial call: the KV store holds no keys for block {self.index}; make a full call first")
        if old_k.shape[0] != k.shape[0] or old_k.shape[1] != k.shape[1] or old_k.shape[3] != k.shape[3]:
            raise ValueError(
                f"partial call: the KV store was recorded for keys of shape {tuple(old_k.shape)}, this call has "
                f"{tuple(k.shape)} (another batch or model?)"
            )
        where = self.idx[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])  # (B, heads, n, hd)
        return old_k.scatter(2, where, k.to(old_k.dtype)), old_v.scatter(2, where, v.to(old_v.dtype))


def check_active_index(idx: Any, batch_size: int, num_tokens: int) -> Tensor:
    """``idx`` as a ``(B, n)`` long tensor of distinct token indices per row, ``1 <= n <= N``.

    Raises:
        ValueError: another shape or dtype, an index outside ``[0, N)``, or a repeated index in a row.
    """
    if not isinstance(idx, Tensor) or idx.dim() != 2 or idx.shape[0] != batch_size:
        shape = tuple(idx.shape) if isinstance(idx, Tensor) else type(idx).__name__
        raise ValueError(f"idx must be a ({batch_size}, n) tensor of active token indices, got {shape}")
    if idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"idx must be an integer (long) tensor, got dtype {idx.dtype}")
    n = idx.shape[1]
    if not 1 <= n <= num_tokens:
        raise ValueError(f"idx must select between 1 and {num_tokens} tokens per row, got {n}")
    idx = idx.long()
    if bool(((idx < 0) | (idx >= num_tokens)).any()):
        raise ValueError(f"idx holds token indices outside [0, {num_tokens})")
    if n > 1 and bool((idx.sort(dim=1).values.diff(dim=1) == 0).any()):
        raise ValueError("idx repeats a token index within a row; each active token must appear once")
    return idx


def gather_tokens(values: Tensor, idx: Tensor) -> Tensor:
    """Rows ``idx`` of every image: ``(B, N, K)`` and ``(B, n)`` -> ``(B, n, K)``; a per-token
    time ``(B, N)`` gives ``(B, n)``."""
    if values.dim() == 2:
        return torch.gather(values, 1, idx)
    return torch.gather(values, 1, idx[..., None].expand(-1, -1, values.shape[-1]))


def patches_of(x: Tensor, patch_size: int, channels_last: bool) -> Tensor:
    """``(B, C, H, W)`` -> ``(B, N, p * p * C)`` flattened patches, row-major over the grid; within a
    patch (pixel row, pixel column, channel) when ``channels_last`` (the T2I embedding), else
    (channel, pixel row, pixel column) (the layout of a convolution's weight)."""
    B, C, H, W = x.shape
    p = patch_size
    x = x.reshape(B, C, H // p, p, W // p, p)
    x = x.permute(0, 2, 4, 3, 5, 1) if channels_last else x.permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // p) * (W // p), C * p * p)


def unpatchify(tokens: Tensor, patch_size: int, grid: tuple[int, int]) -> Tensor:
    """``(B, N, p * p * K)`` ordered (patch row, patch column, channel) -> ``(B, K, h p, w p)`` (the
    models' own ``unpatchify``: a pure permutation, so the same numbers)."""
    B, p = tokens.shape[0], patch_size
    h, w = grid
    k = tokens.shape[-1] // (p * p)
    return torch.einsum("nhwpqc->nchpwq", tokens.reshape(B, h, w, p, p, k)).reshape(B, k, h * p, w * p)


def text_length(mask: Tensor) -> int:
    """Text positions the T2I model keeps (``encode_text`` drops trailing positions masked in every
    row; an empty text keeps one masked position): ``(B, L)`` bool -> ``L' >= 1``."""
    used = mask.any(dim=0).nonzero()
    return int(used.max()) + 1 if used.numel() else 1


# --------------------------------------------------------------------------------------------
# FLOPs from shapes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlopBreakdown:
    """Matmul FLOPs of one forward call by part (see the module docstring for what is counted)."""

    embed: int
    conditioning: int
    text: int
    attention: int
    cross_attention: int
    mlp: int
    final: int

    @property
    def total(self) -> int:
        return (
            self.embed + self.conditioning + self.text + self.attention + self.cross_attention + self.mlp + self.final
        )


def _pad(rows: int) -> int:
    return max(rows, _MIN_ROWS)


def _linear(rows: int, fan_in: int, fan_out: int) -> int:
    return 2 * rows * fan_in * fan_out


def _ff(rows: int, dim: int, hidden: int, kind: str) -> int:
    """GEGLU (fc1 to 2 hidden) or GELU MLP, both on ``rows`` (already padded where needed)."""
    return _linear(rows, dim, 2 * hidden if kind == "geglu" else hidden) + _linear(rows, hidden, dim)


def _class_flops(cfg: Any, B: int, N: int, n: int) -> FlopBreakdown:
    D, depth = cfg.hidden_size, cfg.depth
    p, C = cfg.patch_size, cfg.in_channels
    K = C + (1 if cfg.predict_uncertainty else 0)
    hidden = int(D * cfg.mlp_ratio)
    tok, rows_c = B * n, _pad(B)  # active tokens; conditioning vectors (one per image, padded)
    embed = _linear(tok, C * p * p, D)
    cond = _linear(rows_c, 256, D) + _linear(rows_c, D, D)  # timestep MLP (labels: a table lookup)
    cond += depth * _linear(rows_c, D, 6 * D) + _linear(rows_c, D, 2 * D)  # block and final modulations
    attn = depth * (_linear(tok, D, 3 * D) + 2 * 2 * tok * N * D + _linear(tok, D, D))
    mlp = depth * _ff(tok, D, hidden, "gelu")
    final = _linear(tok, D, p * p * K)
    return FlopBreakdown(embed, cond, 0, attn, 0, mlp, final)


def _t2i_flops(cfg: Any, B: int, N: int, n: int, L: int) -> FlopBreakdown:
    D, depth, W = cfg.hidden_size, cfg.depth, cfg.mapping_width
    Dr, Dt = cfg.refiner_width, cfg.text_dim
    p, C = cfg.patch_size, cfg.in_channels
    K = C + (1 if cfg.predict_uncertainty else 0)
    hidden, r_hidden = int(D * cfg.mlp_ratio), int(Dr * cfg.mlp_ratio)
    gated = cfg.modulation == "adaln_zero"
    tok, rows_c, rows_t = _pad(B * n), _pad(B), _pad(B * L)
    embed = _linear(tok, C * p * p, D)
    cond = _linear(rows_c, 256, W) + cfg.mapping_depth * _ff(rows_c, W, 2 * W, "geglu")
    cond += depth * _linear(rows_c, W, (9 if gated else 3) * D) + _linear(rows_c, W, (2 if gated else 1) * D)
    text = _linear(rows_t, Dt, Dr)
    text += cfg.refiner_depth * (
        _linear(rows_t, Dr, 3 * Dr)
        + 2 * 2 * B * L * L * Dr
        + _linear(rows_t, Dr, Dr)
        + _ff(rows_t, Dr, r_hidden, cfg.mlp)
    )
    attn = depth * (_linear(tok, D, 3 * D) + 2 * 2 * B * n * N * D + _linear(tok, D, D))
    cross = depth * (_linear(tok, D, D) + _linear(rows_t, Dr, 2 * D) + 2 * 2 * B * n * L * D + _linear(tok, D, D))
    mlp = depth * _ff(tok, D, hidden, cfg.mlp)
    final = _linear(tok, D, p * p * K)
    return FlopBreakdown(embed, cond, text, attn, cross, mlp, final)


def forward_flops(
    model: Any,
    batch_size: int,
    image_size: tuple[int, int] | None = None,
    *,
    active: int | None = None,
    text_length: int | None = None,
    breakdown: bool = False,
) -> int | FlopBreakdown:
    """Matmul FLOPs of one forward call of ``model`` on ``batch_size`` rows (a guided call: twice
    the images), counted from shapes (what is counted: the module docstring).

    Args:
        model: a :class:`~.transformer.PatchForcingTransformer` (PFT or SiT) or a
            :class:`~.t2i.TextToImageTransformer` (anything with such a ``config``).
        batch_size: rows of the call.
        image_size: model-space ``(H, W)`` (default the model's ``image_size``).
        active: tokens per row a partial call computes (``None``: all ``N``, a dense call).
        text_length: text tokens the T2I model keeps (:func:`text_length` of the call's mask;
            default 1). Not for a class model.
        breakdown: return a :class:`FlopBreakdown` instead of the total.
    Raises:
        ValueError: a model whose cost is unknown, or sizes that do not fit it.
    """
    from .t2i import T2IConfig  # (lazy: the models import this module)
    from .transformer import ModelConfig

    cfg = getattr(model, "config", None)
    if not isinstance(cfg, (ModelConfig, T2IConfig)):
        raise ValueError(
            f"cannot count the FLOPs of a {type(model).__name__}: only PFT/SiT and text-to-image PFT models are known"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    H, W = image_size if image_size is not None else model.image_size
    p = cfg.patch_size
    if H % p or W % p or H < p or W < p:
        raise ValueError(f"image_size ({H}, {W}) is not a positive multiple of the patch size {p}")
    N = (H // p) * (W // p)
    n = N if active is None else int(active)
    if not 1 <= n <= N:
        raise ValueError(f"active must be between 1 and {N} tokens, got {active!r}")
    if isinstance(cfg, T2IConfig):
        L = 1 if text_length is None else int(text_length)
        if L < 1:
            raise ValueError(f"text_length must be >= 1, got {text_length!r}")
        out = _t2i_flops(cfg, batch_size, N, n, L)
    else:
        if text_length is not None:
            raise ValueError("text_length is only for text-to-image models")
        out = _class_flops(cfg, batch_size, N, n)
    return out if breakdown else out.total
