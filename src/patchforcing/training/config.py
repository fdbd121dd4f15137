"""Typed experiment configuration for ``patchforcing train CONFIG.yaml [dotted.key=value ...]``.

A config is a YAML mapping with an optional top-level ``name`` and eight sections, each a mapping
of fields (see the dataclasses below for every field, its type and its default)::

    name: pft-b2-imagenet256
    model:     {name: PFT-B/2, input_size: 32, in_channels: 4, num_classes: 1000}
    data:      {kind: latents, path: data/imagenet256-latents, resolution: 256}
    autoencoder: {kind: kl, source: stabilityai/sd-vae-ft-ema}
    objective: {timestep_sampler: ltg, timestep_options: {loc: 0.7, scale: 1.0, std: 0.6}}
    optim:     {lr: 1.0e-4, batch_size: 256}
    ema:       {decay: 0.9999}
    sample:    {sampler: euler_pf, steps: 50}
    train:     {max_steps: 400000, precision: auto}

Any key may be left out (its default fills in); a section may be left out or empty. An unknown
key, at any depth, is an error naming the dotted key, the valid keys and the closest match - except
inside the two free-form mappings ``objective.timestep_options`` (keyword arguments of
:func:`patchforcing.flow.timesteps.make_timestep_sampler`) and ``sample.options`` (keyword
arguments of the sampler).

Overrides on the command line are ``dotted.key=value`` strings, applied in order after the file::

    patchforcing train demo optim.lr=3e-4 train.compile=true optim.betas=[0.9,0.95] \\
        model.num_classes=null objective.timestep_options.loc=0.5

The value is parsed as YAML (``3e-4`` is read as a float too, unlike plain YAML 1.1), so numbers,
``true``/``false``, ``null`` and flow lists/mappings work; a value for a text field that YAML reads
as a number or boolean (``name=2024``) is kept as the text. A section may be set as a whole with a
mapping (``optim={lr: 1e-3, warmup_steps: 10}``), which updates the given keys only.

Types are checked strictly: an ``int`` is accepted for a ``float`` field (and stored as a float),
``bool`` is not accepted for an ``int`` field, ``null`` only where the field allows ``None``, and
list elements are checked. Then semantic checks run (valid choices, positive rates, divisibility,
the model name, ...); every problem is reported as :class:`ConfigError` (a ``ValueError``).

``CONFIG`` is a path to a YAML file or the name of a preset in the repository's ``configs/``
directory (a bare name without ``/`` and without ``.yaml``, e.g. ``demo``): see
:func:`list_presets` and :func:`preset_path`.

Public API: the section dataclasses and :class:`ExperimentConfig`, :class:`ConfigError`,
:func:`load_config`, :func:`apply_overrides`, :func:`config_from_dict`, :func:`config_to_dict`,
:func:`save_config`, :func:`diff_configs` with :data:`RESUME_SAFE_KEYS`, :func:`preset_path`,
:func:`list_presets`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, Union

import yaml

from ..flow.timesteps import TIMESTEP_SAMPLERS, make_timestep_sampler
from ..models.registry import parse_model_name

__all__ = [
    "ConfigError",
    "ModelSection",
    "DataSection",
    "AutoencoderSection",
    "ObjectiveSection",
    "OptimSection",
    "EmaSection",
    "SampleSection",
    "TrainSection",
    "ExperimentConfig",
    "DATA_KINDS",
    "AUTOENCODER_CONFIG_KINDS",
    "PRECISIONS",
    "SAMPLE_SAMPLERS",
    "RESUME_SAFE_KEYS",
    "load_config",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "save_config",
    "diff_configs",
    "preset_path",
    "list_presets",
]

#: allowed ``data.kind`` values
DATA_KINDS: tuple[str, ...] = ("synthetic", "folder", "npz", "latents")
#: data kinds that read files and therefore need ``data.path``
_KINDS_WITH_PATH: tuple[str, ...] = ("folder", "npz", "latents")
#: allowed ``autoencoder.kind`` values (``auto``: from the latents' index or the VAE folder's config)
AUTOENCODER_CONFIG_KINDS: tuple[str, ...] = ("auto", "kl", "tiny", "identity")
#: allowed ``train.precision`` values (``auto``: bf16 autocast on CUDA, fp32 otherwise)
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")
#: allowed ``sample.sampler`` values
SAMPLE_SAMPLERS: tuple[str, ...] = ("euler", "euler_pf", "dual_loop", "look_ahead")
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

    def preset_overrides(self) -> dict[str, Any]:
        """The architecture fields that are set (not ``None``), as ``create_model`` keyword
        arguments: ``create_model(name, input_size=..., ..., **section.preset_overrides())``."""
        keys = ("depth", "hidden_size", "num_heads", "mlp_ratio")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


@dataclass
class DataSection:
    """The training data. ``kind``: ``synthetic`` (built-in procedural shapes, no files),
    ``folder`` (ImageNet-layout image folder), ``npz`` (uint8 image arrays) or ``latents``
    (pre-encoded VAE latents made by ``patchforcing encode``). ``path`` is required for all but
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
    VAE, diffusers ``AutoencoderKL``), ``tiny`` (TAESD) or ``identity`` (pixel space).
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
    all ranks and ``grad_accum`` micro-steps); ``grad_clip`` is the max gradient norm (0: off)."""

    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 1000
    grad_clip: float = 1.0
    batch_size: int = 256
    grad_accum: int = 1


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
    """The loop: step budget, seed, precision (``auto``: bf16 on CUDA, fp32 on CPU), intervals
    (in optimizer steps) of logging, checkpoints (``keep_last`` kept), samples and validation
    (``val_every: null`` = ``sample_every``), device (``auto``, ``cpu``, ``cuda``, ``cuda:1``, ...)."""

    max_steps: int = 400000
    seed: int = 0
    precision: str = "auto"
    compile: bool = False
    log_every: int = 50
    ckpt_every: int = 5000
    keep_last: int = 3
    sample_every: int = 5000
    val_every: int | None = None
    device: str = "auto"
    progress: bool = True


@dataclass
class ExperimentConfig:
    """A whole experiment: a name and the eight sections."""

    name: str = "experiment"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    autoencoder: AutoencoderSection = field(default_factory=AutoencoderSection)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    optim: OptimSection = field(default_factory=OptimSection)
    ema: EmaSection = field(default_factory=EmaSection)
    sample: SampleSection = field(default_factory=SampleSection)
    train: TrainSection = field(default_factory=TrainSection)


def _field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved type annotation, in declaration order."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _is_freeform(tp: Any) -> bool:
    return tp is dict or typing.get_origin(tp) is dict


# --------------------------------------------------------------------------------------------
# YAML
# --------------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-4`` / ``1.0e4`` (no dot or no exponent sign)
    as floats, as YAML 1.2 does; PyYAML (YAML 1.1) would read them as strings."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


# --------------------------------------------------------------------------------------------
# type checking
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    """Human-readable name of a field type: ``int``, ``int or null``, ``list of float``..."""
    if tp is type(None):
        return "null"
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if _is_freeform(tp):
        return "mapping"
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(args[0])}" if args else "list"
    if _is_section(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _check_plain(key: str, value: Any) -> Any:
    """Deep copy of a free-form YAML value, checking it is plain data (str keys)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_check_plain(f"{key}[{i}]", v) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"{key}: keys must be strings, got {_describe(k)}")
            out[k] = _check_plain(f"{key}.{k}", v)
        return out
    raise ConfigError(f"{key}: expected plain YAML data (numbers, text, lists, mappings), "
                      f"got {_describe(value)}")


def _check_value(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the field type ``tp``; returns the (normalised, copied) value."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        others = [a for a in args if a is not type(None)]
        if len(others) == 1:
            try:
                return _check_value(key, value, others[0])
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_describe(value)}")

    ok = True
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        if not ok and isinstance(value, float) and math.isfinite(value) and value.is_integer():
            raise ConfigError(f"{key}: expected int, got {_describe(value)}; "
                              f"write it as an integer ({int(value)})")
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            value = float(value)
            if not math.isfinite(value):
                raise ConfigError(f"{key}: expected a finite float, got {value!r}")
    elif tp is str:
        ok = isinstance(value, str)
    elif origin is list:
        if not isinstance(value, (list, tuple)):
            ok = False
        else:
            (elem,) = typing.get_args(tp) or (Any,)
            items = []
            for i, v in enumerate(value):
                try:
                    items.append(v if elem is Any else _check_value(f"{key}[{i}]", v, elem))
                except ConfigError:
                    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_describe(list(value))} "
                                      f"(element {i} is {_describe(v)})") from None
            return items
    elif _is_freeform(tp):
        if not isinstance(value, Mapping):
            ok = False
        else:
            return _check_plain(key, value)
    else:  # pragma: no cover - the schema uses only the types above
        raise TypeError(f"unsupported field type {tp!r} for {key}")
    if not ok:
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_describe(value)}")
    return value


def _unknown_key(dotted: str, valid: Sequence[str], where: str) -> ConfigError:
    """The error for an unknown key: names it, suggests the closest valid key, lists them all."""
    leaf = dotted.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, valid, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown key {dotted!r}{hint} (valid keys of {where}: {', '.join(valid)})")


# --------------------------------------------------------------------------------------------
# building from a dict
# --------------------------------------------------------------------------------------------


def _build_section(cls: type, raw: Any, prefix: str) -> Any:
    """Instantiate dataclass ``cls`` from mapping ``raw`` (``None`` = all defaults)."""
    where = f"{prefix!r}" if prefix else "the top level"
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {_describe(raw)}")
    ftypes = _field_types(cls)
    kwargs: dict[str, Any] = {}
    for k, v in raw.items():
        dotted = f"{prefix}.{k}" if prefix else str(k)
        if k not in ftypes:
            raise _unknown_key(dotted, list(ftypes), where)
        tp = ftypes[k]
        kwargs[k] = _build_section(tp, v, dotted) if _is_section(tp) else _check_value(dotted, v, tp)
    return cls(**kwargs)


def _validate(cfg: ExperimentConfig) -> None:
    """Semantic checks; raises one :class:`ConfigError` listing every problem found."""
    problems: list[str] = []

    def need(cond: bool, msg: str) -> None:
        if not cond:
            problems.append(msg)

    m, d, o, op, e, s, t = cfg.model, cfg.data, cfg.objective, cfg.optim, cfg.ema, cfg.sample, cfg.train

    # model
    preset: dict[str, Any] | None
    try:
        preset = parse_model_name(m.name)
    except ValueError as err:
        preset = None
        problems.append(f"model.name: {err}")
    for k in ("input_size", "in_channels", "num_classes", "depth", "hidden_size", "num_heads"):
        v = getattr(m, k)
        need(v is None or v >= 1, f"model.{k} must be >= 1 (or null), got {v}")
    need(m.mlp_ratio is None or m.mlp_ratio > 0, f"model.mlp_ratio must be > 0 (or null), got {m.mlp_ratio}")
    if preset is not None:
        hidden = m.hidden_size if m.hidden_size is not None else preset["hidden_size"]
        heads = m.num_heads if m.num_heads is not None else preset["num_heads"]
        if hidden >= 1 and heads >= 1:
            need(hidden % heads == 0, f"model.hidden_size ({hidden}) must be divisible by "
                                      f"model.num_heads ({heads})")
            need(hidden % 4 == 0, f"model.hidden_size ({hidden}) must be divisible by 4 "
                                  "(2-D sin-cos position embedding)")
        patch = preset["patch_size"]
        if m.input_size is not None:
            need(m.input_size % patch == 0, f"model.input_size ({m.input_size}) must be a multiple of "
                                            f"the patch size {patch} of {m.name}")
        elif d.kind in ("synthetic", "folder", "npz") and d.resolution >= 1 and not cfg.autoencoder.online:
            need(d.resolution % patch == 0, f"data.resolution ({d.resolution}) must be a multiple of "
                                            f"the patch size {patch} of {m.name} (or set model.input_size)")

    # data
    need(d.kind in DATA_KINDS, f"data.kind must be one of {', '.join(DATA_KINDS)}; got {d.kind!r}")
    if d.kind in _KINDS_WITH_PATH:
        need(bool(d.path), f"data.path is required for data.kind {d.kind!r}")
    need(d.resolution >= 1, f"data.resolution must be >= 1, got {d.resolution}")
    need(d.num_classes is None or d.num_classes >= 1, f"data.num_classes must be >= 1 (or null), got {d.num_classes}")
    need(d.length is None or d.length >= 1, f"data.length must be >= 1 (or null), got {d.length}")
    need(d.num_workers >= 0, f"data.num_workers must be >= 0, got {d.num_workers}")
    need(d.val_size >= 0, f"data.val_size must be >= 0, got {d.val_size}")

    # autoencoder
    a = cfg.autoencoder
    need(a.kind in AUTOENCODER_CONFIG_KINDS, f"autoencoder.kind must be one of {', '.join(AUTOENCODER_CONFIG_KINDS)}; "
                                             f"got {a.kind!r}")
    if a.kind == "identity":
        need(not a.source and not a.online, "autoencoder.kind 'identity' (pixel space) takes no source and no online encoding")
    if a.online:
        need(bool(a.source), "autoencoder.online needs autoencoder.source (a hub id or a local VAE folder)")
        need(d.kind != "latents", "autoencoder.online encodes images; data.kind 'latents' is already encoded "
                                  "(set autoencoder.online=false)")
    elif a.source and d.kind != "latents":
        problems.append(f"autoencoder.source is set but data.kind {d.kind!r} is in pixel space: set "
                        "autoencoder.online=true to encode the images in the training loop, train on latents "
                        "made by `patchforcing encode` (data.kind=latents), or set autoencoder.source=null")
    need(a.scale_factor is None or a.scale_factor > 0, f"autoencoder.scale_factor must be > 0 (or null), got {a.scale_factor}")
    need((a.latents_mean is None) == (a.latents_std is None),
         "autoencoder.latents_mean and autoencoder.latents_std must be set together (or both null)")
    if a.latents_mean is not None and a.latents_std is not None:
        need(len(a.latents_mean) == len(a.latents_std) >= 1,
             f"autoencoder.latents_mean ({len(a.latents_mean)} values) and latents_std ({len(a.latents_std)}) "
             "need one value per latent channel")
        need(all(v > 0 for v in a.latents_std), f"autoencoder.latents_std must be > 0, got {a.latents_std}")

    # objective
    if o.timestep_sampler not in TIMESTEP_SAMPLERS:
        problems.append(f"objective.timestep_sampler must be one of {', '.join(TIMESTEP_SAMPLERS)}; "
                        f"got {o.timestep_sampler!r}")
    else:
        try:
            make_timestep_sampler(o.timestep_sampler, **o.timestep_options)
        except (ValueError, TypeError) as err:
            problems.append(f"objective.timestep_options: {err}")
    need(o.uncertainty_weight >= 0, f"objective.uncertainty_weight must be >= 0, got {o.uncertainty_weight}")
    need(0 <= o.label_dropout < 1, f"objective.label_dropout must be in [0, 1), got {o.label_dropout}")

    # optim
    need(op.lr > 0, f"optim.lr must be > 0, got {op.lr}")
    need(op.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {op.weight_decay}")
    need(len(op.betas) == 2 and all(0 <= b < 1 for b in op.betas),
         f"optim.betas must be two numbers in [0, 1), got {op.betas}")
    need(op.eps > 0, f"optim.eps must be > 0, got {op.eps}")
    need(op.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {op.warmup_steps}")
    need(op.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 disables clipping), got {op.grad_clip}")
    need(op.batch_size >= 1, f"optim.batch_size must be >= 1, got {op.batch_size}")
    need(op.grad_accum >= 1, f"optim.grad_accum must be >= 1, got {op.grad_accum}")
    if op.batch_size >= 1 and op.grad_accum >= 1:
        need(op.batch_size % op.grad_accum == 0,
             f"optim.batch_size ({op.batch_size}) must be divisible by optim.grad_accum ({op.grad_accum})")

    # ema
    need(0 < e.decay < 1, f"ema.decay must be in (0, 1), got {e.decay}")

    # sample
    need(s.sampler in SAMPLE_SAMPLERS, f"sample.sampler must be one of {', '.join(SAMPLE_SAMPLERS)}; "
                                       f"got {s.sampler!r}")
    need(s.steps >= 1, f"sample.steps must be >= 1, got {s.steps}")
    need(s.num >= 1, f"sample.num must be >= 1, got {s.num}")

    # train
    need(t.max_steps >= 1, f"train.max_steps must be >= 1, got {t.max_steps}")
    need(t.precision in PRECISIONS, f"train.precision must be one of {', '.join(PRECISIONS)}; "
                                    f"got {t.precision!r}")
    need(t.keep_last >= 1, f"train.keep_last must be >= 1, got {t.keep_last}")
    for k in ("log_every", "ckpt_every", "sample_every", "val_every"):
        v = getattr(t, k)
        need(v is None or v >= 1, f"train.{k} must be >= 1, got {v}")
    need(bool(t.device), "train.device must not be empty (use 'auto')")

    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems) if len(problems) > 1 else problems[0])


def config_from_dict(d: Mapping[str, Any] | None) -> ExperimentConfig:
    """Build and validate an :class:`ExperimentConfig` from a (possibly partial) nested mapping,
    e.g. the output of :func:`config_to_dict` or a parsed YAML file. ``None`` = all defaults."""
    cfg = _build_section(ExperimentConfig, d, "")
    _validate(cfg)
    return cfg


def config_to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """The config as a plain nested ``dict`` (YAML/JSON-serialisable), keys in schema order."""
    if not isinstance(cfg, ExperimentConfig):
        raise TypeError(f"expected an ExperimentConfig, got {type(cfg).__name__}")
    return dataclasses.asdict(cfg)


# --------------------------------------------------------------------------------------------
# overrides
# --------------------------------------------------------------------------------------------


def _parse_override(item: str) -> tuple[list[str], str, Any]:
    """``"optim.lr=3e-4"`` -> (["optim", "lr"], raw text, parsed value)."""
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form dotted.key=value "
                          "(e.g. optim.lr=3e-4)")
    key, text = item.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ConfigError(f"override {item!r}: invalid key {key!r}")
    try:
        value = _yaml_load(text)
    except yaml.YAMLError as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"override {item!r}: cannot parse the value as YAML ({reason}); "
                          "quote text, e.g. key='a: b'") from None
    return parts, text, value


def _apply_override(tree: dict[str, Any], item: str) -> None:
    """Apply one ``dotted.key=value`` override to the raw config mapping ``tree`` in place,
    checking the key path (and the value's type, for a field) against the schema."""
    parts, text, value = _parse_override(item)
    _set_path(tree, parts, value, text, item)


def _set_path(tree: dict[str, Any], parts: list[str], value: Any, text: str | None, item: str) -> None:
    """Set ``tree[parts[0]][parts[1]]... = value`` after checking the path against the schema.
    ``text`` is the override's raw value text (``None`` for values from a section mapping)."""
    cls: Any = ExperimentConfig
    node = tree
    for i, part in enumerate(parts):
        dotted = ".".join(parts[: i + 1])
        last = i == len(parts) - 1
        if cls is None:  # inside a free-form mapping: any key, create levels as needed
            if last:
                node[part] = _check_plain(dotted, value)
                return
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {dotted} is {_describe(child)}, not a mapping")
            node = child
            continue
        ftypes = _field_types(cls)
        if part not in ftypes:
            parent = ".".join(parts[:i])
            err = _unknown_key(dotted, list(ftypes), f"{parent!r}" if parent else "the top level")
            raise ConfigError(f"override {item!r}: {err}")
        tp = ftypes[part]
        if _is_section(tp):
            if last and not isinstance(value, Mapping):
                raise ConfigError(f"override {item!r}: {dotted} is a section; give a mapping, "
                                  f"e.g. {dotted}={{key: value}}, or set {dotted}.KEY=value")
            current = node.get(part)
            if current is None:
                current = node[part] = {}
            elif not isinstance(current, dict):
                raise ConfigError(f"{dotted}: expected a mapping of keys, got {_describe(current)}")
            if last:  # a whole section: update the given keys only
                for k, v in value.items():
                    _set_path(tree, [*parts, str(k)], v, None, item)
                return
            node, cls = current, tp
        elif _is_freeform(tp):
            if last:
                try:
                    node[part] = _check_value(dotted, value, tp)
                except ConfigError as err:
                    raise ConfigError(f"override {item!r}: {err}") from None
                return
            current = node.get(part)
            if current is None:
                current = node[part] = {}
            elif not isinstance(current, dict):
                raise ConfigError(f"{dotted}: expected a mapping, got {_describe(current)}")
            node, cls = current, None
        else:
            if not last:
                raise ConfigError(f"override {item!r}: {dotted} is a {_type_name(tp)} field, "
                                  "not a section")
            if text is not None and _accepts_str(tp) and isinstance(value, (bool, int, float)):
                value = text.strip()  # e.g. name=2024: keep the text
            try:
                node[part] = _check_value(dotted, value, tp)
            except ConfigError as err:
                raise ConfigError(f"override {item!r}: {err}") from None
            return


def _accepts_str(tp: Any) -> bool:
    return tp is str or (typing.get_origin(tp) in (Union, types.UnionType) and str in typing.get_args(tp))


def apply_overrides(cfg: ExperimentConfig, overrides: Sequence[str]) -> ExperimentConfig:
    """A new, validated config: ``cfg`` with the ``dotted.key=value`` overrides applied in order."""
    if isinstance(overrides, str):
        raise TypeError("overrides must be a sequence of 'key=value' strings, not one string")
    tree = config_to_dict(cfg)
    for item in overrides:
        _apply_override(tree, item)
    return config_from_dict(tree)


# --------------------------------------------------------------------------------------------
# files and presets
# --------------------------------------------------------------------------------------------


def _presets_dir() -> Path:
    """The presets: the repository's top-level ``configs/``, reached through the package's
    ``configs`` link (a source checkout) or the copy that a built wheel carries."""
    return Path(__file__).resolve().parent.parent / "configs"


def list_presets() -> list[str]:
    """Names of the packaged presets (``configs/*.yaml`` without the suffix), sorted."""
    directory = _presets_dir()
    if not directory.is_dir():
        return []
    return sorted(p.stem for p in directory.glob("*.yaml") if p.is_file())


def preset_path(name: str) -> Path:
    """Path of the preset ``name`` (e.g. ``"demo"``, ``"emoji32-pft"``); a trailing ``.yaml`` is
    allowed. Raises :class:`ConfigError` listing the available presets when there is none."""
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    path = _presets_dir() / f"{stem}.yaml"
    if stem and "/" not in stem and os.sep not in stem and path.is_file():
        return path
    available = list_presets()
    close = difflib.get_close_matches(stem, available, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    listing = ", ".join(available) if available else f"none found in {_presets_dir()}"
    raise ConfigError(f"no preset named {name!r}{hint} (available presets: {listing})")


def _is_bare_name(s: str) -> bool:
    return "/" not in s and os.sep not in s and not s.endswith((".yaml", ".yml"))


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read config file {str(path)!r}: {err}") from None
    try:
        raw = _yaml_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    if raw is not None and not isinstance(raw, Mapping):
        raise ConfigError(f"config file {str(path)!r} must contain a mapping of sections, "
                          f"got {type(raw).__name__}")
    return raw


def load_config(path_or_name: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read a config file or preset, apply ``dotted.key=value`` overrides, validate, return it.

    ``path_or_name``: a bare name (no ``/``, no ``.yaml``) is a preset from :func:`list_presets`;
    anything else is a path to a YAML file. Raises :class:`ConfigError` for a missing file or
    preset, invalid YAML, an unknown key, a wrong type or an invalid value."""
    if isinstance(overrides, str):
        raise TypeError("overrides must be a sequence of 'key=value' strings, not one string")
    s = os.fspath(path_or_name)
    if _is_bare_name(s):
        path = preset_path(s)
    else:
        path = Path(s).expanduser()
        if not path.is_file():
            stem = path.name.rsplit(".", 1)[0]
            hint = (f"; the preset {stem!r} is loaded by its bare name: {stem}"
                    if stem in list_presets() else "")
            raise ConfigError(f"no such config file or preset: {s!r}{hint} "
                              f"(presets: {', '.join(list_presets()) or 'none'})")
    raw = _read_yaml(path)
    tree = copy.deepcopy(dict(raw)) if raw is not None else {}
    try:
        _build_section(ExperimentConfig, tree, "")  # key/type errors of the file itself first
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    for item in overrides:
        _apply_override(tree, item)
    return config_from_dict(tree)


def save_config(cfg: ExperimentConfig, path: str | Path) -> Path:
    """Write ``cfg`` as YAML (every key, in schema order); returns the path. Reading it back with
    :func:`load_config` gives an equal config."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None, width=100)
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# comparing
# --------------------------------------------------------------------------------------------


def _flatten(cfg: ExperimentConfig) -> dict[str, Any]:
    """Dotted field key -> value (free-form mappings are one value)."""
    out: dict[str, Any] = {}
    for k, v in config_to_dict(cfg).items():
        if isinstance(v, dict) and _is_section(_field_types(ExperimentConfig)[k]):
            for kk, vv in v.items():
                out[f"{k}.{kk}"] = vv
        else:
            out[k] = v
    return out


def diff_configs(a: ExperimentConfig, b: ExperimentConfig,
                 ignore: Iterable[str] = ()) -> list[tuple[str, Any, Any]]:
    """The fields whose values differ: ``[(dotted_key, value_in_a, value_in_b), ...]`` in schema
    order, leaving out the keys in ``ignore`` (e.g. :data:`RESUME_SAFE_KEYS`; a section name
    ignores the whole section). An unknown key in ``ignore`` is a :class:`ConfigError`."""
    fa, fb = _flatten(a), _flatten(b)
    ignore = tuple(ignore)
    sections = [k for k, tp in _field_types(ExperimentConfig).items() if _is_section(tp)]
    for key in ignore:
        if key not in fa and key not in sections:
            close = difflib.get_close_matches(key, [*fa, *sections], n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"diff_configs: unknown key {key!r} in ignore{hint} (valid: a section "
                              f"name or a dotted field key such as {', '.join(RESUME_SAFE_KEYS[:2])})")
    return [(k, fa[k], fb[k]) for k in fa
            if k not in ignore and k.split(".", 1)[0] not in ignore and fa[k] != fb[k]]
