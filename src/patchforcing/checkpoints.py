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

import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from .models.transformer import PatchForcingTransformer

__all__ = [
    "CheckpointError",
    "RELEASED_TARGETS",
    "atomic_write",
    "torch_save_atomic",
    "safe_torch_load",
    "load_state_dict_strict",
    "load_model",
    "save_model",
    "save_released_format",
    "model_from_released_config",
    "export_run",
]

TRAIN_FORMAT = "patchforcing-train"
EXPORT_FORMAT = "patchforcing"

#: class names of the authors' code (last component of ``config.target``) -> our family flags
RELEASED_TARGETS: dict[str, dict[str, bool]] = {
    "PatchForcingDiT": {"per_patch_time": True},
}
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


class CheckpointError(ValueError):
    """A weights file that cannot be read, or that does not fit the model."""


# --------------------------------------------------------------------------------------------
# Atomic writes and safe reads
# --------------------------------------------------------------------------------------------


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Write ``path`` atomically: ``write(tmp_path)``, fsync, rename over ``path``, fsync the dir.

    A crash at any point leaves either the old file or the new one, never a partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:  # pragma: no cover - platforms without directory fsync
        pass
    return path


def torch_save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through :func:`atomic_write`."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def safe_torch_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with errors that say what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} holds pickled Python objects beyond tensors and plain containers; refusing "
            f"to unpickle code (weights_only=True). Re-save it as a plain state_dict. Details: "
            f"{str(e).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path} as a torch checkpoint (truncated or corrupt?): {e}") from None


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


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, Tensor], source: str = "checkpoint") -> None:
    """Load ``state_dict`` into ``model`` exactly, or raise :class:`CheckpointError` listing
    the missing, unexpected and mis-shaped keys."""
    sd = _strip_prefixes(state_dict)
    own = model.state_dict()
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
# The authors' released format
# --------------------------------------------------------------------------------------------


def model_from_released_config(config: Mapping[str, Any]) -> PatchForcingTransformer:
    """Map ``{"target": "...PatchForcingDiT", "params": {...}}`` to our model (nothing imported)."""
    if not isinstance(config, Mapping) or "target" not in config:
        raise CheckpointError(f"released config must have 'target' and 'params', got keys {list(config)}")
    target = str(config["target"])
    cls_name = target.rsplit(".", 1)[-1]
    if cls_name not in RELEASED_TARGETS:
        raise CheckpointError(
            f"unknown model target {target!r}; known: {sorted(RELEASED_TARGETS)} "
            "(the target is only matched by name, never imported)"
        )
    params = dict(config.get("params") or {})
    unknown = sorted(set(params) - _RELEASED_PARAMS - _IGNORED_PARAMS)
    if unknown:
        raise CheckpointError(f"released config of {cls_name} has parameters we do not know: {unknown}")
    if params.get("learn_sigma"):
        raise CheckpointError("learn_sigma=True checkpoints are not supported (no sigma channel in this model)")
    kwargs = {k: params[k] for k in _RELEASED_PARAMS if k in params}
    kwargs.update(RELEASED_TARGETS[cls_name])
    kwargs.setdefault("predict_uncertainty", True)
    return PatchForcingTransformer(**kwargs)


def save_released_format(model: PatchForcingTransformer, path: str | os.PathLike) -> Path:
    """Write ``model`` in the authors' released layout (e.g. for fixtures and interoperability)."""
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
    obj = {
        "config": {"target": "patch_flow.models.pf_transformer.PatchForcingDiT", "params": params},
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
    model = model_from_released_config(cfg)
    prefix = "ema_model." if use_ema else "model."
    sd = {k[len(prefix) :]: v for k, v in obj["state_dict"].items() if k.startswith(prefix)}
    if not sd:
        raise CheckpointError(f"{source}: no '{prefix}' weights in the training checkpoint")
    load_state_dict_strict(model, sd, source)
    return model


# --------------------------------------------------------------------------------------------
# Our formats
# --------------------------------------------------------------------------------------------


def save_model(model: PatchForcingTransformer, path: str | os.PathLike, metadata: Mapping[str, Any] | None = None) -> Path:
    """Export weights + config to one self-contained ``.safetensors`` file (atomic).

    ``metadata`` (JSON-serialisable; e.g. the VAE and its scaling, the training config) is
    stored alongside under the key ``"extra"``.
    """
    from safetensors.torch import save_file

    meta = {
        "format": EXPORT_FORMAT,
        "model_config": json.dumps(model.config.to_dict()),
        "extra": json.dumps(dict(metadata or {})),
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``extra`` metadata saved by :func:`save_model` (``{}`` when absent)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta.get("extra", "{}"))


def _load_safetensors(path: Path) -> PatchForcingTransformer:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {path} as safetensors: {e}") from None
    if "model_config" not in meta:
        raise CheckpointError(
            f"{path} has no 'model_config' metadata; build the model yourself and use "
            "load_state_dict_strict(model, safetensors.torch.load_file(path))"
        )
    model = PatchForcingTransformer.from_config(json.loads(meta["model_config"]))
    load_state_dict_strict(model, sd, str(path))
    return model


def _find_in_dir(path: Path) -> Path:
    for candidate in ("model.safetensors", "checkpoints/last.pt", "last.pt"):
        if (path / candidate).is_file():
            return path / candidate
    raise CheckpointError(
        f"{path} is a directory without model.safetensors or checkpoints/last.pt "
        "(expected an exported model or a training run directory)"
    )


def _hub_download(source: str, filename: str | None) -> Path:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise CheckpointError(
            f"{source!r} is not a local file; to load from the Hugging Face hub install "
            "'patchforcing[hub]' (or pass a local path)"
        ) from None
    repo = source[len("hf://") :] if source.startswith("hf://") else source
    parts = repo.split("/")
    if len(parts) > 2 and filename is None:
        repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    if filename is None:
        filename = "model.safetensors"
    try:
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
        return Path(hf_hub_download(repo_id=repo, filename=filename, local_files_only=offline))
    except Exception as e:  # offline, missing repo/file, auth: report plainly
        raise CheckpointError(f"could not fetch {filename!r} from hub repo {repo!r}: {e}") from None


def load_model(
    source: str | os.PathLike,
    *,
    map_location: Any = "cpu",
    use_ema: bool = True,
    filename: str | None = None,
) -> PatchForcingTransformer:
    """Load a model from any supported file, directory or hub id; returns it in eval mode.

    Args:
        source: a released ``.ckpt``, an exported ``.safetensors``, a run directory, a training
            checkpoint, or a hub id (``owner/name``, ``hf://owner/name/file``).
        map_location: where tensors are loaded (the model is returned on that device for
            torch files; move it with ``.to()``).
        use_ema: take the EMA weights of training checkpoints (default).
        filename: file inside a hub repo.
    """
    src = str(source)
    path = Path(source)
    if not path.exists():
        looks_like_hub = src.startswith("hf://") or (src.count("/") >= 1 and not src.startswith((".", "/", "~")))
        if looks_like_hub:
            path = _hub_download(src, filename)
        else:
            raise CheckpointError(f"no such checkpoint: {src}")
    if path.is_dir():
        path = _find_in_dir(path)
    if path.suffix == ".safetensors":
        model = _load_safetensors(path)
    else:
        obj = safe_torch_load(path, map_location)
        model = _model_from_torch_object(obj, use_ema, str(path))
    return model.eval()


def _model_from_torch_object(obj: Any, use_ema: bool, source: str) -> PatchForcingTransformer:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: expected a dict checkpoint, got {type(obj).__name__}")
    if obj.get("format") == TRAIN_FORMAT:
        model = PatchForcingTransformer.from_config(obj["model_config"])
        key = "ema" if use_ema and obj.get("ema") is not None else "model"
        load_state_dict_strict(model, obj[key], f"{source} [{key}]")
        return model
    if isinstance(obj.get("config"), Mapping) and "state_dict" in obj:
        model = model_from_released_config(obj["config"])
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
        out: the ``.safetensors`` file to write.
        use_ema: export the EMA weights (default) instead of the raw ones.
    """
    path = Path(run)
    if path.is_dir():
        path = path / "checkpoints" / "last.pt"
    obj = safe_torch_load(path)
    if not isinstance(obj, Mapping) or obj.get("format") != TRAIN_FORMAT:
        raise CheckpointError(f"{path} is not a patchforcing training checkpoint")
    model = _model_from_torch_object(obj, use_ema, str(path))
    meta = {"step": obj.get("step"), "weights": "ema" if use_ema else "raw", "train_config": obj.get("config"),
            "autoencoder": obj.get("autoencoder")}  # the VAE spec + scaling that decodes samples (None: pixels)
    if Path(out).suffix != ".safetensors":
        raise CheckpointError(f"--out must end in .safetensors, got {out}")
    return save_model(model, out, metadata=meta)
