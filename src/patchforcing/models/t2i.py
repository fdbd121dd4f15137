"""The text-to-image Patch Forcing Transformer (PFT-T2I) and its SiT-style baseline.

One readable file in the manner of DiT's ``models.py``, next to the class-conditional network in
:mod:`.transformer` (whose shared-conditioning machinery, :class:`~.transformer.Conditioning`, it
reuses). The network maps ``(x, t, text)`` to a velocity and (optionally) a per-pixel
log-variance; it knows nothing of the flow objective or the samplers.

Shapes below: ``B`` batch, ``C`` input channels, ``H, W`` input size (any multiple of the patch
size ``p``), ``h = H / p``, ``w = W / p``, ``N = h * w`` image tokens (row-major), ``D`` width,
``L`` text tokens, ``Dt`` text-encoder width, ``Dr`` text-refiner width, ``W`` mapping width.

Design (the paper's T2I system, ``docs/method.md`` section 7):

* **Times.** Per-patch times go through a small *mapping network* (256 sinusoidal features, a
  linear map to width ``W = 384``, then ``mapping_depth = 2`` pre-norm residual GEGLU blocks) to
  one ``W``-vector per token; every block (and the final layer) projects it to its adaptive-norm
  modulation. As in the
  class model, tokens that share a time share the vector: the modulations are computed once per
  distinct time and gathered (:class:`~.transformer.Conditioning`). Text does not enter the
  modulation, so one Euler step (one time for the whole batch) computes each block's modulation
  for a single row. The narrow mapping width is what keeps per-token modulation cheap during
  training: ``W * k * D`` multiply-adds per token per block instead of ``D * k * D``.
* **Text.** The encoder's last hidden states ``(B, L, Dt)`` are projected to ``Dr`` and refined by
  ``refiner_depth`` pre-norm self-attention blocks (1-D RoPE over token positions, key-padding
  mask, no time conditioning: the refined text is computed once per call, whatever ``t``). Image
  tokens read it by **cross-attention** after their self-attention, with K/V projected from the
  refined text in every block. Cross- rather than joint attention because (1) it is what the
  paper describes; (2) with per-patch times a text token has no time of its own, so joint
  attention would need a separate conditioning for text tokens and would push all ``L`` (256 in
  the paper) text tokens through every block's MLP; here text costs one K/V projection per
  block; (3) padding is a key mask only: text never becomes a query of the image stream.
* **Positions.** 2-D axial RoPE on the image tokens' queries and keys (the first half of each
  head's channel pairs rotates with the patch row, the second half with the column), no position
  table: any ``H, W`` divisible by ``p`` works and only relative positions matter. Training-mode
  *position jitter* (``rope_jitter = j > 0``): every token's (row, col) is moved by independent
  ``U(-j, j)`` offsets (in patch cells; ``j = 0.5`` keeps each token inside its own cell), drawn
  from ``forward(..., generator=g)`` (or torch's global RNG), so runs are reproducible. Eval mode
  never jitters; the samplers call the model in eval mode.
* **Blocks.** Self-attention, cross-attention, feed-forward (GEGLU with hidden ``mlp_ratio * D``
  by default), QK-RMSNorm per head, no linear biases by default. ``modulation="scale"`` (the
  presets): each of the three sublayers gets an adaptive RMSNorm ``rms(x) * (1 + s(c))`` and its
  output projection is zero-initialised, so each block starts as the identity (the "zero" of
  adaLN-Zero, with the gate folded into the zero-initialised projection); 3 modulation vectors
  per block. ``modulation="adaln_zero"``: DiT's LayerNorm with shift, scale and a zero-initialised
  gate per sublayer (9 vectors per block).
* **Output.** Final adaptive norm and a zero-initialised linear to ``p * p * (C + 1)`` values per
  token: ``C`` velocity channels and one log-variance channel (``predict_uncertainty``), exactly
  as in the class PFT: ``v = 0`` and ``logvar = 0`` at initialisation.

Parameter count (``docs/method.md``: the authors' PFT-T2I-1.2B has 1,239,969,008). Counted on the
meta device for 32 latent channels and text width 2048 (``tests/test_t2i_model.py``):

=================================================================  =============  ==========
variant (everything else as the preset)                            parameters     vs authors
=================================================================  =============  ==========
**preset**: ``modulation="scale"``, GEGLU 3x, QK-norm, no biases   1,239,933,440  -0.003 %
SiT-T2I-1.2B (no log-variance channel)                             1,239,927,296  -0.003 %
without QK-norm                                                    1,239,922,176  -0.004 %
with linear biases (``bias=True``)                                 1,240,750,340  +0.063 %
mapping net = plain 2-layer MLP (Linear, SiLU, Linear; not built)  1,238,309,888  -0.134 %
GELU MLP 3x (2 matrices) instead of GEGLU                          1,027,596,800  -17.1 %
``modulation="adaln_zero"`` (9 vectors per block)                  1,339,613,696  +8.0 %
``adaln_zero`` and GELU MLP                                        1,127,277,056  -9.1 %
=================================================================  =============  ==========

Only three modulation vectors per block fed from the 384-wide mapping vector, a 3-matrix (gated)
feed-forward of hidden ``3 D``, cross-attention K/V from the 1536-wide refined text and an
unconditioned 2-block refiner (a time-modulated one would add 2.4M) fit the big terms; DiT's
9-vector adaLN-Zero or a 2-matrix MLP are off by 100M-200M. The last 35,568 parameters (0.003 %)
sit in small parts the paper does not specify (norm weights, which layers carry biases, the exact
mapping-network layers).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..conditioning import Condition
from ..utils.configs import config_from_dict, config_to_dict
from .attention import attention, attention_kernel_of
from .token_cache import KVLayer, KVStore, check_active_index, gather_tokens, patches_of
from .transformer import Conditioning, _rowwise, timestep_features

__all__ = [
    "T2IConfig",
    "TextToImageTransformer",
    "apply_rope",
    "rope_angles_1d",
    "rope_angles_2d",
]

MODULATIONS = ("scale", "adaln_zero")
MLP_KINDS = ("geglu", "gelu")


# --------------------------------------------------------------------------------------------
# Rotary position embeddings
# --------------------------------------------------------------------------------------------


def _rope_freqs(n: int, theta: float, device: torch.device | None) -> Tensor:
    """``(n,)`` float32 frequencies ``theta^(-k / n)``, ``k = 0 .. n-1``."""
    return torch.exp(-math.log(theta) * torch.arange(n, dtype=torch.float32, device=device) / n)


def rope_angles_1d(pos: Tensor, head_dim: int, theta: float = 10000.0) -> Tensor:
    """Angles of 1-D RoPE: ``(..., L)`` positions -> ``(..., L, head_dim / 2)``, one per channel pair."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
    return pos.float()[..., None] * _rope_freqs(head_dim // 2, theta, pos.device)


def rope_angles_2d(rows: Tensor, cols: Tensor, head_dim: int, theta: float = 10000.0) -> Tensor:
    """Angles of 2-D axial RoPE: ``(..., N)`` row and column positions -> ``(..., N, head_dim / 2)``.

    The first ``head_dim / 4`` channel pairs rotate with the row, the last ``head_dim / 4`` with
    the column, each axis with frequencies ``theta^(-k / (head_dim / 4))``.
    """
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head dimension divisible by 4, got {head_dim}")
    f = _rope_freqs(head_dim // 4, theta, rows.device)
    return torch.cat([rows.float()[..., None] * f, cols.float()[..., None] * f], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs ``(x[2i], x[2i+1])`` of ``x`` ``(B, heads, N, hd)`` by the angles whose
    cosines and sines ``cos, sin`` are ``(N, hd / 2)`` or ``(B, 1, N, hd / 2)``; computed in float32,
    returned in ``x``'s dtype."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).to(x.dtype)


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


def _attend(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, kernel: str = "sdpa") -> Tensor:
    """SDPA over ``(B, heads, *, hd)``; ``key_mask`` ``(B, L)`` bool (True = attend) or ``None``.

    A row without any key (all False) yields exactly zero instead of NaN: it attends to all its
    (finite) keys and its output is replaced by zeros.
    """
    if key_mask is None:
        return attention(q, k, v, kernel=kernel)
    has_key = key_mask.any(dim=-1)  # (B,)
    mask = key_mask | ~has_key[:, None]
    out = attention(q, k, v, mask[:, None, None, :], kernel=kernel)
    return torch.where(has_key[:, None, None, None], out, out.new_zeros(()))


class PatchEmbed(nn.Module):
    """``(B, C, H, W)`` -> ``(B, N, D)``: each ``p x p`` patch flattened (pixel row, pixel column,
    channel) and projected by one linear layer (a stride-``p`` convolution written as a matrix
    product, so that a sample's tokens do not depend on the batch it is in)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int, bias: bool = True):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(patch_size * patch_size * in_channels, hidden_size, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        p = self.patch_size
        patches = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1).reshape(B, -1, p * p * C)
        return _rowwise(self.proj, patches.to(self.proj.weight.dtype))

    def forward_at(self, x: Tensor, idx: Tensor) -> Tensor:
        """The tokens ``idx`` ``(B, n)`` only: ``(B, C, H, W)`` -> ``(B, n, D)``."""
        patches = gather_tokens(patches_of(x, self.patch_size, channels_last=True), idx)
        return _rowwise(self.proj, patches.to(self.proj.weight.dtype))


class FeedForward(nn.Module):
    """GEGLU (``fc1`` to ``2 * hidden``: value and gate halves, ``value * gelu(gate)``) or a plain
    GELU MLP, then ``fc2`` back to ``dim``."""

    def __init__(self, dim: int, hidden: int, kind: str = "geglu", bias: bool = False):
        super().__init__()
        self.kind = kind
        self.fc1 = nn.Linear(dim, 2 * hidden if kind == "geglu" else hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        h = _rowwise(self.fc1, x)
        if self.kind == "geglu":
            value, gate = h.chunk(2, dim=-1)
            h = value * F.gelu(gate, approximate="tanh")
        else:
            h = F.gelu(h, approximate="tanh")
        return _rowwise(self.fc2, h)


class RMSNorm(nn.Module):
    """RMSNorm with a learnt scale, computed in float32 (bf16 autocast inputs come back in bf16)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def _head_norm(head_dim: int, qk_norm: bool) -> nn.Module:
    return RMSNorm(head_dim) if qk_norm else nn.Identity()


class MappingNetwork(nn.Module):
    """Times ``(M,)`` in ``[0, 1]`` -> ``(M, W)``: 256 sinusoidal features, a linear map to ``W`` and
    RMSNorm, then ``depth`` pre-norm residual GEGLU blocks (hidden ``2 W``), then RMSNorm."""

    def __init__(self, width: int, depth: int, bias: bool = False, frequency_embedding_size: int = 256):
        super().__init__()
        if depth < 0:
            raise ValueError(f"mapping_depth must be >= 0, got {depth}")
        self.frequency_embedding_size = frequency_embedding_size
        self.in_proj = nn.Linear(frequency_embedding_size, width, bias=bias)
        self.in_norm = RMSNorm(width)
        self.norms = nn.ModuleList(RMSNorm(width) for _ in range(depth))
        self.blocks = nn.ModuleList(FeedForward(width, 2 * width, "geglu", bias) for _ in range(depth))
        self.out_norm = RMSNorm(width)

    def forward(self, t: Tensor) -> Tensor:
        feats = timestep_features(t, self.frequency_embedding_size).to(self.in_proj.weight.dtype)
        h = self.in_norm(_rowwise(self.in_proj, feats))
        for norm, ff in zip(self.norms, self.blocks):
            h = h + ff(norm(h))
        return self.out_norm(h)


class SelfAttention(nn.Module):
    """Multi-head self-attention: fused qkv ``(3, heads, hd)``, QK-RMSNorm, RoPE, SDPA, projection."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, bias: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.q_norm = _head_norm(dim // num_heads, qk_norm)
        self.k_norm = _head_norm(dim // num_heads, qk_norm)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None,
        key_mask: Tensor | None = None,
        kv: KVLayer | None = None,
    ) -> Tensor:
        """``(B, N, D)`` -> ``(B, N, D)``; a token cache ``kv`` (:mod:`.token_cache`) records the keys
        (after QK-norm and RoPE) and values, or supplies those of the inactive tokens (partial call)."""
        B, N, D = x.shape
        qkv = _rowwise(self.qkv, x).view(B, N, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, hd)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv is not None:
            k, v = kv(k, v)
        out = _attend(q, k, v, key_mask, attention_kernel_of(self))
        return _rowwise(self.proj, out.transpose(1, 2).reshape(B, N, D))


class CrossAttention(nn.Module):
    """Image tokens ``(B, N, D)`` attend to context tokens ``(B, L, Dc)`` under a key mask."""

    def __init__(self, dim: int, context_dim: int, num_heads: int, qk_norm: bool = True, bias: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=bias)
        self.kv = nn.Linear(context_dim, 2 * dim, bias=bias)
        self.q_norm = _head_norm(dim // num_heads, qk_norm)
        self.k_norm = _head_norm(dim // num_heads, qk_norm)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: Tensor, context: Tensor, context_mask: Tensor) -> Tensor:
        B, N, D = x.shape
        L, hd = context.shape[1], D // self.num_heads
        q = _rowwise(self.q, x).view(B, N, self.num_heads, hd).transpose(1, 2)
        k, v = _rowwise(self.kv, context).view(B, L, 2, self.num_heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
        out = _attend(self.q_norm(q), self.k_norm(k), v, context_mask, attention_kernel_of(self))
        return _rowwise(self.proj, out.transpose(1, 2).reshape(B, N, D))


class RefinerBlock(nn.Module):
    """Pre-norm transformer block over text tokens (RMSNorm, self-attention with 1-D RoPE and a
    key-padding mask, feed-forward); not time-conditioned."""

    def __init__(self, dim: int, num_heads: int, hidden: int, mlp: str, qk_norm: bool, bias: bool):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = SelfAttention(dim, num_heads, qk_norm, bias)
        self.norm2 = RMSNorm(dim)
        self.mlp = FeedForward(dim, hidden, mlp, bias)

    def forward(self, z: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor) -> Tensor:
        z = z + self.attn(self.norm1(z), rope, mask)
        return z + self.mlp(self.norm2(z))


class T2IBlock(nn.Module):
    """Self-attention (2-D RoPE), cross-attention to the text, feed-forward; each sublayer behind
    an adaptive norm modulated per token (or per shared time) from the mapping vector."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        context_dim: int,
        cond_dim: int,
        hidden: int,
        mlp: str,
        qk_norm: bool,
        bias: bool,
        modulation: str,
    ):
        super().__init__()
        self.dim = dim
        self.gated = modulation == "adaln_zero"
        self.attn = SelfAttention(dim, num_heads, qk_norm, bias)
        self.cross = CrossAttention(dim, context_dim, num_heads, qk_norm, bias)
        self.mlp = FeedForward(dim, hidden, mlp, bias)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, (9 if self.gated else 3) * dim, bias=bias))

    def forward(
        self,
        x: Tensor,
        c: Conditioning,
        rope: tuple[Tensor, Tensor],
        context: Tensor,
        context_mask: Tensor,
        kv: KVLayer | None = None,
    ) -> Tensor:
        if self.gated:
            # chunks: (shift, 1 + scale, gate) for self-attention, cross-attention, feed-forward
            m = c.project(self.adaLN_modulation, 9, plus_one=(1, 4, 7))
            ln = F.layer_norm(x, (self.dim,), eps=1e-6)
            x = torch.addcmul(x, m[2], self.attn(torch.addcmul(m[0], ln, m[1]), rope, kv=kv))
            ln = F.layer_norm(x, (self.dim,), eps=1e-6)
            x = torch.addcmul(x, m[5], self.cross(torch.addcmul(m[3], ln, m[4]), context, context_mask))
            ln = F.layer_norm(x, (self.dim,), eps=1e-6)
            return torch.addcmul(x, m[8], self.mlp(torch.addcmul(m[6], ln, m[7])))
        s1, s2, s3 = c.project(self.adaLN_modulation, 3, plus_one=(0, 1, 2))  # 1 + scale each
        x = x + self.attn(F.rms_norm(x, (self.dim,), eps=1e-6) * s1, rope, kv=kv)
        x = x + self.cross(F.rms_norm(x, (self.dim,), eps=1e-6) * s2, context, context_mask)
        return x + self.mlp(F.rms_norm(x, (self.dim,), eps=1e-6) * s3)


class T2IFinalLayer(nn.Module):
    """Adaptive norm (``scale``: RMSNorm times ``1 + scale``; ``adaln_zero``: LayerNorm with shift
    and scale), then a linear map to ``p * p * out_channels`` values per token."""

    def __init__(self, dim: int, cond_dim: int, patch_size: int, out_channels: int, bias: bool, modulation: str):
        super().__init__()
        self.dim = dim
        self.gated = modulation == "adaln_zero"
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, (2 if self.gated else 1) * dim, bias=bias))
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels, bias=bias)

    def forward(self, x: Tensor, c: Conditioning) -> Tensor:
        if self.gated:
            shift, scale = c.project(self.adaLN_modulation, 2, plus_one=(1,))
            return _rowwise(self.linear, torch.addcmul(shift, F.layer_norm(x, (self.dim,), eps=1e-6), scale))
        (scale,) = c.project(self.adaLN_modulation, 1, plus_one=(0,))
        return _rowwise(self.linear, F.rms_norm(x, (self.dim,), eps=1e-6) * scale)


# --------------------------------------------------------------------------------------------
# The transformer
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class T2IConfig:
    """Everything needed to rebuild a :class:`TextToImageTransformer` (saved with the weights).

    :meth:`to_dict` adds ``"model_type": "t2i"``, which the checkpoint loader dispatches on (class
    model configs have no such key).
    """

    MODEL_TYPE: ClassVar[str] = "t2i"

    input_size: int | tuple[int, int] = 32
    patch_size: int = 2
    in_channels: int = 4
    text_dim: int = 2048
    hidden_size: int = 1536
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 3.0
    mlp: str = "geglu"
    mapping_width: int = 384
    mapping_depth: int = 2
    refiner_width: int = 1536
    refiner_heads: int = 12
    refiner_depth: int = 2
    qk_norm: bool = True
    bias: bool = False
    modulation: str = "scale"
    rope_theta: float = 10000.0
    rope_jitter: float = 0.0
    per_patch_time: bool = True
    predict_uncertainty: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": self.MODEL_TYPE, **config_to_dict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> T2IConfig:
        d = dict(d)
        kind = d.pop("model_type", cls.MODEL_TYPE)
        if kind != cls.MODEL_TYPE:
            raise ValueError(f"not a text-to-image model config: model_type {kind!r} (expected {cls.MODEL_TYPE!r})")
        return config_from_dict(cls, d, what="text-to-image model config")


class TextToImageTransformer(nn.Module):
    """Text-conditioned PFT (see the module docstring for the design).

    ``per_patch_time=False, predict_uncertainty=False`` is the SiT-style baseline (one time per
    image, ``C`` output channels). Call ``model(x, t, text)``:

    Args:
        x: ``(B, C, H, W)`` input; ``H`` and ``W`` any multiples of the patch size (the default
            ``input_size`` only sets ``image_size`` / ``num_patches``, the size samplers use).
        t: ``(B,)`` one time per image, or ``(B, N)`` one per patch, ``N = (H / p) (W / p)``, in
            ``[0, 1]`` (0 = noise, 1 = data).
        text: :class:`~patchforcing.conditioning.TextTokens` ``(tokens (B, L, text_dim), mask
            (B, L) bool)`` (a plain ``(tokens, mask)`` tuple or a ``TextEmbeddings`` condition
            also works). Masked positions have no influence at all; a row whose mask is all False
            gets no text (cross-attention contributes exactly zero).
        generator: draws the RoPE position jitter (training mode with ``rope_jitter > 0`` only).
    Returns:
        ``(v, logvar)``: ``v`` ``(B, C, H, W)``; ``logvar`` ``(B, 1, H, W)`` or ``None``.
    """

    #: the third argument of ``forward`` is text (``patchforcing.conditioning.TextTokens``)
    condition_kind = "text"
    #: any ``H, W`` divisible by the patch size (2-D RoPE, no position table); samplers read this
    accepts_any_size = True

    def __init__(
        self,
        input_size: int | tuple[int, int] = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        text_dim: int = 2048,
        hidden_size: int = 1536,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 3.0,
        mlp: str = "geglu",
        mapping_width: int = 384,
        mapping_depth: int = 2,
        refiner_width: int | None = None,
        refiner_heads: int | None = None,
        refiner_depth: int = 2,
        qk_norm: bool = True,
        bias: bool = False,
        modulation: str = "scale",
        rope_theta: float = 10000.0,
        rope_jitter: float = 0.0,
        per_patch_time: bool = True,
        predict_uncertainty: bool = True,
    ):
        super().__init__()
        size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        if len(size) != 2 or any(s % patch_size for s in size):
            raise ValueError(f"input size {input_size} is not a multiple of patch size {patch_size}")
        refiner_width = hidden_size if refiner_width is None else refiner_width
        refiner_heads = num_heads if refiner_heads is None else refiner_heads
        if mlp not in MLP_KINDS:
            raise ValueError(f"mlp must be one of {MLP_KINDS}, got {mlp!r}")
        if modulation not in MODULATIONS:
            raise ValueError(f"modulation must be one of {MODULATIONS}, got {modulation!r}")
        for name, width, heads, div in (
            ("hidden_size", hidden_size, num_heads, 4),
            ("refiner_width", refiner_width, refiner_heads, 2),
        ):
            if heads < 1 or width % heads or (width // heads) % div:
                raise ValueError(
                    f"{name} {width} with {heads} heads: the head dimension must be an integer divisible by {div} (RoPE)"
                )
        for name, v in (("text_dim", text_dim), ("depth", depth), ("mapping_width", mapping_width)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if refiner_depth < 0:
            raise ValueError(f"refiner_depth must be >= 0, got {refiner_depth}")
        if not rope_jitter >= 0:
            raise ValueError(f"rope_jitter must be >= 0, got {rope_jitter}")
        self.config = T2IConfig(
            input_size=input_size if isinstance(input_size, int) else size,
            patch_size=patch_size,
            in_channels=in_channels,
            text_dim=text_dim,
            hidden_size=hidden_size,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            mlp=mlp,
            mapping_width=mapping_width,
            mapping_depth=mapping_depth,
            refiner_width=refiner_width,
            refiner_heads=refiner_heads,
            refiner_depth=refiner_depth,
            qk_norm=qk_norm,
            bias=bias,
            modulation=modulation,
            rope_theta=rope_theta,
            rope_jitter=rope_jitter,
            per_patch_time=per_patch_time,
            predict_uncertainty=predict_uncertainty,
        )
        self.image_size: tuple[int, int] = size
        self.grid_size: tuple[int, int] = (size[0] // patch_size, size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.text_dim = text_dim
        self.per_patch_time = per_patch_time
        self.predict_uncertainty = predict_uncertainty
        self.out_channels = in_channels + (1 if predict_uncertainty else 0)
        #: half-width (in patch cells) of the uniform training-mode RoPE position jitter (0: none)
        self.rope_jitter = float(rope_jitter)
        #: compute the mapping vector and modulations once per distinct time when that saves work
        self.shared_conditioning = True

        hidden = int(hidden_size * mlp_ratio)
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size, bias=bias)
        self.t_embedder = MappingNetwork(mapping_width, mapping_depth, bias=bias)
        self.text_proj = nn.Linear(text_dim, refiner_width, bias=bias)
        self.refiner = nn.ModuleList(
            RefinerBlock(refiner_width, refiner_heads, int(refiner_width * mlp_ratio), mlp, qk_norm, bias)
            for _ in range(refiner_depth)
        )
        self.blocks = nn.ModuleList(
            T2IBlock(hidden_size, num_heads, refiner_width, mapping_width, hidden, mlp, qk_norm, bias, modulation)
            for _ in range(depth)
        )
        self.final_layer = T2IFinalLayer(hidden_size, mapping_width, patch_size, self.out_channels, bias, modulation)
        self.initialize_weights()

    # ---- construction ----------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: T2IConfig | dict[str, Any]) -> TextToImageTransformer:
        if isinstance(config, dict):
            config = T2IConfig.from_dict(config)
        return cls(**asdict(config))

    def initialize_weights(self) -> None:
        """Xavier linears, zero biases; zero modulations and final linear (``v = 0``, ``logvar = 0``);
        with ``modulation="scale"`` also zero output projections of every block's sublayers."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        zero = [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for block in self.blocks:
            zero.append(block.adaLN_modulation[-1])
            if not block.gated:
                zero += [block.attn.proj, block.cross.proj, block.mlp.fc2]
        for layer in zero:
            nn.init.zeros_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)

    # ---- conditioning ----------------------------------------------------------------------

    def conditioning(self, t: Tensor) -> Conditioning:
        """The mapping vectors of a batch: ``(B, 1, W)`` for one time per image, ``(U, W)`` plus a
        ``(B, N)`` index for few distinct times, else ``(B, N, W)``.

        Args:
            t: ``(B,)`` or ``(B, N)`` times.
        """
        if t.dim() == 1:
            return Conditioning(self.t_embedder(t)[:, None, :])
        B, N = t.shape
        fast = self.shared_conditioning and not torch.compiler.is_compiling()
        if fast and bool((t == t[:, :1]).all()):
            return Conditioning(self.t_embedder(t[:, 0])[:, None, :])
        if fast:
            ut, inverse = torch.unique(t.reshape(-1), return_inverse=True)
            if 4 * ut.numel() <= B * N:
                return Conditioning(self.t_embedder(ut), inverse.view(B, N))
        return Conditioning(self.t_embedder(t.reshape(-1)).view(B, N, -1))

    def encode_text(self, tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Project and refine the text: ``(B, L, Dt)``, ``(B, L)`` -> ``(B, L', Dr)``, ``(B, L')``.

        Masked positions are zeroed first (so their values never matter), and trailing positions
        masked in every row are dropped (``L' <= L``): padding a batch further changes nothing,
        bit for bit.
        """
        if not torch.compiler.is_compiling():
            used = mask.any(dim=0).nonzero()
            length = int(used.max()) + 1 if used.numel() else 1
            tokens, mask = tokens[:, :length], mask[:, :length]
        if tokens.shape[1] == 0:  # no text tokens at all: one masked position
            tokens, mask = tokens.new_zeros(tokens.shape[0], 1, tokens.shape[2]), mask.new_zeros(mask.shape[0], 1)
        tokens = torch.where(mask[..., None], tokens, tokens.new_zeros(()))
        z = _rowwise(self.text_proj, tokens.to(self.text_proj.weight.dtype))
        if self.refiner:
            hd = self.config.refiner_width // self.config.refiner_heads
            angles = rope_angles_1d(torch.arange(z.shape[1], device=z.device), hd, self.config.rope_theta)
            rope = (angles.cos(), angles.sin())
            for block in self.refiner:
                z = block(z, rope, mask)
        return z, mask

    def image_rope(
        self, grid: tuple[int, int], batch_size: int, device: torch.device, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Cosines and sines of the 2-D RoPE of an ``h x w`` token grid: ``(N, hd / 2)`` each, or
        ``(B, 1, N, hd / 2)`` with training-mode jitter (``U(-j, j)`` per token and axis, from
        ``generator``)."""
        h, w = grid
        rows = torch.arange(h, device=device, dtype=torch.float32).repeat_interleave(w)
        cols = torch.arange(w, device=device, dtype=torch.float32).repeat(h)
        if self.training and self.rope_jitter > 0:
            gen_device = generator.device if generator is not None else device
            noise = torch.rand(2, batch_size, h * w, generator=generator, device=gen_device).to(device)
            rows = rows + (2 * noise[0] - 1) * self.rope_jitter
            cols = cols + (2 * noise[1] - 1) * self.rope_jitter
        hd = self.config.hidden_size // self.config.num_heads
        angles = rope_angles_2d(rows, cols, hd, self.config.rope_theta)
        if angles.dim() == 3:
            angles = angles[:, None]
        return angles.cos(), angles.sin()

    # ---- forward ---------------------------------------------------------------------------

    def _check_inputs(self, x: Tensor, t: Tensor, text: Any) -> tuple[Tensor, Tensor, Tensor]:
        p = self.patch_size
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[2] % p or x.shape[3] % p or 0 in x.shape[2:]:
            raise ValueError(
                f"x must have shape (B, {self.in_channels}, H, W) with H and W positive multiples of the patch "
                f"size {p}, got {tuple(x.shape)}"
            )
        B, N = x.shape[0], (x.shape[2] // p) * (x.shape[3] // p)
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(B)
        if t.dim() == 1 and t.shape[0] == B:
            pass
        elif t.dim() == 2 and t.shape == (B, N):
            if not self.per_patch_time:
                if not bool((t == t[:, :1]).all()):
                    raise ValueError(
                        "this model takes one time per image (per_patch_time=False) but t has "
                        "different values within a row; use a PFT model for per-patch times"
                    )
                t = t[:, 0]
        else:
            raise ValueError(f"t must have shape ({B},) or ({B}, {N}), got {tuple(t.shape)}")
        if isinstance(text, Condition):
            text = text.model_input()
        if text is None:
            raise ValueError(
                "this is a text-conditioned model: pass text=TextTokens(tokens, mask) (e.g. encoder(prompts)"
                ".model_input(); the empty caption for unconditional samples)"
            )
        if not isinstance(text, (tuple, list)) or len(text) != 2:
            raise ValueError(
                f"text must be TextTokens(tokens, mask) or a (tokens, mask) pair, got {type(text).__name__}"
            )
        tokens, mask = (torch.as_tensor(v, device=x.device) for v in text)
        if tokens.dim() != 3 or tokens.shape[0] != B or tokens.shape[2] != self.text_dim:
            raise ValueError(f"text tokens must have shape ({B}, L, {self.text_dim}), got {tuple(tokens.shape)}")
        if not tokens.is_floating_point():
            raise ValueError(f"text tokens must be floating point, got dtype {tokens.dtype}")
        if mask.shape != tokens.shape[:2] or mask.dtype != torch.bool:
            raise ValueError(
                f"text mask must be a bool tensor of shape {tuple(tokens.shape[:2])}, got {tuple(mask.shape)} {mask.dtype}"
            )
        return t, tokens, mask

    def unpatchify(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        """``(B, N, p * p * K)`` ordered (patch_row, patch_col, channel) -> ``(B, K, h p, w p)``."""
        B, p = tokens.shape[0], self.patch_size
        h, w = grid
        k = tokens.shape[-1] // (p * p)
        x = tokens.reshape(B, h, w, p, p, k)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(B, k, h * p, w * p)

    def forward(
        self, x: Tensor, t: Tensor, text: Any, *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor | None]:
        t, tokens, mask = self._check_inputs(x, t, text)
        grid = (x.shape[2] // self.patch_size, x.shape[3] // self.patch_size)
        c = self.conditioning(t)
        context, context_mask = self.encode_text(tokens, mask)
        rope = self.image_rope(grid, x.shape[0], x.device, generator)
        h = self.x_embedder(x)
        for block in self.blocks:
            h = block(h, c, rope, context, context_mask)
        out = self.unpatchify(self.final_layer(h, c), grid)
        if self.predict_uncertainty:
            return out[:, : self.in_channels], out[:, self.in_channels :]
        return out, None

    def forward_cached(self, x: Tensor, t: Tensor, text: Any, *, store: KVStore, idx: Tensor | None = None) -> Tensor:
        """The token-cache forward (:mod:`.token_cache`); ``x, t, text`` as in ``forward`` (eval mode:
        no position jitter).

        ``idx=None``: a full call, the same numbers as ``forward``, recording every block's
        self-attention keys (after QK-norm and RoPE) and values in ``store``; returns the token
        outputs ``(B, N, p * p * K)``. ``idx`` ``(B, n)`` long: a partial call on those tokens (their
        own RoPE angles, cross-attention to the text and feed-forward for them only), attending to
        ``store``'s keys and values of the other tokens; returns ``(B, n, p * p * K)``.
        """
        t, tokens, mask = self._check_inputs(x, t, text)
        grid = (x.shape[2] // self.patch_size, x.shape[3] // self.patch_size)
        context, context_mask = self.encode_text(tokens, mask)
        rope = self.image_rope(grid, x.shape[0], x.device)
        if idx is None:
            c = self.conditioning(t)
            h = self.x_embedder(x)
        else:
            idx = check_active_index(idx, x.shape[0], grid[0] * grid[1])
            c = self.conditioning(t if t.dim() == 1 else gather_tokens(t, idx))
            h = self.x_embedder.forward_at(x, idx)
            rope = tuple(
                r[idx][:, None] if r.dim() == 2 else gather_tokens(r[:, 0], idx)[:, None] for r in rope
            )  # (B, 1, n, hd / 2)
        for i, block in enumerate(self.blocks):
            h = block(h, c, rope, context, context_mask, store.layer(i, idx))
        return self.final_layer(h, c)

    def extra_repr(self) -> str:
        c = self.config
        kind = "PFT-T2I" if c.per_patch_time else "SiT-T2I"
        return (
            f"kind={kind}, input_size={c.input_size}, patch_size={c.patch_size}, in_channels={c.in_channels}, "
            f"text_dim={c.text_dim}, modulation={c.modulation}, uncertainty={c.predict_uncertainty}"
        )
