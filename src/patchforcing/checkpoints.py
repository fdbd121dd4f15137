"""Loading and saving weights, safely.

Formats understood by :func:`load_model`:

* **Released** (the authors' ``pft-*_ema.ckpt``): a ``torch.save`` dict
  ``{"config": {"target": ..., "params": {...}}, "state_dict": {...}}``. The target string is
  *mapped* to our class (never imported).
* **The authors' training checkpoints**: ``state_dict`` with ``model.`` / ``ema_model.``
  prefixes and ``hyper_parameters["model"]``; the EMA half is taken by default.
* **Ours, exported**: a ``.safetensors`` file whose metadata holds the model config as JSON
  (:func:`save_model`), or a directory holding ``model.safetensors``.
* **Ours, training**: a run directory (``checkpoints/last.pt``) or a training checkpoint file
  (``{"format": "patchforcing-train", "model_config": ..., "ema": ..., ...}``); EMA weights.
* **Hub ids** (``owner/name`` or ``hf://owner/name/file``) when ``huggingface_hub`` is installed.

Everything goes through ``torch.load(weights_only=True)`` or safetensors: no code is unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .models.t2i import T2IConfig, TextToImageTransformer
from .models.transformer import ModelConfig, PatchForcingTransformer
from .utils.hub import HubError, hub_download
from .utils.io import atomic_write, ensure_writable_dir, looks_local, torch_save_atomic

__all__ = [
    "find_checkpoint",
    "CheckpointError",
    "RELEASED_TARGETS",
    "safe_torch_load",
    "load_state_dict_strict",
    "load_model",
    "save_model",
    "save_released_format",
    "model_from_released_config",
    "read_safetensors_metadata",
    "export_run",
]

TRAIN_FORMAT = "patchforcing-train"
EXPORT_FORMAT = "patchforcing"

#: class names of the authors' code (last component of ``config.target``) -> our family flags
RELEASED_TARGETS: dict[str, dict[str, bool]] = {
    "PatchForcingDiT": {"per_patch_time": True},
    "REPAPatchForcingDiT": {"per_patch_time": True},  # + the REPA projector (z_dim, encoder_depth, projector_dim)
}
#: the REPA model's extra parameters and the authors' defaults (PFT-XL/2 + DINOv2-B)
_REPA_PARAMS = {"z_dim": 768, "encoder_depth": 8, "projector_dim": 2048}
#: state_dict prefix of the REPA projector (training only; sampling never runs it)
PROJECTOR_PREFIX = "projector."
_RELEASED_PARAMS = {
    "in_channels",
    "input_size",
    "depth",
    "hidden_size",
    "patch_size",
    "num_heads",
    "num_classes",
    "mlp_ratio",
    "predict_uncertainty",
}
_IGNORED_PARAMS = {"compile", "class_dropout_prob", "learn_sigma"}
#: ``model_config["model_type"]`` -> (config class, model class); class-model configs have no such key
MODEL_TYPES: dict[str, tuple[type, type]] = {T2IConfig.MODEL_TYPE: (T2IConfig, TextToImageTransformer)}


class CheckpointError(ValueError):
    """A weights file that cannot be read, or that does not fit the model."""


# --------------------------------------------------------------------------------------------
# Safe reads
# --------------------------------------------------------------------------------------------

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _file_head(path: Path, n: int = 8) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def _first_safe_line(err: BaseException) -> str:
    """A one-line summary of ``err`` without torch's advice to load with ``weights_only=False``
    (or to allow-list globals): that would run whatever code the file holds."""
    for line in str(err).splitlines():
        line = line.strip()
        if (
            line
            and "weights_only" not in line
            and "safe_globals" not in line
            and "Weights only load failed" not in line
        ):
            return line
    return type(err).__name__


def safe_torch_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with errors that say what is wrong with the file.

    Raises:
        CheckpointError: naming ``path``, and saying whether it is missing, not a torch file at all
            (random bytes, empty, truncated), or a torch file holding pickled Python objects
            beyond tensors and plain containers (never unpickled).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError) as e:
        head = _file_head(path)
        unsafe = _UNSAFE_GLOBAL.search(str(e))
        if unsafe is not None:
            raise CheckpointError(
                f"{path} holds pickled Python objects beyond tensors and plain containers (it references "
                f"{unsafe.group(1)}); refusing to unpickle code. Re-save it as a plain state_dict of tensors"
            ) from None
        if not head:
            raise CheckpointError(
                f"{path} is not a torch checkpoint (the file is empty; truncated or corrupt?)"
            ) from None
        if head.startswith(_ZIP_MAGIC):
            raise CheckpointError(
                f"cannot read {path} as a torch checkpoint (truncated or corrupt?): {_first_safe_line(e)}"
            ) from None
        if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
            raise CheckpointError(
                f"cannot read {path} as a torch checkpoint (a pickle stream the safe loader cannot parse; "
                f"truncated, corrupt or not written by torch.save?): {_first_safe_line(e)}"
            ) from None
        raise CheckpointError(
            f"{path} is not a torch checkpoint (not a zip/pickle file; truncated or corrupt?)"
        ) from None


# --------------------------------------------------------------------------------------------
# Strict state_dict loading with a readable report
# --------------------------------------------------------------------------------------------


def _strip_prefixes(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for k, v in sd.items():
        for prefix in ("_orig_mod.", "module."):
            while k.startswith(prefix):
                k = k[len(prefix) :]
        out[k.replace("._orig_mod.", ".")] = v
    return out


def _listing(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _drop_projector(sd: dict[str, Tensor], own: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    """``sd`` without the REPA projector when ``own`` (the model) has none, with a note on stderr."""
    extra = [k for k in sd if k.startswith(PROJECTOR_PREFIX)]
    if not extra or any(k.startswith(PROJECTOR_PREFIX) for k in own):
        return sd
    print(
        f"note: {source} holds a REPA projector ({len(extra)} tensors, used in training only); "
        "dropped: this model has none (sampling never runs it)",
        file=sys.stderr,
    )
    return {k: v for k, v in sd.items() if not k.startswith(PROJECTOR_PREFIX)}


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, Tensor], source: str = "checkpoint") -> None:
    """Load ``state_dict`` into ``model`` exactly, or raise :class:`CheckpointError` listing
    the missing, unexpected and mis-shaped keys. A REPA projector (``projector.*``) in
    ``state_dict`` is dropped, with a note on stderr, when the model has none."""
    own = model.state_dict()
    sd = _drop_projector(_strip_prefixes(state_dict), own, source)
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    misshaped = sorted(
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(sd)
        if tuple(sd[k].shape) != tuple(own[k].shape)
    )
    non_tensor = sorted(k for k, v in sd.items() if not isinstance(v, Tensor))
    if missing or unexpected or misshaped or non_tensor:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
        if misshaped:
            parts.append(f"mis-shaped keys ({len(misshaped)}): {_listing(misshaped, 6)}")
        if non_tensor:
            parts.append(f"non-tensor entries: {_listing(non_tensor)}")
        raise CheckpointError(f"{source} does not fit the model:\n  " + "\n  ".join(parts))
    model.load_state_dict(sd, strict=True)


# --------------------------------------------------------------------------------------------
# Model configs: checked field by field, so a bad file gets one line, not a traceback
# --------------------------------------------------------------------------------------------


def _type_problem(name: str, value: Any, default: Any, annotation: str) -> str | None:
    """Why ``value`` does not fit the :class:`ModelConfig` field ``name`` (``None``: it fits)."""
    if isinstance(default, bool):
        ok, want = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
        if "tuple" in annotation:
            pair = isinstance(value, (list, tuple)) and len(value) == 2
            ok = ok or (pair and all(isinstance(v, int) and not isinstance(v, bool) for v in value))
            want = "an integer or a pair of integers"
    elif isinstance(default, float):
        ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    else:  # a field type this check does not know: left to the model's constructor
        return None
    return None if ok else f"{name} must be {want}, got {value!r} ({type(value).__name__})"


def _check_model_config(
    cfg: Any, source: str, what: str = "model_config", config_cls: type = ModelConfig
) -> dict[str, Any]:
    """``cfg`` as a plain dict of known, well-typed ``config_cls`` (:class:`ModelConfig`) fields, else
    :class:`CheckpointError` naming ``source`` and every problem."""
    if not isinstance(cfg, Mapping):
        raise CheckpointError(f"{source}: {what} must be a dict of model settings, got {type(cfg).__name__}")
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    problems = []
    unknown = sorted(map(str, set(cfg) - set(fields)))
    if unknown:
        problems.append(f"unknown fields {unknown} (known: {sorted(fields)})")
    for name, value in cfg.items():
        if name in fields:
            f = fields[name]
            problem = _type_problem(name, value, f.default, str(f.type))
            if problem:
                problems.append(problem)
    if problems:
        raise CheckpointError(f"{source}: bad {what}: " + "; ".join(problems))
    return dict(cfg)


def _model_from_config(cfg: Any, source: str, what: str = "model_config") -> PatchForcingTransformer:
    """Build the model a checkpoint's config describes, with a :class:`CheckpointError` (naming
    ``source``) for a missing, mistyped or inconsistent config instead of a traceback.

    A config with a ``model_type`` key (:data:`MODEL_TYPES`: ``"t2i"``) builds that model; class
    model configs have none and build a :class:`PatchForcingTransformer` as always."""
    if isinstance(cfg, Mapping) and "model_type" in cfg:
        kind = cfg["model_type"]
        if kind not in MODEL_TYPES:
            raise CheckpointError(f"{source}: {what} has an unknown model_type {kind!r} (known: {sorted(MODEL_TYPES)})")
        config_cls, model_cls = MODEL_TYPES[kind]
        _check_model_config({k: v for k, v in cfg.items() if k != "model_type"}, source, what, config_cls)
        try:
            return model_cls.from_config(dict(cfg))
        except (TypeError, ValueError, AssertionError, RuntimeError, ZeroDivisionError) as e:
            raise CheckpointError(f"{source}: {what} does not describe a valid model: {e}") from None
    cfg = _check_model_config(cfg, source, what)
    try:
        return PatchForcingTransformer.from_config(cfg)
    except (TypeError, ValueError, AssertionError, RuntimeError, ZeroDivisionError) as e:
        raise CheckpointError(f"{source}: {what} does not describe a valid model: {e}") from None


# --------------------------------------------------------------------------------------------
# The authors' released format
# --------------------------------------------------------------------------------------------


def model_from_released_config(config: Mapping[str, Any], source: str | None = None) -> PatchForcingTransformer:
    """Map ``{"target": "...PatchForcingDiT", "params": {...}}`` to our model (nothing imported).

    ``source`` (the file) prefixes error messages.
    """
    where = f"{source}: " if source else ""
    if not isinstance(config, Mapping) or "target" not in config:
        got = sorted(map(str, config)) if isinstance(config, Mapping) else type(config).__name__
        raise CheckpointError(f"{where}released config must have 'target' and 'params', got {got}")
    target = str(config["target"])
    cls_name = target.rsplit(".", 1)[-1]
    if cls_name not in RELEASED_TARGETS:
        raise CheckpointError(
            f"{where}unknown model target {target!r}; known: {sorted(RELEASED_TARGETS)} "
            "(the target is only matched by name, never imported)"
        )
    raw = config.get("params") or {}
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{where}released config 'params' must be a dict, got {type(raw).__name__}")
    params = dict(raw)
    repa_params = set(_REPA_PARAMS) if cls_name == "REPAPatchForcingDiT" else set()
    unknown = sorted(map(str, set(params) - _RELEASED_PARAMS - _IGNORED_PARAMS - repa_params))
    if unknown:
        raise CheckpointError(f"{where}released config of {cls_name} has parameters we do not know: {unknown}")
    if params.get("learn_sigma"):
        raise CheckpointError(f"{where}learn_sigma=True checkpoints are not supported (no sigma channel in this model)")
    kwargs = {k: params[k] for k in _RELEASED_PARAMS if k in params}
    kwargs.update(RELEASED_TARGETS[cls_name])
    kwargs.setdefault("predict_uncertainty", True)
    if repa_params:
        kwargs["repa"] = {k: params.get(k, default) for k, default in _REPA_PARAMS.items()}
    return _model_from_config(kwargs, source or "released checkpoint", "released config params")


def save_released_format(model: PatchForcingTransformer, path: str | os.PathLike) -> Path:
    """Write ``model`` in the authors' released layout (e.g. for fixtures and interoperability)."""
    if not isinstance(model, PatchForcingTransformer):
        raise CheckpointError(
            f"the released format only describes class-conditional PFT models, not {type(model).__name__}"
        )
    c = model.config
    params = {
        "in_channels": c.in_channels,
        "input_size": c.input_size,
        "depth": c.depth,
        "hidden_size": c.hidden_size,
        "patch_size": c.patch_size,
        "num_heads": c.num_heads,
        "num_classes": c.num_classes,
        "compile": False,
        "predict_uncertainty": c.predict_uncertainty,
    }
    if not c.per_patch_time:
        raise CheckpointError("the released format only describes PFT models (per_patch_time=True)")
    target = "patch_flow.models.pf_transformer.PatchForcingDiT"
    if c.repa is not None:
        target = "patch_flow.models.repa_pf_transformer.REPAPatchForcingDiT"
        params.update(z_dim=c.repa.z_dim, encoder_depth=c.repa.encoder_depth, projector_dim=c.repa.projector_dim)
    obj = {
        "config": {"target": target, "params": params},
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
    }
    return torch_save_atomic(obj, path)


def _released_training_ckpt(obj: Mapping[str, Any], use_ema: bool, source: str) -> PatchForcingTransformer:
    hp = obj.get("hyper_parameters") or {}
    cfg = hp.get("model") if isinstance(hp, Mapping) else None
    if not isinstance(cfg, Mapping):
        raise CheckpointError(f"{source}: training checkpoint without hyper_parameters['model']")
    if "target" not in cfg:
        cfg = {"target": "PatchForcingDiT", "params": cfg}
    model = model_from_released_config(cfg, source)
    prefix = "ema_model." if use_ema else "model."
    sd_all = obj["state_dict"]
    if not isinstance(sd_all, Mapping):
        raise CheckpointError(f"{source}: 'state_dict' must be a dict of tensors, got {type(sd_all).__name__}")
    sd = {k[len(prefix) :]: v for k, v in sd_all.items() if str(k).startswith(prefix)}
    if not sd:
        raise CheckpointError(f"{source}: no '{prefix}' weights in the training checkpoint")
    load_state_dict_strict(model, sd, source)
    return model


# --------------------------------------------------------------------------------------------
# Our formats
# --------------------------------------------------------------------------------------------


def save_model(
    model: PatchForcingTransformer, path: str | os.PathLike, metadata: Mapping[str, Any] | None = None
) -> Path:
    """Export weights + config to one self-contained ``.safetensors`` file (atomic).

    ``metadata`` (JSON-serialisable; e.g. the VAE and its scaling, the training config) is
    stored alongside under the key ``"extra"``.
    """
    meta = {
        "format": EXPORT_FORMAT,
        "model_config": json.dumps(model.config.to_dict()),
        "extra": json.dumps(dict(metadata or {})),
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def _safetensors_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path} as safetensors (truncated or corrupt header?): {e}") from None


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``extra`` metadata saved by :func:`save_model` (``{}`` when absent).

    Raises:
        CheckpointError: naming the file, when its header cannot be read or ``extra`` is not JSON.
    """
    path = Path(path)
    meta = _safetensors_metadata(path)
    try:
        extra = json.loads(meta.get("extra", "{}"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: the 'extra' metadata is not valid JSON: {e}") from None
    if not isinstance(extra, dict):
        raise CheckpointError(f"{path}: the 'extra' metadata must be a JSON object, got {type(extra).__name__}")
    return extra


def _load_safetensors(path: Path) -> PatchForcingTransformer:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path} as safetensors (truncated or corrupt?): {e}") from None
    if "model_config" not in meta:
        raise CheckpointError(
            f"{path} has no 'model_config' metadata; build the model yourself and use "
            "load_state_dict_strict(model, safetensors.torch.load_file(path))"
        )
    try:
        cfg = json.loads(meta["model_config"])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: the 'model_config' metadata is not valid JSON: {e}") from None
    model = _model_from_config(cfg, str(path))
    load_state_dict_strict(model, sd, str(path))
    return model


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The model file of a directory: ``model.safetensors`` (an export), ``checkpoints/last.pt`` (a run
    directory) or ``last.pt``, in that order; ``CheckpointError`` when it holds none."""
    path = Path(path)
    for candidate in ("model.safetensors", "checkpoints/last.pt", "last.pt"):
        if (path / candidate).is_file():
            return path / candidate
    raise CheckpointError(
        f"{path} is a directory without model.safetensors or checkpoints/last.pt "
        "(expected an exported model or a training run directory)"
    )


def _hub_download(source: str, filename: str | None) -> Path:
    """Fetch a hub file (``owner/name`` + ``filename``, or ``hf://owner/name/path/in/repo``)."""
    repo = source[len("hf://") :] if source.startswith("hf://") else source
    parts = repo.strip("/").split("/")
    if len(parts) > 2 and filename is None:
        repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    if filename is None:
        filename = "model.safetensors"
    try:
        return hub_download(repo, filename)
    except HubError as e:
        raise CheckpointError(
            f"{source!r} is not a local path; tried hub repo {repo!r} file {filename!r}: {e}"
        ) from None


def load_model(
    source: str | os.PathLike,
    *,
    map_location: Any = "cpu",
    use_ema: bool = True,
    filename: str | None = None,
    projector: bool = True,
) -> PatchForcingTransformer:
    """Load a model from any supported file, directory or hub id; returns it in eval mode.

    Args:
        source: a released ``.ckpt``, an exported ``.safetensors``, a run directory, a training
            checkpoint, or a hub id (``owner/name``, ``hf://owner/name/file``). A source that
            looks like a path (it has a file extension or starts with ``.``, ``/`` or ``~``) is
            never looked up on the hub.
        map_location: where tensors are loaded (the model is returned on that device for
            torch files; move it with ``.to()``).
        use_ema: take the EMA weights of training checkpoints (default).
        filename: file inside a hub repo.
        projector: keep the REPA projector of a REPA checkpoint (default; e.g. to continue
            training). ``False`` drops it (with a note on stderr): a plain sampling model, whose
            samples are the same (sampling never runs the projector).

    Raises:
        CheckpointError: a missing path, an unreadable or unrecognised file, a config or weights
            that do not fit, or a hub file that cannot be fetched (one line, naming the source).
    """
    src = str(source)
    path = Path(source).expanduser()
    if not path.exists():
        is_hub_id = src.startswith("hf://") or ("/" in src.strip("/") and not looks_local(src))
        if not is_hub_id:
            raise CheckpointError(f"no such checkpoint file or directory: {src}")
        path = _hub_download(src, filename)
    if path.is_dir():
        path = find_checkpoint(path)
    if path.suffix == ".safetensors":
        model = _load_safetensors(path)
    else:
        obj = safe_torch_load(path, map_location)
        model = _model_from_torch_object(obj, use_ema, str(path))
    if not projector and getattr(model, "projector", None) is not None:
        print(f"note: dropped the REPA projector of {path} (used in training only)", file=sys.stderr)
        model.remove_projector()
    return model.eval()


def _model_from_torch_object(obj: Any, use_ema: bool, source: str) -> PatchForcingTransformer:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: expected a dict checkpoint, got {type(obj).__name__}")
    if obj.get("format") == TRAIN_FORMAT:
        if "model_config" not in obj:
            raise CheckpointError(
                f"{source}: training checkpoint without 'model_config' (see docs/checkpoint-format.md)"
            )
        model = _model_from_config(obj["model_config"], source)
        key = "ema" if use_ema and obj.get("ema") is not None else "model"
        if not isinstance(obj.get(key), Mapping):
            raise CheckpointError(f"{source}: training checkpoint without '{key}' weights (a dict of tensors)")
        load_state_dict_strict(model, obj[key], f"{source} [{key}]")
        return model
    if isinstance(obj.get("config"), Mapping) and "state_dict" in obj:
        if not isinstance(obj["state_dict"], Mapping):
            raise CheckpointError(f"{source}: 'state_dict' must be a dict of tensors")
        model = model_from_released_config(obj["config"], source)
        load_state_dict_strict(model, obj["state_dict"], source)
        return model
    if "hyper_parameters" in obj and "state_dict" in obj:
        return _released_training_ckpt(obj, use_ema, source)
    raise CheckpointError(
        f"{source}: unrecognised checkpoint layout (top-level keys {sorted(map(str, obj))}); expected "
        "the released {'config', 'state_dict'} dict, an authors' training checkpoint, or ours"
    )


def export_run(run: str | os.PathLike, out: str | os.PathLike, use_ema: bool = True) -> Path:
    """Write a training run's (EMA) weights and config to one self-contained ``.safetensors``.

    Args:
        run: a run directory (``checkpoints/last.pt`` is used) or a training checkpoint file.
        out: the ``.safetensors`` file to write (not an existing directory); its folder is
            created and checked for writability before anything is read.
        use_ema: export the EMA weights (default) instead of the raw ones.

    Raises:
        CheckpointError: a bad ``out`` (a directory, wrong suffix, not writable) or ``run``.
    """
    out_path = Path(out).expanduser()
    if out_path.is_dir():
        raise CheckpointError(
            f"--out {out} is an existing directory; give the .safetensors file to write (e.g. {out_path / 'model.safetensors'})"
        )
    if out_path.suffix != ".safetensors":
        raise CheckpointError(f"--out must end in .safetensors, got {out}")
    try:
        ensure_writable_dir(out_path.parent, "the folder of --out")
    except OSError as e:
        raise CheckpointError(str(e)) from None
    path = Path(run).expanduser()
    if path.is_dir():
        path = path / "checkpoints" / "last.pt"
    obj = safe_torch_load(path)
    if not isinstance(obj, Mapping) or obj.get("format") != TRAIN_FORMAT:
        raise CheckpointError(f"{path} is not a patchforcing training checkpoint")
    model = _model_from_torch_object(obj, use_ema, str(path))
    meta = {
        "step": obj.get("step"),
        "weights": "ema" if use_ema else "raw",
        "train_config": obj.get("config"),
        "autoencoder": obj.get("autoencoder"),
        "text_encoder": obj.get("text_encoder"),  # text-to-image: the frozen encoder it was trained with
    }  # the VAE spec + scaling that decodes samples (None: pixels)
    return save_model(model, out_path, metadata=meta)
