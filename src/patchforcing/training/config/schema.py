"""The schema of an experiment config: the section dataclasses, the allowed choices (the sampler
names from the registries) and helpers that walk the schema by dotted key. See
:mod:`patchforcing.training.config` for the file format."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ...sampling import SAMPLERS
from ..distributed import STRATEGIES

#: allowed ``data.kind`` values
DATA_KINDS: tuple[str, ...] = ("synthetic", "folder", "npz", "latents", "shards")
#: data kinds that read files and therefore need ``data.path``
_KINDS_WITH_PATH: tuple[str, ...] = ("folder", "npz", "latents", "shards")
#: data kinds that carry captions (text-to-image training, ``text.encoder`` set)
CAPTIONED_DATA_KINDS: tuple[str, ...] = ("folder", "npz", "shards")
#: allowed ``autoencoder.kind`` values (``auto``: from the latents' index or the VAE folder's config)
AUTOENCODER_CONFIG_KINDS: tuple[str, ...] = ("auto", "kl", "tiny", "flux2", "identity")
#: allowed ``train.precision`` values (``auto``: bf16 autocast on CUDA and on CPUs with native bf16
#: units (AMX, AVX-512 BF16), fp32 otherwise)
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")
#: allowed ``train.attention`` values: the attention kernel of training steps (``auto``: ``math`` for
#: bf16 on the CPU, ``sdpa`` otherwise; :func:`patchforcing.training.speed.resolve_attention_kernel`)
ATTENTION_CHOICES: tuple[str, ...] = ("auto", "sdpa", "math")
#: allowed ``optim.fused`` values (``true``/``false`` in YAML, or the text): AdamW's fused kernel
#: (``auto``: where torch has it for the device; :func:`patchforcing.training.speed.resolve_fused`)
FUSED_CHOICES: tuple[str, ...] = ("auto", "true", "false")
#: allowed ``train.strategy`` values (multi-process runs): ``ddp`` (default) or ``fsdp`` (FSDP2 sharding)
TRAIN_STRATEGIES: tuple[str, ...] = STRATEGIES
#: allowed ``repa.source`` values: the encoder runs in the training step, or features cached by ``encode``
REPA_SOURCES: tuple[str, ...] = ("online", "cached")
#: allowed ``sample.sampler`` values: the names in :data:`patchforcing.sampling.SAMPLERS`
SAMPLE_SAMPLERS: tuple[str, ...] = tuple(SAMPLERS)
#: keys that may differ between a checkpoint's config and the config used to resume from it
RESUME_SAFE_KEYS: tuple[str, ...] = (
    "train.max_steps",
    "train.ckpt_every",
    "train.sample_every",
    "train.val_every",
    "train.log_every",
    "train.keep_last",
    "train.progress",
    "data.num_workers",
    "train.device",
    "autoencoder.source",  # where the (same) VAE's weights are: e.g. a hub id, then a local copy
)
#: the top-level key of a config file naming the preset or file it inherits from
_BASE_KEY = "base"


class ConfigError(ValueError):
    """An invalid experiment config: unknown key, wrong type, invalid value or missing file."""


# --------------------------------------------------------------------------------------------
# schema
# --------------------------------------------------------------------------------------------


@dataclass
class ModelSection:
    """The network. ``name`` is a preset (``"PFT-B/2"``, ``"SiT-XL/2"``, ``"PFT-T/4"``, ...).

    ``input_size``/``in_channels``/``num_classes``: ``None`` takes them from the data (the
    resolution, or the latent size for ``data.kind: latents``; its channels; its classes).
    ``depth``/``hidden_size``/``num_heads``/``mlp_ratio``: ``None`` keeps the preset's value.
    """

    name: str = "PFT-T/2"
    input_size: int | None = None
    in_channels: int | None = None
    num_classes: int | None = None
    depth: int | None = None
    hidden_size: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None
    rope_jitter: float | None = None

    def preset_overrides(self) -> dict[str, Any]:
        """The architecture fields that are set (not ``None``), as ``create_model`` keyword
        arguments: ``create_model(name, input_size=..., ..., **section.preset_overrides())``.
        ``rope_jitter`` (text-to-image presets only): RoPE position jitter in patch cells during
        training (``null``: the preset's, 0.5 for the 1.2B presets, 0 for the tiny ones)."""
        keys = ("depth", "hidden_size", "num_heads", "mlp_ratio", "rope_jitter")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


@dataclass
class DataSection:
    """The training data. ``kind``: ``synthetic`` (built-in procedural shapes, no files),
    ``folder`` (ImageNet-layout image folder; with ``text.encoder``: images with sidecar ``.txt``
    captions), ``npz`` (uint8 image arrays; with ``text.encoder``: its ``captions`` array),
    ``latents`` (pre-encoded VAE latents made by ``patchforcing encode``) or ``shards`` (WebDataset
    ``.tar`` shards of captioned images, a brace pattern such as ``shards/{000000..000999}.tar``). ``path`` is required for all but
    ``synthetic``; a relative path is resolved against the current working directory.
    ``num_classes``/``length``: number of classes (default 8) and items of the synthetic set.
    ``val_size`` items are held out for the validation loss."""

    kind: str = "synthetic"
    path: str | None = None
    resolution: int = 32
    flip: bool = True
    num_classes: int | None = None
    length: int | None = None
    seed: int = 0
    num_workers: int = 0
    val_size: int = 256


@dataclass
class AutoencoderSection:
    """The autoencoder between images and the model's space (:mod:`patchforcing.autoencoders`):
    it encodes online, decodes the sample grids and is recorded in checkpoints and exports.

    ``kind``: ``auto`` (from the latents' index or the VAE folder's ``config.json``), ``kl`` (SD
    VAE, diffusers ``AutoencoderKL``), ``tiny`` (TAESD), ``flux2`` (the FLUX.2 VAE, 32 channels,
    diffusers ``AutoencoderKLFlux2``) or ``identity`` (pixel space).
    ``source``: hub id (``stabilityai/sd-vae-ft-ema``) or local VAE folder; with ``data.kind:
    latents``, ``null`` = the VAE recorded in the latents' index, and a value only says where that
    VAE's weights are (e.g. a local copy). ``scale_factor``, ``shift_factor`` (scalar) or
    ``latents_mean``/``latents_std`` (per channel, both): the latent scaling
    ``(z - shift) * scale_factor / std``; ``null`` = the latents' stored scaling (or the VAE
    config's: 0.18215 for the SD VAE). ``online``: encode the images of a ``synthetic``/``folder``/
    ``npz`` data set with the VAE in the training loop (posterior samples; small data sets)."""

    kind: str = "auto"
    source: str | None = None
    scale_factor: float | None = None
    shift_factor: float | None = None
    latents_mean: list[float] | None = None
    latents_std: list[float] | None = None
    online: bool = False


@dataclass
class ObjectiveSection:
    """The training objective: per-patch timestep sampler (``timestep_options`` are its keyword
    arguments), the weight lambda of the uncertainty (Gaussian NLL) term and the probability of
    replacing a label by the null class."""

    timestep_sampler: str = "ltg"
    timestep_options: dict[str, Any] = field(default_factory=dict)
    uncertainty_weight: float = 0.01
    label_dropout: float = 0.1


@dataclass
class OptimSection:
    """AdamW with linear warm-up then a constant rate. ``batch_size`` is the GLOBAL batch (over
    all ranks and ``grad_accum`` micro-steps); ``grad_clip`` is the max gradient norm (0: off).
    ``fused``: AdamW's fused kernel (``true``), its multi-tensor one (``false``) or ``auto`` (fused on
    CPU and CUDA: same update to float32 rounding, ~3x faster optimiser step on a CPU)."""

    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 1000
    grad_clip: float = 1.0
    batch_size: int = 256
    grad_accum: int = 1
    fused: bool | str = "auto"


@dataclass
class EmaSection:
    """Exponential moving average of the weights, updated every step; with ``warmup`` the decay
    at step k is ``min(decay, (1 + k) / (10 + k))``."""

    decay: float = 0.9999
    warmup: bool = True


@dataclass
class SampleSection:
    """Samples drawn during training (from the EMA): sampler, steps, how many, CFG scale, seed;
    ``options`` are extra keyword arguments of the sampler."""

    sampler: str = "euler_pf"
    steps: int = 50
    num: int = 64
    cfg_scale: float = 1.0
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainSection:
    """The loop: step budget, seed, precision (``auto``: bf16 on CUDA and on CPUs with native bf16 units, else fp32), intervals
    (in optimizer steps) of logging, checkpoints (``keep_last`` kept), samples and validation
    (``val_every: null`` = ``sample_every``), device (``auto``, ``cpu``, ``cuda``, ``cuda:1``, ...).
    ``strategy``: how a torchrun (multi-process) run splits the work: ``ddp`` (every rank holds the
    whole model) or ``fsdp`` (FSDP2: weights, gradients, AdamW state and EMA sharded over the ranks,
    for models that do not fit one device; :mod:`patchforcing.training.distributed`). A single
    process ignores it; checkpoints are the same single file either way.
    ``attention``: the attention kernel of the training steps, ``sdpa`` (PyTorch's fused kernel),
    ``math`` (explicit matmuls, softmax in fp32) or ``auto`` (``math`` for bf16 on a CPU, where SDPA's
    bf16 backward is slow, ``sdpa`` otherwise); the EMA and sampling always use ``sdpa``.
    ``compile``: ``torch.compile`` the model for the training steps, checked first: one forward/backward of
    the training loss through a randomly weighted copy, compiled and eager, must give the same gradients
    (:func:`patchforcing.utils.compile.checked_compile`); when the default inductor code disagrees, a CPU
    run tries the AVX2 code generator, and else trains eagerly; the run prints what it chose."""

    max_steps: int = 400000
    seed: int = 0
    precision: str = "auto"
    compile: bool = False
    attention: str = "auto"
    log_every: int = 50
    ckpt_every: int = 5000
    keep_last: int = 3
    sample_every: int = 5000
    val_every: int | None = None
    device: str = "auto"
    progress: bool = True
    strategy: str = "ddp"


@dataclass
class RepaSection:
    """REPA, representation alignment (``docs/repa.md``): with ``enabled`` the model gets a projector
    (``encoder_depth``, ``projector_dim``, ``z_dim``; ``null`` = the encoder's width) and the loss
    adds ``weight`` times the negative cosine similarity of its projected tokens to a frozen
    encoder's patch features of the clean image. ``encoder``: ``dinov2-b`` (``-s``, ``-l``, ``-g``),
    a DINOv2 hub id or local directory, or ``classifier:CKPT`` (offline); ``resolution``: the
    DINOv2 input side (``null``: 224 for 256-pixel images). ``source``: ``online`` (the encoder
    runs in the training step on the images, decoded from latents for ``data.kind: latents``) or
    ``cached`` (features stored by ``patchforcing encode --repa-encoder``; ``encoder`` may be
    ``null`` = the store's)."""

    enabled: bool = False
    encoder: str | None = None
    encoder_depth: int = 8
    z_dim: int | None = None
    projector_dim: int = 2048
    weight: float = 0.5
    source: str = "online"
    resolution: int | None = None


@dataclass
class TextSection:
    """Text-to-image conditioning (``docs/t2i.md``): with ``encoder`` set the model is a T2I preset
    (``PFT-T2I-...``) conditioned on a frozen text encoder's states of each image's caption.
    ``encoder``: ``minilm`` (offline), a hub id (``Qwen/Qwen3-VL-Embedding-2B``) or a local
    directory; ``max_length``: tokens per caption (``null``: the encoder family's default).
    Caption embeddings are computed once and cached in ``cache_dir`` (``null``:
    ``$PATCHFORCING_CACHE/caption-embeddings``), keyed by the encoder's fingerprint and the caption.
    ``objective.label_dropout`` replaces captions by the empty caption (CFG dropout). The sample
    grids show ``prompts`` (``null``: the first validation captions), ``per_prompt`` samples each."""

    encoder: str | None = None
    max_length: int | None = None
    cache_dir: str | None = None
    prompts: list[str] | None = None
    per_prompt: int = 4


@dataclass
class ExperimentConfig:
    """A whole experiment: a name (the run directory is ``runs/<name>``) and its sections."""

    name: str = "experiment"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    autoencoder: AutoencoderSection = field(default_factory=AutoencoderSection)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    optim: OptimSection = field(default_factory=OptimSection)
    ema: EmaSection = field(default_factory=EmaSection)
    sample: SampleSection = field(default_factory=SampleSection)
    train: TrainSection = field(default_factory=TrainSection)
    repa: RepaSection = field(default_factory=RepaSection)
    text: TextSection = field(default_factory=TextSection)


def _field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved type annotation, in declaration order."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _is_freeform(tp: Any) -> bool:
    return tp is dict or typing.get_origin(tp) is dict


#: section name -> its dataclass
_SECTIONS: dict[str, type] = {k: tp for k, tp in _field_types(ExperimentConfig).items() if _is_section(tp)}
#: (section, key) of the free-form mappings (one value each: a given mapping replaces, not merges)
_FREEFORM: tuple[tuple[str, str], ...] = tuple(
    (s, k) for s, cls in _SECTIONS.items() for k, tp in _field_types(cls).items() if _is_freeform(tp)
)


def _schema_lookup(parts: Sequence[str]) -> tuple[str, Any]:
    """What the dotted key ``parts`` names in the schema: ``("section", cls)``, ``("freeform", tp)``
    (a free-form mapping or a key inside one), ``("field", tp)``, ``("unknown", valid_keys)`` or
    ``("below", dotted_field)`` (a key under a plain field)."""
    cls: Any = ExperimentConfig
    for i, part in enumerate(parts):
        ftypes = _field_types(cls)
        if part not in ftypes:
            return "unknown", list(ftypes)
        tp = ftypes[part]
        if _is_freeform(tp):
            return "freeform", tp
        if not _is_section(tp):
            return ("field", tp) if i == len(parts) - 1 else ("below", ".".join(parts[: i + 1]))
        cls = tp
    return "section", cls


def _type_name(tp: Any) -> str:
    """Human-readable name of a field type: ``int``, ``int or null``, ``list of float``, ``mapping``."""
    if tp is type(None):
        return "null"
    if _is_freeform(tp) or _is_section(tp):
        return "mapping"
    args = typing.get_args(tp)
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(args[0])}"
    if args:  # X | None
        return " or ".join(_type_name(a) for a in args)
    return tp.__name__


def _accepts_str(tp: Any) -> bool:
    return tp is str or str in typing.get_args(tp)
