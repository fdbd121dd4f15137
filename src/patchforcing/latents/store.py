"""The latent store's file format: settings, shards with sidecars, the index; reading and verifying.

A store is a directory (see :mod:`patchforcing.latents` and ``docs/latents.md``)::

    DIR/encode.json                 the settings (a second encode must match them, or --overwrite)
    DIR/shard-00000.safetensors     mean, std (N, c, h, w), labels (N,) int64 [, mean_flip, std_flip]
                                    [, repa (N, T, D) [, repa_flip]: REPA encoder features]
    DIR/shard-00000.json            written after the shard: count, sha256, channel sums
    DIR/index.json                  written last: every shard with its count and sha256, the
                                    autoencoder spec with its scaling, resolution, flip, classes
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..autoencoders import AutoencoderSpec
from ..data import DataError
from ..utils.io import atomic_write, read_json, write_json_atomic

__all__ = [
    "LATENT_FORMAT",
    "FORMAT_VERSION",
    "SCALINGS",
    "DTYPES",
    "LatentStoreError",
    "read_index",
    "verify_latent_store",
]

LATENT_FORMAT = "patchforcing-latents"
FORMAT_VERSION = 1
#: ``--scaling`` choices: the VAE's own (scalar 0.18215 for the SD VAE) or per-channel data statistics
SCALINGS: tuple[str, ...] = ("vae", "per-channel")
#: storage dtypes of mean/std
DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}
_INDEX, _SETTINGS = "index.json", "encode.json"


class LatentStoreError(DataError):
    """A latent store that cannot be written, resumed or read (mismatched settings, bad shard)."""


def _shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def _sidecar_name(k: int) -> str:
    return f"shard-{k:05d}.json"


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _read_json(path: Path) -> Any:
    """:func:`~patchforcing.utils.io.read_json`, failures as :class:`LatentStoreError`."""
    try:
        return read_json(path)
    except (OSError, ValueError) as err:
        raise LatentStoreError(f"cannot read {path}: {err}") from None


def _settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _shard_done(out: Path, k: int, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The sidecar of shard ``k`` if the shard is complete and intact, else ``None``."""
    side, shard = out / _sidecar_name(k), out / _shard_name(k)
    if not (side.is_file() and shard.is_file()):
        return None
    try:
        info = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if info.get("settings_sha256") != _settings_hash(settings):
        return None
    if shard.stat().st_size != info.get("bytes") or _sha256(shard) != info.get("sha256"):
        return None
    return info


def _write_shard(out: Path, k: int, start: int, tensors: dict[str, Tensor], settings: dict[str, Any]) -> dict[str, Any]:
    """Write shard ``k`` then its sidecar (both atomically); returns the sidecar."""
    path = out / _shard_name(k)
    # no safetensors metadata: its key order is not stable, and equal latents should give equal bytes
    atomic_write(path, lambda tmp: save_file({n: t.contiguous() for n, t in tensors.items()}, tmp))
    mean = tensors["mean"].double()
    var = tensors["std"].double() ** 2
    n_pix = mean.shape[0] * mean.shape[2] * mean.shape[3]
    info = {
        "file": path.name,
        "shard": k,
        "start": start,
        "count": int(mean.shape[0]),
        "bytes": path.stat().st_size,
        "sha256": _sha256(path),
        "settings_sha256": _settings_hash(settings),
        # per-channel sums over items and pixels, for --scaling per-channel
        "stats": {
            "pixels": int(n_pix),
            "sum_mean": mean.sum(dim=(0, 2, 3)).tolist(),
            "sum_mean_sq": (mean**2).sum(dim=(0, 2, 3)).tolist(),
            "sum_var": var.sum(dim=(0, 2, 3)).tolist(),
        },
    }
    write_json_atomic(out / _sidecar_name(k), info)
    return info


def _channel_scaling(sidecars: list[dict[str, Any]], base: AutoencoderSpec) -> AutoencoderSpec:
    """Per-channel mean/std of posterior *samples* over the data: ``E[mu]`` and
    ``sqrt(Var[mu] + E[sigma^2])`` (exact, from the shards' sums)."""
    pixels = sum(s["stats"]["pixels"] for s in sidecars)
    c = len(sidecars[0]["stats"]["sum_mean"])
    tot = {key: np.zeros(c) for key in ("sum_mean", "sum_mean_sq", "sum_var")}
    for s in sidecars:
        for key in tot:
            tot[key] += np.asarray(s["stats"][key], dtype=np.float64)
    mean = tot["sum_mean"] / pixels
    var = np.maximum(tot["sum_mean_sq"] / pixels - mean**2, 0.0) + tot["sum_var"] / pixels
    std = np.sqrt(np.maximum(var, 1e-12))
    return AutoencoderSpec(
        kind=base.kind,
        source=base.source,
        scale_factor=1.0,
        shift_factor=0.0,
        latents_mean=tuple(mean.tolist()),
        latents_std=tuple(std.tolist()),
    )


def _prepare_out(out: Path, settings: dict[str, Any], overwrite: bool, num_shards: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    existing = out / _SETTINGS
    if existing.is_file():
        old = _read_json(existing)
        if old != settings:
            if not overwrite:
                diff = [k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
                raise LatentStoreError(
                    f"{out} holds latents encoded with other settings (differing: {', '.join(diff)}); "
                    "choose another --out, or pass --overwrite to re-encode everything"
                )
            for p in list(out.glob("shard-*.safetensors")) + list(out.glob("shard-*.json")) + [out / _INDEX]:
                if p.exists():
                    p.unlink()
    elif any(out.glob("shard-*")):
        raise LatentStoreError(
            f"{out} holds shards but no {_SETTINGS}; not a store made by this version "
            "(choose another --out or remove it)"
        )
    if (out / _INDEX).exists():  # rewritten at the end, after all shards are checked
        (out / _INDEX).unlink()
    for p in out.glob("shard-*.safetensors"):  # stale shards beyond the current count
        if int(p.stem.split("-")[1]) >= num_shards:
            p.unlink()
    write_json_atomic(existing, settings)


def _write_index(out: Path, settings: dict[str, Any], num_shards: int, dataset, spec: AutoencoderSpec) -> None:
    sidecars = []
    for k in range(num_shards):
        side, shard = out / _sidecar_name(k), out / _shard_name(k)
        info = _read_json(side) if side.is_file() else None  # checksums: verified when skipped, fresh when written
        if (
            info is None
            or info.get("settings_sha256") != _settings_hash(settings)
            or not shard.is_file()
            or shard.stat().st_size != info.get("bytes")
        ):
            raise LatentStoreError(
                f"shard {k} of {out} is missing after encoding; run the same command again to resume"
            )
        sidecars.append(info)
    total = sum(s["count"] for s in sidecars)
    if total != settings["num_items"]:
        raise LatentStoreError(f"{out}: the shards hold {total} items, the source {settings['num_items']}")
    if settings["scaling"] == "per-channel":
        spec = _channel_scaling(sidecars, spec)
    class_names = getattr(dataset, "class_names", None)
    index = {
        "format": LATENT_FORMAT,
        "version": FORMAT_VERSION,
        "num_items": total,
        "num_classes": settings["num_classes"],
        "class_names": list(class_names) if class_names else None,
        "resolution": settings["resolution"],
        "latent_shape": settings["latent_shape"],
        "flip": settings["flip"],
        "dtype": settings["dtype"],
        "shard_size": settings["shard_size"],
        "scaling": settings["scaling"],
        "autoencoder": spec.to_dict(),
        "source": settings["source"],
        "shards": [{k: s[k] for k in ("file", "start", "count", "bytes", "sha256")} for s in sidecars],
    }
    if settings.get("repa") is not None:  # cached REPA features: the encoder that made them
        index["repa"] = settings["repa"]
    write_json_atomic(out / _INDEX, index)


def read_index(path: str | os.PathLike) -> dict[str, Any]:
    """The ``index.json`` of a finished store (raises :class:`LatentStoreError` when there is
    none: the encode did not finish; run it again to resume)."""
    path = Path(path).expanduser()
    idx = path / _INDEX
    if not path.is_dir():
        raise LatentStoreError(
            f"latent store {str(path)!r} does not exist; make it with `patchforcing encode "
            f"IMAGES --vae VAE --out {path}`"
        )
    if not idx.is_file():
        hint = (
            " (an encode into it did not finish: run the same `patchforcing encode` command again to resume)"
            if (path / _SETTINGS).is_file()
            else "; make it with `patchforcing encode IMAGES --vae VAE --out DIR`"
        )
        raise LatentStoreError(f"{str(path)!r} has no {_INDEX}{hint}")
    index = _read_json(idx)
    if not isinstance(index, dict) or index.get("format") != LATENT_FORMAT:
        raise LatentStoreError(f"{idx} is not a {LATENT_FORMAT} index")
    if int(index.get("version", 0)) > FORMAT_VERSION:
        raise LatentStoreError(
            f"{idx} has format version {index['version']}; this patchforcing reads <= {FORMAT_VERSION}"
        )
    return index


def verify_latent_store(path: str | os.PathLike, checksums: bool = True) -> dict[str, Any]:
    """Check every shard of a store against its index: present, item count, size and (with
    ``checksums``) sha256. Returns the index; raises :class:`LatentStoreError` listing the bad shards."""
    path = Path(path).expanduser()
    index = read_index(path)
    bad = []
    total = 0
    for s in index["shards"]:
        f = path / s["file"]
        if not f.is_file():
            bad.append(f"{s['file']}: missing")
            continue
        if f.stat().st_size != s["bytes"]:
            bad.append(f"{s['file']}: {f.stat().st_size} bytes, index says {s['bytes']}")
            continue
        if checksums and _sha256(f) != s["sha256"]:
            bad.append(f"{s['file']}: sha256 mismatch (corrupt)")
            continue
        try:
            with safe_open(str(f), framework="pt") as h:
                n = h.get_slice("labels").get_shape()[0]
                repa = index.get("repa")
                if repa is not None:
                    names = ("repa", "repa_flip") if index["flip"] else ("repa",)
                    want = [n, repa["tokens"], repa["dim"]]
                    shapes = {k: list(h.get_slice(k).get_shape()) if k in h.keys() else None for k in names}
                    wrong = {k: v for k, v in shapes.items() if v != want}
                    if wrong:
                        bad.append(f"{s['file']}: REPA features {wrong}, expected {want}")
                        continue
        except Exception as err:  # unreadable safetensors
            bad.append(f"{s['file']}: unreadable ({err})")
            continue
        if n != s["count"]:
            bad.append(f"{s['file']}: {n} items, index says {s['count']}")
        total += n
    if not bad and total != index["num_items"]:
        bad.append(f"{total} items in the shards, index says {index['num_items']}")
    if bad:
        raise LatentStoreError(
            f"latent store {path} failed verification:\n  "
            + "\n  ".join(bad)
            + "\nre-run `patchforcing encode` with the same arguments to re-encode bad shards"
        )
    return index
