"""Sampling at scale: many images, any number of processes, resumable, ADM ``.npz`` output.

Sample ``i``'s noise and label (or prompt) depend only on ``(seed, i)`` and the network's output
for a sample does not depend on its batch-mates (the model evaluates its per-conditioning layers
batch-invariantly), so the result is the same for any number of processes and any batch size
(bitwise on CPU in fp32; on GPUs up to the kernels' own determinism).

A text-conditioned model takes ``prompts`` (sample ``i`` gets
``prompts[(i // samples_per_prompt) % len(prompts)]``) and a text encoder given at run time
(``captions -> TextEmbeddings``, not part of the spec). The prompts are encoded by a
:class:`PromptBank`: in fixed chunks of consecutive prompts, every row brought to one token length
for the whole run, so a sample's text embedding never depends on its batch either.

Work is split in shards of ``shard_size`` consecutive indices; rank ``r`` of ``W`` generates
the shards ``j`` with ``j % W == r`` and writes each one atomically to ``OUT.parts/``. Finished
shards are skipped on a rerun, but only when ``OUT.parts/settings.json`` (written before the first
shard) shows they were made with the same settings: the model's weights (sha256 of its
state_dict), sampler and options, steps / NFE, time grid, guidance, labels, seed, shard size,
precision and decoder; for text, the sha256 of the prompt list and the text encoder's fingerprint.
Other settings are refused (:class:`ShardSettingsError`, naming the differences) unless
``overwrite=True`` re-samples everything. Rank 0 then streams the shards, in index order, into one
ADM ``.npz`` (``arr_0`` uint8 NHWC, ``labels``; for text also ``captions`` (N,) str and
``prompt_index`` (N,) int64, ``labels`` all -1) without holding the images in memory, and writes
``OUT.json`` with the sampler, its options, steps, NFE, CFG and images/s.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..conditioning import TextEmbeddings, condition_kind
from ..utils.images import to_uint8
from ..utils.io import atomic_write, clean_temp_files, read_json, save_npz_atomic, write_json_atomic
from ..utils.seeding import indexed_randn, item_hash
from .api import SampleResult, _check_count, accepts_any_size, check_precision, sample
from .cache import TokenCache
from .guidance import check_guidance
from .samplers import SAMPLERS, make_sampler, resolve_quantile_alias

__all__ = [
    "GenerationSpec",
    "ShardSettingsError",
    "SETTINGS_FILE",
    "model_sha256",
    "sampling_settings",
    "sample_noise",
    "sample_labels",
    "sample_shape",
    "prompt_indices",
    "sample_prompts",
    "prompts_sha256",
    "encoder_fingerprint",
    "PromptBank",
    "PROMPT_CHUNK",
    "sample_indices",
    "generate",
    "merge_shards",
]

_NOISE_SALT = 0x6E6F697365  # "noise"
_LABEL_SALT = 0x6C6162656C  # "label"
SHARDS_FORMAT = "patchforcing-sample-shards"
SHARDS_VERSION = 1
#: the settings record beside the shards, in ``OUT.parts/``
SETTINGS_FILE = "settings.json"
#: prompts are encoded in chunks of this many consecutive prompts (part of a run's settings)
PROMPT_CHUNK = 64

#: a text encoder: ``B`` captions -> :class:`~patchforcing.conditioning.TextEmbeddings` of ``B`` rows
TextEncoderFn = Callable[[list[str]], TextEmbeddings]


class ShardSettingsError(ValueError):
    """``OUT.parts/`` holds shards made with other settings (or with no settings record)."""


@dataclass
class GenerationSpec:
    """What to generate.

    Attributes:
        num_samples: images in total.
        batch_size: images per network batch (memory only; results do not depend on it).
        seed: the seed of every sample's noise and label.
        sampler, steps, nfe, cfg_scale, guidance_interval, options: as in :func:`~patchforcing.sample`
            (checked here, before any work; ``p`` in ``options`` becomes ``quantile``).
        labels: ``"uniform"`` (i.i.d. uniform classes), ``"balanced"`` (``i % K``), or given by
            ``classes`` (cycled).
        classes: explicit class list (``--classes 1,2,3``).
        shard_size: indices per shard file.
        prompts: captions of a text-conditioned model: sample ``i`` takes
            ``prompts[(i // samples_per_prompt) % len(prompts)]`` (cycled; one per index when
            ``len(prompts) == num_samples``). Not for class models.
        samples_per_prompt: consecutive samples per prompt (e.g. a grid row per prompt).
        image_size: model-space ``(H, W)`` of the samples; default the model's ``image_size``
            (a model that takes any size, e.g. the T2I one, takes any ``H, W`` divisible by its patch).
        cache: token caching (:class:`~patchforcing.sampling.cache.TokenCache`), ``None`` for dense calls.
        precision: the network's precision, ``"fp32"`` (default) or ``"bf16"`` (autocast; see
            :func:`~patchforcing.sample`). Part of the settings record (a ``"bf16"`` record never
            matches an ``"fp32"`` one).
    """

    num_samples: int
    batch_size: int = 64
    seed: int = 0
    sampler: str = "euler_pf"
    steps: int | None = None
    nfe: int | None = None
    cfg_scale: float = 1.0
    guidance_interval: tuple[float, float] | None = None
    labels: str = "uniform"
    classes: list[int] | None = None
    shard_size: int = 1000
    options: dict[str, Any] = field(default_factory=dict)
    prompts: list[str] | None = None
    samples_per_prompt: int = 1
    image_size: tuple[int, int] | None = None
    cache: TokenCache | None = None
    precision: str = "fp32"

    def __post_init__(self) -> None:
        self.precision = check_precision(self.precision)
        if self.cache is not None and not isinstance(self.cache, TokenCache):
            raise ValueError(f"cache must be a TokenCache or None, got {type(self.cache).__name__}")
        if self.prompts is not None:
            if isinstance(self.prompts, str):
                raise ValueError("prompts must be a list of strings, not one string")
            self.prompts = list(self.prompts)
            if not self.prompts:
                raise ValueError("prompts must be a non-empty list of strings")
            bad = [p for p in self.prompts if not isinstance(p, str)]
            if bad:
                raise ValueError(f"prompts must be strings, got {type(bad[0]).__name__} {bad[0]!r}")
            if self.classes is not None:
                raise ValueError("give prompts (a text model) or classes (a class model), not both")
        if (
            isinstance(self.samples_per_prompt, bool)
            or not isinstance(self.samples_per_prompt, int)
            or self.samples_per_prompt < 1
        ):
            raise ValueError(f"samples_per_prompt must be an integer >= 1, got {self.samples_per_prompt!r}")
        if self.image_size is not None:
            size = tuple(self.image_size)
            if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size):
                raise ValueError(f"image_size must be two positive integers (H, W), got {self.image_size!r}")
            self.image_size = size
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.batch_size < 1 or self.shard_size < 1:
            raise ValueError("batch_size and shard_size must be >= 1")
        if self.labels not in ("uniform", "balanced", "given"):
            raise ValueError(f"labels must be 'uniform', 'balanced' or 'given', got {self.labels!r}")
        if self.classes is not None:
            self.labels = "given"
        if self.labels == "given" and not self.classes:
            raise ValueError("labels='given' needs a non-empty classes list")
        if self.steps is not None and self.nfe is not None:
            raise ValueError("give either steps or an NFE budget, not both")
        if self.steps is not None:
            _check_count("steps", self.steps)
        if self.nfe is not None:
            _check_count("nfe", self.nfe)
        self.cfg_scale, self.guidance_interval = check_guidance(self.cfg_scale, self.guidance_interval)
        cls = SAMPLERS.get(self.sampler)
        if cls is not None and "quantile" in cls.__dataclass_fields__:
            self.options = resolve_quantile_alias(self.sampler, dict(self.options))
        make_sampler(self.sampler, **self.options)  # unknown sampler / option / bad value: refused now


def sample_noise(seed: int, indices: Sequence[int], shape: Sequence[int]) -> Tensor:
    """``(len(indices), *shape)`` float32 standard normal noise; row ``k`` depends only on
    ``(seed, indices[k])``."""
    return indexed_randn(_NOISE_SALT, seed, indices, shape)


def sample_labels(spec: GenerationSpec, indices: Sequence[int], num_classes: int) -> Tensor | None:
    """``(len(indices),)`` long labels (``None`` for an unconditional model); label ``k`` depends
    only on ``(seed, indices[k])``."""
    if spec.labels == "given":
        bad = [c for c in spec.classes if not 0 <= c < max(num_classes, 1)]
        if bad:
            raise ValueError(f"classes {bad} are outside [0, {num_classes - 1}]")
        return torch.tensor([spec.classes[i % len(spec.classes)] for i in indices], dtype=torch.long)
    if num_classes == 0:
        return None
    if spec.labels == "balanced":
        return torch.tensor([i % num_classes for i in indices], dtype=torch.long)
    return torch.tensor([item_hash(_LABEL_SALT, spec.seed, i) % num_classes for i in indices], dtype=torch.long)


def sample_shape(model: nn.Module, spec: GenerationSpec) -> tuple[int, int, int]:
    """``(C, H, W)`` of a sample in model space: ``spec.image_size`` or the model's own size.

    Raises:
        ValueError: a size the model does not take (another size for a fixed-size model, or
            one not divisible by the patch size).
    """
    C = int(model.in_channels)
    default = getattr(model, "image_size", None)
    size = spec.image_size if spec.image_size is not None else default
    if size is None:
        raise ValueError("this model has no default image_size: give GenerationSpec(image_size=(H, W))")
    H, W = map(int, size)
    if accepts_any_size(model):
        p = int(getattr(model, "patch_size", 1))
        if H % p or W % p:
            raise ValueError(f"image_size ({H}, {W}) is not divisible by the model's patch size {p}")
    elif default is not None and (H, W) != tuple(map(int, default)):
        raise ValueError(f"this model samples at {tuple(map(int, default))} only, got image_size ({H}, {W})")
    return C, H, W


def prompt_indices(spec: GenerationSpec, indices: Sequence[int]) -> Tensor:
    """``(len(indices),)`` long: the prompt of each sample, ``(i // samples_per_prompt) % len(prompts)``."""
    if spec.prompts is None:
        raise ValueError("the spec has no prompts")
    n, r = len(spec.prompts), spec.samples_per_prompt
    return torch.tensor([(int(i) // r) % n for i in indices], dtype=torch.long)


def sample_prompts(spec: GenerationSpec, indices: Sequence[int]) -> list[str]:
    """The caption of each sample (see :func:`prompt_indices`)."""
    return [spec.prompts[j] for j in prompt_indices(spec, indices).tolist()]


def prompts_sha256(prompts: Sequence[str]) -> str:
    """sha256 of a prompt list (order and content; UTF-8 JSON)."""
    return hashlib.sha256(json.dumps(list(prompts), ensure_ascii=False).encode("utf-8")).hexdigest()


def encoder_fingerprint(encoder: Any) -> str:
    """A text encoder's ``fingerprint`` (weights, tokenizer, max length); ``"custom"`` for a plain
    callable without one (then a resume cannot tell two such encoders apart)."""
    if isinstance(encoder, PromptBank):
        encoder = encoder.encoder
    fp = getattr(encoder, "fingerprint", None)
    return str(fp) if fp else "custom"


class PromptBank:
    """Text embeddings of a run's prompts that do not depend on how the run is batched.

    The prompts are encoded in fixed chunks of ``chunk_size`` consecutive prompts (prompt ``j``
    in chunk ``j // chunk_size``), so the encoder always sees the same batches; every row is then
    padded (or trimmed of padding) to one token length for the whole run -- the longest caption's,
    found by encoding every chunk once the first time rows are asked for -- and carries the empty
    caption of chunk 0 as its null value. A sample's text input is thus the same in any batch, on
    any rank and on every rerun. Recently used chunks are kept (up to ``cache_bytes``).

    Args:
        prompts: ``P`` captions.
        encoder: ``list[str] -> TextEmbeddings`` (e.g. ``pf.load_text_encoder(...)``).
        device: where the embeddings are kept (``None``: where the encoder puts them).
    """

    def __init__(
        self,
        prompts: Sequence[str],
        encoder: TextEncoderFn,
        *,
        device: torch.device | str | None = None,
        chunk_size: int = PROMPT_CHUNK,
        cache_bytes: int = 256 << 20,
    ):
        if not callable(encoder):
            raise ValueError(f"the text encoder must be callable (captions -> TextEmbeddings), got {encoder!r}")
        self.prompts = list(prompts)
        if not self.prompts:
            raise ValueError("a PromptBank needs at least one prompt")
        self.encoder = encoder
        self.device = device
        self.chunk_size = int(chunk_size)
        self.cache_bytes = int(cache_bytes)
        self._chunks: OrderedDict[int, TextEmbeddings] = OrderedDict()
        self._length: int | None = None
        self._null: tuple[Tensor, Tensor] | None = None

    @property
    def num_chunks(self) -> int:
        return math.ceil(len(self.prompts) / self.chunk_size)

    def _encode(self, c: int) -> TextEmbeddings:
        captions = self.prompts[c * self.chunk_size : (c + 1) * self.chunk_size]
        with torch.no_grad():
            emb = self.encoder(captions)
        if not isinstance(emb, TextEmbeddings):
            raise ValueError(f"the text encoder must return TextEmbeddings, got {type(emb).__name__}")
        if emb.batch_size != len(captions):
            raise ValueError(f"the text encoder returned {emb.batch_size} rows for {len(captions)} captions")
        return emb if self.device is None else emb.to(self.device)

    def _keep(self, c: int, emb: TextEmbeddings) -> None:
        self._chunks[c] = emb
        self._chunks.move_to_end(c)
        total = sum(e.tokens.nbytes + e.mask.nbytes for e in self._chunks.values())
        while len(self._chunks) > 1 and total > self.cache_bytes:
            _, old = self._chunks.popitem(last=False)
            total -= old.tokens.nbytes + old.mask.nbytes

    def _chunk(self, c: int) -> TextEmbeddings:
        emb = self._chunks.get(c)
        if emb is None:
            emb = self._encode(c)
        self._keep(c, emb)
        return emb

    @property
    def length(self) -> int:
        """The run's token length: the longest caption's real tokens over all prompts (>= 1)."""
        if self._length is None:
            longest = 1
            for c in range(self.num_chunks):
                emb = self._chunk(c)
                if c == 0:
                    self._null = (emb.null_tokens, emb.null_mask)
                longest = max(longest, emb.real_length)
            self._length = longest
        return self._length

    def __call__(self, prompt_ids: Sequence[int]) -> TextEmbeddings:
        """Embeddings of prompts ``prompt_ids`` (``M`` indices into ``prompts``): ``(M, length, D)``."""
        ids = [int(j) for j in prompt_ids]
        if not ids:
            raise ValueError("no prompt indices given")
        bad = [j for j in ids if not 0 <= j < len(self.prompts)]
        if bad:
            raise ValueError(f"prompt indices {bad[:5]} are outside [0, {len(self.prompts) - 1}]")
        L = self.length
        assert self._null is not None
        chunks = sorted({j // self.chunk_size for j in ids})
        offset, tokens, masks = {}, [], []
        for c in chunks:
            emb = self._chunk(c).with_length(L)
            offset[c] = sum(t.shape[0] for t in tokens)
            tokens.append(emb.tokens)
            masks.append(emb.mask)
        rows = torch.tensor([offset[j // self.chunk_size] + j % self.chunk_size for j in ids], device=tokens[0].device)
        return TextEmbeddings(torch.cat(tokens)[rows], torch.cat(masks)[rows], *self._null)


# --------------------------------------------------------------------------------------------
# the settings record
# --------------------------------------------------------------------------------------------


def _prompt_bank(
    model: nn.Module, spec: GenerationSpec, encoder: TextEncoderFn | PromptBank | None, device: Any
) -> PromptBank | None:
    """The :class:`PromptBank` of a text model's run (``None`` for a class model); checks that
    prompts and encoder come with a text model and only with one."""
    if condition_kind(model) != "text":
        if spec.prompts is not None:
            raise ValueError("this is a class-conditional model: it takes labels / classes, not prompts")
        if encoder is not None:
            raise ValueError("this is a class-conditional model: a text encoder is only for text-conditioned models")
        return None
    if spec.prompts is None:
        raise ValueError(
            "this is a text-conditioned model: give prompts (GenerationSpec(prompts=[...]); --prompt / --prompts)"
        )
    if encoder is None:
        raise ValueError(
            "this is a text-conditioned model: pass its text encoder (encoder=..., captions -> TextEmbeddings, "
            "e.g. pf.load_text_encoder(SPEC))"
        )
    if isinstance(encoder, PromptBank):
        if encoder.prompts != spec.prompts:
            raise ValueError("the PromptBank was made for other prompts than the spec's")
        return encoder
    return PromptBank(spec.prompts, encoder, device=device)


def sample_indices(
    model: nn.Module,
    spec: GenerationSpec,
    indices: Sequence[int],
    *,
    device: torch.device | str = "cpu",
    decode: Callable[[Tensor], Tensor] | None = None,
    progress: bool = False,
    encoder: TextEncoderFn | PromptBank | None = None,
) -> tuple[Tensor, Tensor | None, SampleResult]:
    """Samples ``indices`` of a run: their noise and labels (prompts) depend only on ``(spec.seed, i)``.

    Args:
        encoder: a text model's encoder (``captions -> TextEmbeddings``) or the run's
            :class:`PromptBank` (reused across calls; a plain encoder gets a new bank each call).
    Returns:
        ``(x, y, result)``: ``x`` (len(indices), C, H, W) decoded to images when ``decode`` is given
        (model space otherwise); ``y`` (len(indices),) on the CPU: the labels of a class model
        (``None`` for an unconditional one) or, for a text model, the prompt indices into
        ``spec.prompts``; and the sampler's :class:`SampleResult`.
    """
    indices = [int(i) for i in indices]
    bank = _prompt_bank(model, spec, encoder, device)
    noise = sample_noise(spec.seed, indices, sample_shape(model, spec)).to(device)
    if bank is not None:
        y = prompt_indices(spec, indices)
        cond: dict[str, Any] = {"text": bank(y.tolist())}
    else:
        y = sample_labels(spec, indices, model.num_classes)
        cond = {"y": None if y is None else y.to(device)}
    res = sample(
        model,
        noise,
        spec.sampler,
        spec.steps,
        nfe=spec.nfe,
        **cond,
        cfg_scale=spec.cfg_scale,
        guidance_interval=spec.guidance_interval,
        cache=spec.cache,
        precision=spec.precision,
        progress=progress,
        **spec.options,
    )
    return (decode(res.x) if decode is not None else res.x), y, res


def model_sha256(model: nn.Module) -> str:
    """sha256 of a model's ``state_dict``: every tensor's name, dtype, shape and bytes, in key
    order (the same on any device; one tensor on the CPU at a time)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _model_dtype(model: nn.Module) -> str:
    for t in model.parameters():
        return str(t.dtype).replace("torch.", "")
    return "float32"


def sampling_settings(
    model: nn.Module,
    spec: GenerationSpec,
    *,
    decode: Callable[[Tensor], Tensor] | None = None,
    meta: dict[str, Any] | None = None,
    encoder: TextEncoderFn | PromptBank | None = None,
) -> dict[str, Any]:
    """Everything the images of a shard depend on (the record kept beside the shards).

    ``meta`` may give ``model_sha256`` (else the state_dict is hashed), ``vae`` or ``decode``
    (a JSON description of the decoder; a custom ``decode`` without one is recorded as ``"custom"``)
    and ``text_encoder`` (else :func:`encoder_fingerprint`). For a text model the record holds the
    prompt list's sha256, its length, ``samples_per_prompt`` and the encoder's fingerprint (these
    entries are ``None`` for a class model, so class records read as before).
    Batch size, world size and ``num_samples`` are not part of it (results do not depend on them).
    """
    meta = meta or {}
    text = _prompt_bank(model, spec, encoder, None) is not None
    sampler = make_sampler(spec.sampler, **spec.options)
    if "decode" in meta:
        decoder: Any = meta["decode"]
    elif "vae" in meta:
        decoder = meta["vae"]
    else:
        decoder = None if decode is None else "custom"
    settings = {
        "format": SHARDS_FORMAT,
        "version": SHARDS_VERSION,
        "model_sha256": str(meta.get("model_sha256") or model_sha256(model)),
        "model": type(model).__name__,
        "image_shape": list(sample_shape(model, spec)),
        "num_classes": None if getattr(model, "num_classes", None) is None else int(model.num_classes),
        "dtype": _model_dtype(model),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "sampler": sampler.name,
        "options": sampler.options(),
        "steps": spec.steps,
        "nfe": spec.nfe,
        "time_grid": "uniform",
        "cfg_scale": spec.cfg_scale,
        "guidance_interval": None if spec.guidance_interval is None else list(spec.guidance_interval),
        "guide_uncertainty": True,
        **({"cache": spec.cache.options()} if spec.cache is not None else {}),
        **({"precision": spec.precision} if spec.precision != "fp32" else {}),  # fp32 records read as before
        "labels": None if text else spec.labels,
        "classes": None if spec.classes is None else [int(c) for c in spec.classes],
        "prompts_sha256": prompts_sha256(spec.prompts) if text else None,
        "num_prompts": len(spec.prompts) if text else None,
        "samples_per_prompt": spec.samples_per_prompt if text else None,
        "prompt_chunk": PROMPT_CHUNK if text else None,
        "text_encoder": str(meta.get("text_encoder") or encoder_fingerprint(encoder)) if text else None,
        "seed": int(spec.seed),
        "shard_size": int(spec.shard_size),
        "decode": decoder,
    }
    return json.loads(json.dumps(settings, default=str))  # as it reads back from the file


def _short(v: Any) -> str:
    text = json.dumps(v, default=str)
    return text if len(text) <= 70 else text[:67] + "..."


def _settings_diff(old: Any, new: dict[str, Any]) -> list[str]:
    if not isinstance(old, dict):
        return ["(unreadable record)"]
    return [
        f"{k}: {_short(old.get(k))} -> {_short(new.get(k))}"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]


def _prepare_parts(
    parts: Path, settings: dict[str, Any], overwrite: bool, rank: int, world_size: int, n_shards: int
) -> None:
    """Check (or write) the settings record; with ``overwrite`` drop this rank's shards first.

    Every rank calls this on its own (no barrier needed): the record is written atomically before
    any shard, ranks only delete their own shards, and equal settings give equal records."""
    record = parts / SETTINGS_FILE
    shards = sorted(parts.glob("shard_*.npz"))
    if overwrite:
        for path in shards:
            j = int(path.stem.split("_")[1])
            if (j < n_shards and j % world_size == rank) or (j >= n_shards and rank == 0):
                path.unlink(missing_ok=True)
        (parts / f"rank_{rank:04d}.json").unlink(missing_ok=True)
        write_json_atomic(record, settings)
        return
    if record.is_file():
        try:
            old = read_json(record)
        except ValueError:
            old = None
        diff = _settings_diff(old, settings)
        if diff:
            raise ShardSettingsError(
                f"{parts} holds samples made with other settings ({'; '.join(diff)}); they would be mixed with "
                "the new ones. Choose another output, or re-sample everything with overwrite=True (--overwrite)"
            )
        return
    if shards:
        raise ShardSettingsError(
            f"{parts} holds {len(shards)} shard(s) but no {SETTINGS_FILE} (made by an older patchforcing?), so their "
            "settings are unknown. Choose another output, or re-sample everything with overwrite=True (--overwrite)"
        )
    write_json_atomic(record, settings)


def _shard_path(parts: Path, j: int) -> Path:
    return parts / f"shard_{j:06d}.npz"


def _shard_done(path: Path, lo: int, hi: int, text: bool = False) -> bool:
    try:
        with np.load(path, allow_pickle=False) as z:
            n = hi - lo
            return (
                z["arr_0"].shape[0] == n
                and z["labels"].shape[0] == n
                and np.array_equal(z["indices"], np.arange(lo, hi, dtype=np.int64))
                and (not text or (z["captions"].shape[0] == n and z["prompt_index"].shape[0] == n))
            )
    except Exception:  # missing, truncated, or not an npz: redo it
        return False


def generate(
    model: nn.Module,
    spec: GenerationSpec,
    out: str | Path,
    *,
    decode: Callable[[Tensor], Tensor] | None = None,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    barrier: Callable[[], None] | None = None,
    progress: bool = True,
    meta: dict[str, Any] | None = None,
    overwrite: bool = False,
    encoder: TextEncoderFn | PromptBank | None = None,
) -> Path | None:
    """Generate ``spec.num_samples`` images into the ADM ``.npz`` ``out`` (this rank's share).

    Args:
        model: the network (eval mode) on ``device``.
        encoder: a text model's encoder, ``list[str] -> TextEmbeddings`` (e.g.
            ``pf.load_text_encoder(SPEC, device=device)``; its ``fingerprint`` enters the settings
            record). Required for a text model (with ``spec.prompts``), refused for a class model.
        decode: latents ``(B, c, h, w)`` -> images ``(B, 3, H, W)`` in [-1, 1] (``None`` for pixel models).
        rank, world_size, barrier: the process group (``barrier`` waits for all ranks).
        meta: extra entries for ``OUT.json`` (e.g. the checkpoint path); ``model_sha256`` and
            ``vae`` / ``decode`` also enter the settings record (:func:`sampling_settings`).
        overwrite: re-sample every shard even if ``OUT.parts/`` holds finished ones (made with
            these or other settings).
    Returns:
        the merged ``.npz`` on rank 0, ``None`` elsewhere.
    Raises:
        ShardSettingsError: ``OUT.parts/`` holds shards made with other settings (the message
            names the differences) and ``overwrite`` is off.
        NonFiniteSampleError: the network produced NaN/inf (nothing of that batch is written).
    """
    out = Path(out)
    if out.suffix != ".npz":
        raise ValueError(f"output must be an .npz file, got {out}")
    bank = _prompt_bank(model, spec, encoder, device)  # wrong kind of conditioning: refused before any file
    sample_shape(model, spec)  # a size the model does not take: likewise
    text = bank is not None
    parts = out.with_name(out.name + ".parts")
    parts.mkdir(parents=True, exist_ok=True)
    if world_size == 1:
        clean_temp_files(parts)  # left by a killed run (under torchrun another rank may be writing)
    n_shards = math.ceil(spec.num_samples / spec.shard_size)
    settings = sampling_settings(model, spec, decode=decode, meta=meta, encoder=bank)
    _prepare_parts(parts, settings, overwrite, rank, world_size, n_shards)
    mine = [j for j in range(n_shards) if j % world_size == rank]
    todo = []
    for j in mine:
        lo, hi = j * spec.shard_size, min((j + 1) * spec.shard_size, spec.num_samples)
        if not _shard_done(_shard_path(parts, j), lo, hi, text):
            todo.append((j, lo, hi))
    total = sum(hi - lo for _, lo, hi in todo)
    bar = tqdm(total=total, desc=f"sampling [rank {rank}]", disable=not progress, dynamic_ncols=True)
    stats: dict[str, Any] = {}
    flops = {"token_flops": 0, "full_flops": 0}
    seconds, made = 0.0, 0
    for j, lo, hi in todo:
        images, labels, prompt_ids = [], [], []
        for b in range(lo, hi, spec.batch_size):
            idx = list(range(b, min(b + spec.batch_size, hi)))
            t0 = time.perf_counter()
            x, y, res = sample_indices(model, spec, idx, device=device, decode=decode, encoder=bank)
            images.append(to_uint8(x).permute(0, 2, 3, 1).cpu().numpy())
            seconds += time.perf_counter() - t0
            made += len(idx)
            if text:
                prompt_ids.append(y.numpy())
                y = None
            labels.append((y if y is not None else torch.full((len(idx),), -1)).numpy())
            stats = {"steps": res.steps, "nfe": res.nfe, "calls_per_batch": res.calls, "options": res.options}
            for key in flops:
                value = getattr(res, key)
                flops[key] = None if value is None or flops[key] is None else flops[key] + value
            bar.update(len(idx))
            bar.set_postfix(img_s=f"{made / max(seconds, 1e-9):.2f}")
        extra = {}
        if text:
            pid = np.concatenate(prompt_ids).astype(np.int64)
            extra = {"prompt_index": pid, "captions": np.array([spec.prompts[k] for k in pid.tolist()], dtype=str)}
        save_npz_atomic(
            _shard_path(parts, j),
            arr_0=np.concatenate(images),
            labels=np.concatenate(labels).astype(np.int64),
            indices=np.arange(lo, hi, dtype=np.int64),
            **extra,
        )
    bar.close()
    rank_info = {"rank": rank, "images": made, "seconds": seconds, **stats, **flops}
    write_json_atomic(parts / f"rank_{rank:04d}.json", rank_info)
    if barrier is not None:
        barrier()
    if rank != 0:
        return None
    path = merge_shards(parts, out, spec.num_samples, spec.shard_size)
    ranks = [read_json(p) for p in (parts / f"rank_{r:04d}.json" for r in range(world_size)) if p.is_file()]
    made_all = sum(r["images"] for r in ranks)
    secs = max((r["seconds"] for r in ranks), default=0.0)
    spec_info = asdict(spec)
    if spec.prompts is not None:  # the list itself is in the .npz (captions); its hash is in the settings
        spec_info["prompts"] = len(spec.prompts)
    info = {
        "num_samples": spec.num_samples,
        "spec": spec_info,
        "sampler": spec.sampler,
        "options": stats.get(
            "options", next((r.get("options") for r in ranks if r.get("options")), settings["options"])
        ),
        "steps": stats.get("steps", next((r.get("steps") for r in ranks if r.get("steps")), None)),
        "nfe": stats.get("nfe", next((r.get("nfe") for r in ranks if r.get("nfe")), None)),
        "cfg_scale": spec.cfg_scale,
        "world_size": world_size,
        "images_generated_this_run": made_all,
        "images_per_sec": made_all / secs if secs > 0 else None,
        **{  # this run's network FLOPs (all ranks; None when the model's cost is unknown)
            key: None if any(r.get(key, 0) is None for r in ranks) else sum(r.get(key, 0) for r in ranks)
            for key in ("token_flops", "full_flops")
        },
        "settings": settings,
        **(meta or {}),
    }
    write_json_atomic(out.with_suffix(".json"), info)
    return path


def merge_shards(parts: Path, out: Path, num_samples: int, shard_size: int) -> Path:
    """Stream the shards (index order) into one ADM ``.npz`` (``arr_0``, ``labels``; ``captions``
    and ``prompt_index`` when the shards have them), atomically."""
    n_shards = math.ceil(num_samples / shard_size)
    paths = [_shard_path(parts, j) for j in range(n_shards)]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise RuntimeError(
            f"cannot merge: {len(missing)} shard(s) missing in {parts} (e.g. {missing[:3]}); rerun to finish them"
        )
    with np.load(paths[0], allow_pickle=False) as z:
        tail = z["arr_0"].shape[1:]
        keys = ["labels"] + [k for k in ("captions", "prompt_index") if k in z.files]

    def write(tmp: str) -> None:
        small: dict[str, list[np.ndarray]] = {k: [] for k in keys}
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(
                    f, {"descr": np.dtype(np.uint8).str, "fortran_order": False, "shape": (num_samples, *tail)}
                )
                for p in paths:
                    with np.load(p, allow_pickle=False) as z:
                        f.write(np.ascontiguousarray(z["arr_0"]).tobytes())
                        for k in keys:
                            small[k].append(z[k])
            for k in keys:
                buf = io.BytesIO()
                np.save(buf, np.concatenate(small[k]), allow_pickle=False)
                zf.writestr(f"{k}.npy", buf.getvalue())

    return atomic_write(out, write)
