"""Data layer: image data sets yielding ``(image float32 (3, R, R) in [-1, 1], label int)``.

Every data set here has ``num_classes``, ``resolution``, ``channels`` (3) and ``set_epoch(epoch)``.

* :class:`SyntheticShapes` - procedural, class-conditional, no files (``kind: synthetic``).
* :class:`ImageFolderDataset` - ImageNet-layout folder, ADM centre crop (``kind: folder``).
* :class:`NpzImageDataset` - ``uint8`` NHWC arrays in an ``.npz`` (``kind: npz``).

Captioned data sets yield ``(image, caption: str)`` instead (:mod:`.captions`, :mod:`.shards`):
:class:`CaptionedNpzDataset`, :class:`CaptionedFolderDataset` (sidecar ``.txt``),
:class:`ShardDataset` (WebDataset tar shards, streamed), :class:`WithCaptions`; made from a config
dict by :func:`build_captioned_dataset`.

:func:`build_dataset` makes one from a small config dict.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from torch.utils.data import Dataset

from .arrays import NpzImageDataset
from .captions import (
    CAPTIONED_KINDS,
    CaptionedFolderDataset,
    CaptionedNpzDataset,
    WithCaptions,
    build_captioned_dataset,
    read_npz_captions,
    read_sidecar_captions,
)
from .convert import composite_on_white, image_grid, save_image_grid, to_float, to_uint8
from .errors import DataError
from .folder import IMG_EXTENSIONS, ImageFolderDataset, center_crop_adm, load_rgb, scan_image_files
from .preview import class_examples, save_class_grid
from .shards import ShardDataset, expand_shards
from .synthetic import SyntheticShapes, save_synthetic_grid

__all__ = [
    "DataError",
    "SyntheticShapes",
    "ImageFolderDataset",
    "NpzImageDataset",
    "CAPTIONED_KINDS",
    "CaptionedNpzDataset",
    "CaptionedFolderDataset",
    "ShardDataset",
    "WithCaptions",
    "build_captioned_dataset",
    "expand_shards",
    "read_npz_captions",
    "read_sidecar_captions",
    "build_dataset",
    "DATASET_KINDS",
    "data_argument_kind",
    "to_uint8",
    "to_float",
    "composite_on_white",
    "image_grid",
    "save_image_grid",
    "class_examples",
    "save_class_grid",
    "save_synthetic_grid",
    "scan_image_files",
    "center_crop_adm",
    "load_rgb",
    "IMG_EXTENSIONS",
]

#: accepted ``kind`` values (aliases map to the same class)
DATASET_KINDS: dict[str, str] = {
    "synthetic": "synthetic",
    "shapes": "synthetic",
    "folder": "folder",
    "imagefolder": "folder",
    "image_folder": "folder",
    "npz": "npz",
}


def data_argument_kind(text: str | os.PathLike) -> str:
    """What a command-line DATA argument names: ``"synthetic"``, ``"latents"`` (a directory with an
    ``index.json``), ``"folder"``, ``"npz"`` (``.npz``/``.npy``), ``"config"`` (a ``.yaml`` file or a
    bare preset name), or ``"unknown"``."""
    spec = os.fspath(text)
    p = os.path.expanduser(spec)
    if spec.lower() in ("synthetic", "shapes"):
        return "synthetic"
    if os.path.isdir(p):
        return "latents" if os.path.isfile(os.path.join(p, "index.json")) else "folder"
    ext = os.path.splitext(p)[1].lower()
    if ext in (".npz", ".npy"):
        return "npz"
    if ext in (".yaml", ".yml") or (ext == "" and "/" not in spec and os.sep not in spec):
        return "config"
    return "unknown"


_COMMON = {"kind", "resolution", "seed", "num_classes"}
_KEYS: dict[str, set[str]] = {
    # ``flip`` and ``path: null`` are accepted for synthetic so one config template fits every kind;
    # synthetic images are never flipped (they are already randomised per item).
    "synthetic": _COMMON | {"length", "flip", "path"},
    "folder": _COMMON | {"path", "flip", "allow_flat", "max_bad_fraction", "min_attempts"},
    "npz": _COMMON | {"path", "flip", "key", "labels_key", "classes_key"},
}


def build_dataset(spec: Mapping[str, Any]) -> Dataset:
    """Build a data set from a config dict.

    Examples::

        build_dataset({"kind": "synthetic", "resolution": 32, "num_classes": 8, "length": 10000, "seed": 0})
        build_dataset({"kind": "folder", "path": "/data/imagenet/train", "resolution": 256, "flip": True})
        build_dataset({"kind": "npz", "path": "../shared/datasets/emoji-google-64.npz", "resolution": 32})

    Keys: ``kind`` (required; ``synthetic`` | ``folder`` | ``npz``), ``path`` (required for folder
    and npz), ``resolution`` (required for folder; default 32 for synthetic, stored size for npz),
    ``flip`` (default True; ignored by synthetic), ``seed`` (0), ``num_classes`` (synthetic: the
    number of classes, default 8; folder/npz: optional check that the labels fit in it),
    ``length`` (synthetic only, default 10000), plus kind-specific ones (``allow_flat``,
    ``max_bad_fraction``, ``min_attempts``; ``key``, ``labels_key``, ``classes_key``).

    Raises:
        DataError: unknown kind, unknown key, missing path/resolution, or a data set that fails to load.
    """
    if not isinstance(spec, Mapping):
        raise DataError(f"dataset spec must be a dict, got {type(spec).__name__}")
    raw_kind = spec.get("kind")
    if raw_kind is None:
        raise DataError(f"dataset spec has no 'kind'; expected one of {sorted(set(DATASET_KINDS))}")
    kind = DATASET_KINDS.get(str(raw_kind).lower())
    if kind is None:
        raise DataError(f"unknown dataset kind {raw_kind!r}; expected one of {sorted(set(DATASET_KINDS))}")
    unknown = set(spec) - _KEYS[kind]
    if unknown:
        raise DataError(
            f"dataset spec for kind {raw_kind!r} has unknown key(s) {sorted(unknown)}; allowed: {sorted(_KEYS[kind])}"
        )
    seed = int(spec.get("seed", 0) or 0)
    resolution = spec.get("resolution")
    num_classes = spec.get("num_classes")

    if kind == "synthetic":
        if spec.get("path") is not None:
            raise DataError(f"dataset kind 'synthetic' takes no path (got {spec['path']!r})")
        return SyntheticShapes(
            size=int(resolution if resolution is not None else 32),
            num_classes=int(num_classes if num_classes is not None else 8),
            length=int(spec.get("length", 10_000)),
            seed=seed,
        )

    path = spec.get("path")
    if path is None or str(path) == "":
        raise DataError(f"dataset kind {raw_kind!r} needs a 'path'")
    path = os.path.expanduser(os.fspath(path))
    flip = bool(spec.get("flip", True))
    ds: ImageFolderDataset | NpzImageDataset
    if kind == "folder":
        if resolution is None:
            raise DataError(f"dataset kind {raw_kind!r} ({path!r}) needs a 'resolution'")
        extra = {k: spec[k] for k in ("allow_flat", "max_bad_fraction", "min_attempts") if k in spec}
        ds = ImageFolderDataset(path, int(resolution), flip=flip, seed=seed, **extra)
    else:
        extra = {k: spec[k] for k in ("key", "labels_key", "classes_key") if k in spec}
        ds = NpzImageDataset(path, None if resolution is None else int(resolution), flip=flip, seed=seed, **extra)
    if num_classes is not None and int(num_classes) < ds.num_classes:
        raise DataError(f"{path!r} has {ds.num_classes} classes but the spec says num_classes={num_classes}")
    return ds
