"""The Patch Forcing Transformer (PFT) and its SiT baseline.

One readable file in the manner of DiT's ``models.py``: embedders, block, final layer, the
transformer. The network knows nothing of the flow objective or the samplers: it maps
``(x, t, y)`` to a velocity and (optionally) a per-pixel log-variance.

Shapes used below: ``B`` batch, ``C`` input channels, ``H, W`` input size, ``p`` patch size,
``h = H / p``, ``w = W / p``, ``N = h * w`` tokens (row-major over the patch grid), ``D`` width.

Per-patch conditioning (the PFT change to DiT) makes every adaLN modulation a function of the
token. Whenever tokens share a ``(t, y)`` pair -- one time per image in Euler sampling, two or a
few values in the adaptive samplers -- the embedding and every modulation are computed once per
distinct pair and gathered (:class:`Conditioning`), which gives the same numbers as the
per-token computation at a fraction of its cost.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..utils.configs import config_from_dict, config_to_dict
from .attention import attention, attention_kernel_of
from .token_cache import KVLayer, KVStore, check_active_index, gather_tokens, patches_of

__all__ = [
    "ModelConfig",
    "RepaConfig",
    "PatchForcingTransformer",
    "Conditioning",
    "timestep_features",
    "sincos_pos_embed_2d",
]


# --------------------------------------------------------------------------------------------
# Fixed embeddings
# --------------------------------------------------------------------------------------------


def timestep_features(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of times in ``[0, 1]`` (no x1000 scaling), cosines first.

    Args:
        t: ``(M,)`` times.
    Returns:
        ``(M, dim)`` float32 features ``cat(cos(t * f), sin(t * f))`` with
        ``f_k = exp(-ln(max_period) * k / half)``, ``half = dim // 2``.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # (dim/2,)
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (M, dim)


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> Tensor:
    """Fixed 2-D sin-cos position embedding of a ``grid_h x grid_w`` token grid.

    The first half of the channels encodes the column index, the second half the row index;
    each half is ``[sin(pos * w_k), cos(pos * w_k)]`` with ``w_k = 10000^(-k / (dim/4))``.

    Returns:
        ``(1, grid_h * grid_w, dim)`` float32, tokens in row-major order.
    """
    if dim % 4:
        raise ValueError(f"the position embedding needs a width divisible by 4, got {dim}")
    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    emb = np.concatenate([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], axis=1)
    return torch.from_numpy(emb).float().unsqueeze(0)


# --------------------------------------------------------------------------------------------
# Conditioning: per image, per token, or per distinct (t, y) pair
# --------------------------------------------------------------------------------------------


#: small matrix products use other CPU kernels than large ones, whose per-row results differ in
#: the last bits; evaluating per-conditioning layers on at least this many rows makes a sample's
#: output independent of how many other samples share its batch (batch-size invariance).
MIN_ROWS = 32


def _rowwise(layer: nn.Module, x: Tensor) -> Tensor:
    """``layer(x)`` for ``(..., D)`` input, computed on >= :data:`MIN_ROWS` rows (padding sliced off)."""
    flat = x.reshape(-1, x.shape[-1])
    m = flat.shape[0]
    if m >= MIN_ROWS:  # (no slicing here: its backward would zero-fill a full-size gradient)
        out = layer(flat)
    else:
        out = layer(torch.cat([flat, flat[-1:].expand(MIN_ROWS - m, -1)]))[:m]
    return out.reshape(*x.shape[:-1], out.shape[-1])


@dataclass
class Conditioning:
    """The conditioning vectors of a batch, stored once per distinct value.

    ``table`` holds conditioning vectors; ``index`` says which one every token uses:

    * ``index is None``: ``table`` is ``(B, 1, D)`` (one vector per image, broadcast over
      tokens) or ``(B, N, D)`` (one per token).
    * otherwise ``table`` is ``(U, D)`` and ``index`` is ``(B, N)`` long into it.

    :meth:`project` applies a layer to the distinct vectors only and gathers the result.
    """

    table: Tensor
    index: Tensor | None = None

    def project(self, layer: nn.Module, chunks: int, plus_one: tuple[int, ...] = ()) -> list[Tensor]:
        """``layer(c)`` for every token, split in ``chunks`` pieces of ``(B, 1, D)`` or ``(B, N, D)``.

        Pieces listed in ``plus_one`` get ``+ 1`` (the adaLN ``1 + scale``), applied to the
        distinct vectors before gathering so that per-token work is only the gather itself.
        """
        out = _rowwise(layer, self.table).chunk(chunks, dim=-1)
        out = [o + 1 if i in plus_one else o for i, o in enumerate(out)]
        if self.index is None:
            return out
        return [o.contiguous()[self.index] for o in out]


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


class TimestepEmbedder(nn.Module):
    """Times in ``[0, 1]`` -> ``(M, D)``: sinusoidal features, Linear, SiLU, Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: Tensor) -> Tensor:
        feats = timestep_features(t, self.frequency_embedding_size)
        return _rowwise(self.mlp, feats.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels ``(M,)`` in ``[0, num_classes]`` -> ``(M, D)``; row ``num_classes`` is null.

    Label dropout for classifier-free guidance is the training loop's business (it replaces
    labels by ``num_classes``), so the embedder is a plain table.
    """

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y: Tensor) -> Tensor:
        return self.embedding_table(y)


class PatchEmbed(nn.Module):
    """``(B, C, H, W)`` -> ``(B, N, D)`` with a ``p x p`` stride-``p`` convolution."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)

    def forward_at(self, x: Tensor, idx: Tensor) -> Tensor:
        """The tokens ``idx`` ``(B, n)`` only: ``(B, C, H, W)`` -> ``(B, n, D)`` (the convolution as a
        matrix product on the gathered patches)."""
        p = self.proj.kernel_size[0]
        patches = gather_tokens(patches_of(x, p, channels_last=False), idx)  # (B, n, C p p)
        return nn.functional.linear(patches, self.proj.weight.flatten(1), self.proj.bias)


class Attention(nn.Module):
    """Multi-head self-attention: fused qkv ``(3, heads, head_dim)`` layout, SDPA, projection."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, kv: KVLayer | None = None) -> Tensor:
        """``(B, N, D)`` -> ``(B, N, D)``; with a token cache ``kv`` (:mod:`.token_cache`) the keys and
        values are recorded (full call) or the ``N`` tokens are the active ones of a partial call."""
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        if kv is not None:
            k, v = kv(k, v)  # a partial call: (B, heads, all tokens, head_dim)
        x = attention(q, k, v, kernel=attention_kernel_of(self))
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """adaLN-Zero transformer block with per-token (or shared) modulation."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Conditioning, kv: KVLayer | None = None) -> Tensor:
        # chunks: shift_msa, 1 + scale_msa, gate_msa, shift_mlp, 1 + scale_mlp, gate_mlp
        shift1, scale1, gate1, shift2, scale2, gate2 = c.project(self.adaLN_modulation, 6, plus_one=(1, 4))
        x = torch.addcmul(x, gate1, self.attn(torch.addcmul(shift1, self.norm1(x), scale1), kv))
        x = torch.addcmul(x, gate2, self.mlp(torch.addcmul(shift2, self.norm2(x), scale2)))
        return x


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear map to ``p * p * out_channels`` values per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Conditioning) -> Tensor:
        shift, scale = c.project(self.adaLN_modulation, 2, plus_one=(1,))
        return self.linear(torch.addcmul(shift, self.norm_final(x), scale))


# --------------------------------------------------------------------------------------------
# The transformer
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RepaConfig:
    """The REPA projector (representation alignment, Yu et al. 2025; ``docs/repa.md``).

    ``projector`` = Linear(hidden, projector_dim), SiLU, Linear(projector_dim, projector_dim), SiLU,
    Linear(projector_dim, z_dim), applied to every hidden token after block ``encoder_depth``
    (1-based: the output of ``blocks[encoder_depth - 1]``). ``z_dim`` is the frozen encoder's width
    (768 for DINOv2-B). The authors' PFT-XL/2 + REPA: depth 8, z_dim 768, projector_dim 2048.
    """

    encoder_depth: int = 8
    z_dim: int = 768
    projector_dim: int = 2048

    @classmethod
    def coerce(cls, value: RepaConfig | Mapping[str, Any] | None, depth: int) -> RepaConfig | None:
        """``value`` as a checked :class:`RepaConfig` (``None`` stays ``None``); ValueError naming
        the problem for unknown keys or sizes that do not fit a ``depth``-block model."""
        if value is None or isinstance(value, cls):
            cfg = value
        elif isinstance(value, Mapping):
            unknown = sorted(map(str, set(value) - set(cls.__dataclass_fields__)))
            if unknown:
                raise ValueError(f"unknown repa keys {unknown}; known: {sorted(cls.__dataclass_fields__)}")
            cfg = cls(**value)
        else:
            raise ValueError(f"repa must be a dict (encoder_depth, z_dim, projector_dim) or None, got {value!r}")
        if cfg is None:
            return None
        for name in ("encoder_depth", "z_dim", "projector_dim"):
            v = getattr(cfg, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"repa.{name} must be an integer >= 1, got {v!r}")
        if cfg.encoder_depth > depth:
            raise ValueError(f"repa.encoder_depth ({cfg.encoder_depth}) exceeds the model depth ({depth})")
        return cfg


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a :class:`PatchForcingTransformer` (saved with weights)."""

    input_size: int | tuple[int, int] = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    per_patch_time: bool = True
    predict_uncertainty: bool = True
    #: the REPA projector (training only); ``None`` (the default) for plain models and old configs
    repa: RepaConfig | None = None

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        def repa(v: Any) -> Any:  # a saved dict -> RepaConfig; None (or a RepaConfig) as it is
            return RepaConfig(**v) if isinstance(v, Mapping) else v

        return config_from_dict(cls, d, what="model config", convert={"repa": repa})


class PatchForcingTransformer(nn.Module):
    """DiT/SiT backbone with per-patch time conditioning and a log-variance head.

    ``per_patch_time=False, predict_uncertainty=False`` is the SiT baseline (one time per image,
    ``C`` output channels). The default is PFT: every token has its own time, and the final layer
    emits one extra channel, the per-pixel log-variance.

    Call ``model(x, t, y)``:

    Args:
        x: ``(B, C, H, W)`` input.
        t: ``(B,)`` one time per image, or ``(B, N)`` one per patch, in ``[0, 1]``
            (0 = noise, 1 = data).
        y: ``(B,)`` long labels in ``[0, num_classes]`` (``num_classes`` is the null class),
            or ``None`` for the null class everywhere.
    Returns:
        ``(v, logvar)``: ``v`` ``(B, C, H, W)`` velocity; ``logvar`` ``(B, 1, H, W)`` or ``None``
        for a model without the head.

    With ``repa=dict(encoder_depth=8, z_dim=768, projector_dim=2048)`` the model also has the REPA
    ``projector`` (:class:`RepaConfig`); only :meth:`forward_with_projection` (training) runs it,
    the plain call (sampling) never does.
    """

    #: what the third argument of ``forward`` is: class labels (the text-to-image model: "text")
    condition_kind = "class"

    def __init__(
        self,
        input_size: int | tuple[int, int] = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        per_patch_time: bool = True,
        predict_uncertainty: bool = True,
        repa: RepaConfig | Mapping[str, Any] | None = None,
    ):
        super().__init__()
        size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        if len(size) != 2 or any(s % patch_size for s in size):
            raise ValueError(f"input size {input_size} is not a multiple of patch size {patch_size}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        repa = RepaConfig.coerce(repa, depth)
        self.config = ModelConfig(
            input_size=input_size if isinstance(input_size, int) else size,
            patch_size=patch_size,
            in_channels=in_channels,
            hidden_size=hidden_size,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            num_classes=num_classes,
            per_patch_time=per_patch_time,
            predict_uncertainty=predict_uncertainty,
            repa=repa,
        )
        self.image_size: tuple[int, int] = size
        self.grid_size: tuple[int, int] = (size[0] // patch_size, size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.per_patch_time = per_patch_time
        self.predict_uncertainty = predict_uncertainty
        self.out_channels = in_channels + (1 if predict_uncertainty else 0)
        #: compute embeddings/modulations once per distinct (t, y) pair when that saves work
        self.shared_conditioning = True

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(Block(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()
        self.projector: nn.Sequential | None = None
        if repa is not None:  # built after the backbone's init: same backbone weights as a plain model
            self.projector = nn.Sequential(
                nn.Linear(hidden_size, repa.projector_dim),
                nn.SiLU(),
                nn.Linear(repa.projector_dim, repa.projector_dim),
                nn.SiLU(),
                nn.Linear(repa.projector_dim, repa.z_dim),
            )
            self._init_projector()

    # ---- construction ----------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: ModelConfig | dict[str, Any]) -> PatchForcingTransformer:
        if isinstance(config, dict):
            config = ModelConfig.from_dict(config)
        return cls(**asdict(config))

    def _init_projector(self) -> None:
        for layer in self.projector:
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)

    def remove_projector(self) -> PatchForcingTransformer:
        """Drop the REPA projector in place (a plain sampling model, ``config.repa = None``)."""
        self.projector = None
        self.config = replace(self.config, repa=None)
        return self

    def initialize_weights(self) -> None:
        """DiT initialisation; all adaLN outputs and the final linear are zero (v = 0, logvar = 0)."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed_2d(self.pos_embed.shape[-1], *self.grid_size))
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        if getattr(self, "projector", None) is not None:
            self._init_projector()

    # ---- conditioning ----------------------------------------------------------------------

    def _embed(self, t: Tensor, y: Tensor) -> Tensor:
        """``(M,)`` times and ``(M,)`` labels -> ``(M, D)`` conditioning vectors."""
        return self.t_embedder(t) + self.y_embedder(y).to(self.t_embedder.mlp[0].weight.dtype)

    def conditioning(self, t: Tensor, y: Tensor) -> Conditioning:
        """Build the conditioning of a batch.

        Args:
            t: ``(B,)`` or ``(B, N)`` times.
            y: ``(B,)`` long labels.
        """
        B = y.shape[0]
        if t.dim() == 1:
            return Conditioning(self._embed(t, y)[:, None, :])
        N = t.shape[1]
        fast = self.shared_conditioning and not torch.compiler.is_compiling()
        if fast and bool((t == t[:, :1]).all()):
            # one time per image: exactly the SiT computation
            return Conditioning(self._embed(t[:, 0], y)[:, None, :])
        if fast:
            # distinct (t, y) pairs through 1-D uniques (sort-based; unique(dim=0) is slow on CPU)
            ut, t_inv = torch.unique(t.reshape(-1), return_inverse=True)
            if 4 * ut.numel() <= B * N:
                uy, y_inv = torch.unique(y, return_inverse=True)
                key = y_inv[:, None] * ut.numel() + t_inv.view(B, N)
                ukey, inverse = torch.unique(key, return_inverse=True)
                if 4 * ukey.numel() <= B * N:
                    table = self._embed(ut[ukey % ut.numel()], uy[ukey // ut.numel()])
                    return Conditioning(table, inverse.view(B, N))
        emb = self._embed(t.reshape(-1), y[:, None].expand(B, N).reshape(-1))
        return Conditioning(emb.view(B, N, -1))

    # ---- forward ---------------------------------------------------------------------------

    def _check_inputs(self, x: Tensor, t: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor]:
        if x.dim() != 4 or x.shape[1] != self.in_channels or tuple(x.shape[2:]) != self.image_size:
            raise ValueError(
                f"x must have shape (B, {self.in_channels}, {self.image_size[0]}, {self.image_size[1]}), "
                f"got {tuple(x.shape)}"
            )
        B = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(B)
        if t.dim() == 1 and t.shape[0] == B:
            pass
        elif t.dim() == 2 and t.shape == (B, self.num_patches):
            if not self.per_patch_time:
                if not bool((t == t[:, :1]).all()):
                    raise ValueError(
                        "this model takes one time per image (per_patch_time=False) but t has "
                        "different values within a row; use a PFT model for per-patch times"
                    )
                t = t[:, 0]
        else:
            raise ValueError(f"t must have shape ({B},) or ({B}, {self.num_patches}), got {tuple(t.shape)}")
        if y is None:
            y = torch.full((B,), self.num_classes, dtype=torch.long, device=x.device)
        else:
            y = torch.as_tensor(y, device=x.device)
            if y.shape != (B,):
                raise ValueError(f"y must have shape ({B},), got {tuple(y.shape)}")
            if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
                raise ValueError(f"y must be an integer tensor of class labels, got dtype {y.dtype}")
            y = y.long()
        return t, y

    def unpatchify(self, tokens: Tensor) -> Tensor:
        """``(B, N, p * p * K)`` ordered (patch_row, patch_col, channel) -> ``(B, K, H, W)``."""
        B = tokens.shape[0]
        p = self.patch_size
        h, w = self.grid_size
        k = tokens.shape[-1] // (p * p)
        x = tokens.reshape(B, h, w, p, p, k)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(B, k, h * p, w * p)

    def forward(
        self, x: Tensor, t: Tensor, y: Tensor | None = None, *, return_projection: bool = False
    ) -> tuple[Tensor, Tensor | None] | tuple[Tensor, Tensor | None, Tensor]:
        """``(v, logvar)``; with ``return_projection`` (REPA training, see
        :meth:`forward_with_projection`) ``(v, logvar, z)``."""
        t, y = self._check_inputs(x, t, y)
        if return_projection and self.projector is None:
            raise ValueError(
                "this model has no REPA projector; build it with create_model(..., repa=dict(encoder_depth=..., "
                "z_dim=..., projector_dim=...))"
            )
        c = self.conditioning(t, y)
        h = self.x_embedder(x) + self.pos_embed
        z = None
        for i, block in enumerate(self.blocks):
            h = block(h, c)
            if return_projection and i + 1 == self.config.repa.encoder_depth:
                z = self.projector(h)
        out = self.unpatchify(self.final_layer(h, c))
        v, logvar = out, None
        if self.predict_uncertainty:
            # copies, not views of ``out``: torch.compile (2.13) mis-replays outputs that alias one another
            # in the training step (a garbage view shape); the copy costs one image-sized write
            v, logvar = out[:, : self.in_channels].contiguous(), out[:, self.in_channels :].contiguous()
        return (v, logvar, z) if return_projection else (v, logvar)

    def forward_cached(
        self, x: Tensor, t: Tensor, y: Tensor | None = None, *, store: KVStore, idx: Tensor | None = None
    ) -> Tensor:
        """The token-cache forward (:mod:`.token_cache`); ``x, t, y`` as in ``forward``.

        ``idx=None``: a full call, the same numbers as ``forward``, recording every block's keys
        and values in ``store``; returns the token outputs ``(B, N, p * p * K)`` (``K`` = channels
        plus the log-variance channel; :func:`~.token_cache.unpatchify` makes images of them).
        ``idx`` ``(B, n)`` long: a partial call on those tokens, attending to ``store``'s keys and
        values of the other tokens; returns ``(B, n, p * p * K)`` in the order of ``idx``.
        """
        t, y = self._check_inputs(x, t, y)
        if idx is None:
            c = self.conditioning(t, y)
            h = self.x_embedder(x) + self.pos_embed
        else:
            idx = check_active_index(idx, x.shape[0], self.num_patches)
            c = self.conditioning(t if t.dim() == 1 else gather_tokens(t, idx), y)
            h = self.x_embedder.forward_at(x, idx) + self.pos_embed[0][idx]
        for i, block in enumerate(self.blocks):
            h = block(h, c, store.layer(i, idx))
        return self.final_layer(h, c)

    def forward_with_projection(
        self, x: Tensor, t: Tensor, y: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        """The REPA training call: ``(v, logvar, z)``, ``z`` ``(B, N, z_dim)`` the projected hidden
        tokens after block ``config.repa.encoder_depth`` (same ``v``/``logvar`` as ``model(x, t, y)``)."""
        return self(x, t, y, return_projection=True)

    def extra_repr(self) -> str:
        c = self.config
        kind = "PFT" if c.per_patch_time else "SiT"
        return (
            f"kind={kind}, input_size={c.input_size}, patch_size={c.patch_size}, "
            f"in_channels={c.in_channels}, num_classes={c.num_classes}, "
            f"uncertainty={c.predict_uncertainty}"
            + (f", repa=(depth {c.repa.encoder_depth}, z_dim {c.repa.z_dim})" if c.repa is not None else "")
        )
