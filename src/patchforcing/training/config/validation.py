"""Semantic checks of an experiment config (after OmegaConf has checked keys and types): valid
choices, finite and positive numbers, divisibility, the model name, a plain run name."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from ...flow.timesteps import TIMESTEP_SAMPLERS, make_timestep_sampler
from ...models.registry import is_text_to_image, parse_model_name
from .schema import (
    _KINDS_WITH_PATH,
    _SECTIONS,
    ATTENTION_CHOICES,
    AUTOENCODER_CONFIG_KINDS,
    CAPTIONED_DATA_KINDS,
    DATA_KINDS,
    FUSED_CHOICES,
    PRECISIONS,
    REPA_SOURCES,
    SAMPLE_SAMPLERS,
    TRAIN_STRATEGIES,
    ConfigError,
    ExperimentConfig,
)

# --------------------------------------------------------------------------------------------
# semantic checks
# --------------------------------------------------------------------------------------------


def _check_name(name: str) -> str | None:
    """Why ``name`` is not a plain run name (the run directory is ``runs/<name>``), or None."""
    if not name.strip():
        return "name must not be empty"
    if "/" in name or "\\" in name or "\0" in name or os.path.isabs(name):
        return f"name must be a plain name without '/' or '\\' (the run directory is runs/<name>), got {name!r}"
    if name.startswith("."):
        return f"name must not start with '.' (the run directory is runs/<name>), got {name!r}"
    return None


def _non_finite(cfg: ExperimentConfig) -> list[str]:
    """The float fields (and float list elements) that are NaN or infinite."""
    out = []
    for section in _SECTIONS:
        for f in dataclasses.fields(getattr(cfg, section)):
            value = getattr(getattr(cfg, section), f.name)
            values = value if isinstance(value, list) else [value]
            if any(isinstance(v, float) and not math.isfinite(v) for v in values):
                out.append(f"{section}.{f.name} must be finite, got {value}")
    return out


def _validate(cfg: ExperimentConfig) -> None:
    """Semantic checks; raises one :class:`ConfigError` listing every problem found."""
    problems: list[str] = []

    def need(cond: bool, msg: str) -> None:
        if not cond:
            problems.append(msg)

    bad = _non_finite(cfg)
    if bad:  # comparisons with NaN would make the checks below misleading
        raise ConfigError("invalid config:\n  " + "\n  ".join(bad) if len(bad) > 1 else bad[0])

    m, d, o, op, e, s, t = cfg.model, cfg.data, cfg.objective, cfg.optim, cfg.ema, cfg.sample, cfg.train

    name_problem = _check_name(cfg.name)
    if name_problem:
        problems.append(name_problem)

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
    need(m.rope_jitter is None or m.rope_jitter >= 0, f"model.rope_jitter must be >= 0 (or null), got {m.rope_jitter}")
    need(
        m.rope_jitter is None or is_text_to_image(m.name),
        f"model.rope_jitter is for text-to-image presets (RoPE); {m.name!r} has a fixed position table",
    )
    if preset is not None:
        hidden = m.hidden_size if m.hidden_size is not None else preset["hidden_size"]
        heads = m.num_heads if m.num_heads is not None else preset["num_heads"]
        if hidden >= 1 and heads >= 1:
            need(hidden % heads == 0, f"model.hidden_size ({hidden}) must be divisible by model.num_heads ({heads})")
            need(
                hidden % 4 == 0, f"model.hidden_size ({hidden}) must be divisible by 4 (2-D sin-cos position embedding)"
            )
        patch = preset["patch_size"]
        if m.input_size is not None:
            need(
                m.input_size % patch == 0,
                f"model.input_size ({m.input_size}) must be a multiple of the patch size {patch} of {m.name}",
            )
        elif d.kind in ("synthetic", "folder", "npz", "shards") and d.resolution >= 1 and not cfg.autoencoder.online:
            need(
                d.resolution % patch == 0,
                f"data.resolution ({d.resolution}) must be a multiple of "
                f"the patch size {patch} of {m.name} (or set model.input_size)",
            )

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
    need(
        a.kind in AUTOENCODER_CONFIG_KINDS,
        f"autoencoder.kind must be one of {', '.join(AUTOENCODER_CONFIG_KINDS)}; got {a.kind!r}",
    )
    if a.kind == "identity":
        need(
            not a.source and not a.online,
            "autoencoder.kind 'identity' (pixel space) takes no source and no online encoding",
        )
    if a.online:
        need(bool(a.source), "autoencoder.online needs autoencoder.source (a hub id or a local VAE folder)")
        need(
            d.kind != "latents",
            "autoencoder.online encodes images; data.kind 'latents' is already encoded (set autoencoder.online=false)",
        )
    elif a.source and d.kind != "latents":
        problems.append(
            f"autoencoder.source is set but data.kind {d.kind!r} is in pixel space: set "
            "autoencoder.online=true to encode the images in the training loop, train on latents "
            "made by `patchforcing encode` (data.kind=latents), or set autoencoder.source=null"
        )
    need(
        a.scale_factor is None or a.scale_factor > 0,
        f"autoencoder.scale_factor must be > 0 (or null), got {a.scale_factor}",
    )
    need(
        (a.latents_mean is None) == (a.latents_std is None),
        "autoencoder.latents_mean and autoencoder.latents_std must be set together (or both null)",
    )
    if a.latents_mean is not None and a.latents_std is not None:
        need(
            len(a.latents_mean) == len(a.latents_std) >= 1,
            f"autoencoder.latents_mean ({len(a.latents_mean)} values) and latents_std ({len(a.latents_std)}) "
            "need one value per latent channel",
        )
        need(all(v > 0 for v in a.latents_std), f"autoencoder.latents_std must be > 0, got {a.latents_std}")

    # objective
    if o.timestep_sampler not in TIMESTEP_SAMPLERS:
        problems.append(
            f"objective.timestep_sampler must be one of {', '.join(TIMESTEP_SAMPLERS)}; got {o.timestep_sampler!r}"
        )
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
    need(
        len(op.betas) == 2 and all(0 <= b < 1 for b in op.betas),
        f"optim.betas must be two numbers in [0, 1), got {op.betas}",
    )
    need(op.eps > 0, f"optim.eps must be > 0, got {op.eps}")
    need(op.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {op.warmup_steps}")
    need(op.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 disables clipping), got {op.grad_clip}")
    need(op.batch_size >= 1, f"optim.batch_size must be >= 1, got {op.batch_size}")
    need(op.grad_accum >= 1, f"optim.grad_accum must be >= 1, got {op.grad_accum}")
    if op.batch_size >= 1 and op.grad_accum >= 1:
        need(
            op.batch_size % op.grad_accum == 0,
            f"optim.batch_size ({op.batch_size}) must be divisible by optim.grad_accum ({op.grad_accum})",
        )
    need(
        isinstance(op.fused, bool) or str(op.fused).lower() in FUSED_CHOICES,
        f"optim.fused must be one of {', '.join(FUSED_CHOICES)}; got {op.fused!r}",
    )

    # ema
    need(0 < e.decay < 1, f"ema.decay must be in (0, 1), got {e.decay}")

    # sample
    need(s.sampler in SAMPLE_SAMPLERS, f"sample.sampler must be one of {', '.join(SAMPLE_SAMPLERS)}; got {s.sampler!r}")
    need(s.steps >= 1, f"sample.steps must be >= 1, got {s.steps}")
    need(s.num >= 1, f"sample.num must be >= 1, got {s.num}")

    # train
    need(t.max_steps >= 1, f"train.max_steps must be >= 1, got {t.max_steps}")
    need(t.precision in PRECISIONS, f"train.precision must be one of {', '.join(PRECISIONS)}; got {t.precision!r}")
    need(
        t.attention in ATTENTION_CHOICES,
        f"train.attention must be one of {', '.join(ATTENTION_CHOICES)}; got {t.attention!r}",
    )
    need(
        t.strategy in TRAIN_STRATEGIES,
        f"train.strategy must be one of {', '.join(TRAIN_STRATEGIES)} (ddp: replicated, fsdp: sharded); "
        f"got {t.strategy!r}",
    )
    need(t.keep_last >= 1, f"train.keep_last must be >= 1, got {t.keep_last}")
    for k in ("log_every", "ckpt_every", "sample_every", "val_every"):
        v = getattr(t, k)
        need(v is None or v >= 1, f"train.{k} must be >= 1, got {v}")
    need(bool(t.device), "train.device must not be empty (use 'auto')")

    # repa
    r = cfg.repa
    if r.enabled:
        need(r.source in REPA_SOURCES, f"repa.source must be one of {', '.join(REPA_SOURCES)}; got {r.source!r}")
        if r.source == "online":
            need(bool(r.encoder), "repa.encoder is required for repa.source 'online' (e.g. dinov2-b, classifier:CKPT)")
        if r.source == "cached":
            need(
                d.kind == "latents",
                "repa.source 'cached' reads features stored with latents: needs data.kind 'latents'",
            )
        depth = m.depth if m.depth is not None else (preset["depth"] if preset is not None else None)
        need(r.encoder_depth >= 1, f"repa.encoder_depth must be >= 1, got {r.encoder_depth}")
        if depth is not None and r.encoder_depth >= 1:
            need(r.encoder_depth <= depth, f"repa.encoder_depth ({r.encoder_depth}) exceeds the model depth ({depth})")
        need(r.z_dim is None or r.z_dim >= 1, f"repa.z_dim must be >= 1 (or null), got {r.z_dim}")
        need(r.projector_dim >= 1, f"repa.projector_dim must be >= 1, got {r.projector_dim}")
        need(r.weight >= 0, f"repa.weight must be >= 0, got {r.weight}")
        need(r.resolution is None or r.resolution >= 1, f"repa.resolution must be >= 1 (or null), got {r.resolution}")

    # text
    x = cfg.text
    t2i = is_text_to_image(m.name)
    if x.encoder is not None:
        need(bool(str(x.encoder).strip()), "text.encoder must not be empty (minilm, a hub id or a local directory)")
        need(t2i, f"text.encoder is set but model.name {m.name!r} is not a text-to-image preset (e.g. PFT-T2I-T/2)")
        need(
            d.kind in CAPTIONED_DATA_KINDS,
            f"text-to-image training needs captioned data: data.kind must be one of {', '.join(CAPTIONED_DATA_KINDS)}; "
            f"got {d.kind!r}",
        )
        need(not r.enabled, "repa is not supported for text-to-image models")
    else:
        need(not t2i, f"model.name {m.name!r} is a text-to-image preset: set text.encoder (e.g. minilm)")
        need(d.kind != "shards", "data.kind 'shards' holds captioned images: set text.encoder and a T2I model")
    need(x.max_length is None or x.max_length >= 1, f"text.max_length must be >= 1 (or null), got {x.max_length}")
    need(x.per_prompt >= 1, f"text.per_prompt must be >= 1, got {x.per_prompt}")
    if x.prompts is not None:
        need(
            len(x.prompts) >= 1 and all(isinstance(p, str) for p in x.prompts),
            "text.prompts must be a non-empty list of strings (or null)",
        )

    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems) if len(problems) > 1 else problems[0])
