"""Captioned image data: items ``(image float32 (3, R, R) in [-1, 1], caption: str)``.

The images are read, cropped and resized exactly as by the class-conditional loaders this wraps
(:class:`~patchforcing.data.NpzImageDataset`, :class:`~patchforcing.data.ImageFolderDataset`); only
the second element of an item is a caption instead of a label.

* :class:`CaptionedNpzDataset` -- an ``.npz`` with an ``images`` array and a ``captions`` string
  array, one caption per image (``labels`` / ``classes`` are kept as attributes, e.g. for the
  category accuracy of generated images). The emoji sets carry one ("grinning face").
* :class:`CaptionedFolderDataset` -- an image folder (class sub-folders or flat) where every image
  has a sidecar caption file of the same name with ``.txt`` (``cat/001.jpg`` + ``cat/001.txt``,
  UTF-8, surrounding whitespace stripped).
* :class:`WithCaptions` -- a caption list attached to any data set of the same item order (a latent
  store encoded from a captioned source, or an online-encoded image data set).
* WebDataset tar shards: :class:`~patchforcing.data.shards.ShardDataset` (streamed).

Flips default to off here: captions may name directions ("left arrow") that a mirror would
contradict. :func:`build_captioned_dataset` makes any of them from a config dict.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .arrays import NpzImageDataset
from .errors import DataError
from .folder import IMG_EXTENSIONS, ImageFolderDataset
from .shards import ShardDataset

__all__ = [
    "CAPTIONED_KINDS",
    "CaptionedNpzDataset",
    "CaptionedFolderDataset",
    "WithCaptions",
    "build_captioned_dataset",
    "read_npz_captions",
    "read_sidecar_captions",
]

#: accepted ``kind`` values of :func:`build_captioned_dataset` (aliases map to the same loader)
CAPTIONED_KINDS: dict[str, str] = {
    "npz": "npz",
    "folder": "folder",
    "imagefolder": "folder",
    "image_folder": "folder",
    "shards": "shards",
    "webdataset": "shards",
    "wds": "shards",
}


def read_npz_captions(path: str | os.PathLike, key: str = "captions", expected: int | None = None) -> list[str]:
    """The ``(N,)`` string array ``key`` of an ``.npz`` file as a list of ``str``.

    Raises:
        DataError: no such array (the message lists the arrays there), not a string array, a
            length other than ``expected``, or an object array (which needs pickle: refused).
    """
    where = str(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            if key not in z.files:
                raise DataError(
                    f"{where!r} has no caption array {key!r}; arrays in it: {sorted(z.files)}. Add one "
                    "string per image (np.savez(..., captions=np.array(list_of_str)))"
                )
            arr = z[key]
    except DataError:
        raise
    except ValueError as err:
        if "pickle" in str(err):
            raise DataError(
                f"{where!r}: the caption array {key!r} needs pickle to load (an object array); refusing. "
                "Store captions as a fixed-width string array: np.array(list_of_str)"
            ) from None
        raise DataError(f"cannot read {where!r} as .npz: {err}") from None
    except (OSError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(f"cannot read {where!r} as .npz: {type(err).__name__}: {err}") from None
    if arr.ndim != 1 or arr.dtype.kind not in "US":
        raise DataError(f"{where!r}: captions {key!r} have shape {arr.shape}, dtype {arr.dtype}; expected (N,) strings")
    if expected is not None and len(arr) != expected:
        raise DataError(f"{where!r}: {len(arr)} captions in {key!r} for {expected} images")
    if arr.dtype.kind == "S":
        try:
            return [bytes(c).decode("utf-8") for c in arr]
        except UnicodeDecodeError as err:
            raise DataError(f"{where!r}: captions {key!r} are not UTF-8 ({err})") from None
    return [str(c) for c in arr]


class CaptionedNpzDataset(NpzImageDataset):
    """Images and captions from an ``.npz``: items ``(image, caption)``.

    Args: as :class:`~patchforcing.data.NpzImageDataset` (``flip`` defaults to False), plus
        ``captions_key``: the ``(N,)`` string array of captions.

    Attributes: ``captions`` (``list[str]``, item order), and those of the image data set
    (``labels``, ``class_names``, ``num_classes``, ``resolution``, ``channels``).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        resolution: int | None = None,
        flip: bool = False,
        seed: int = 0,
        key: str = "images",
        captions_key: str = "captions",
        labels_key: str = "labels",
        classes_key: str = "classes",
    ) -> None:
        super().__init__(
            path, resolution, flip=flip, seed=seed, key=key, labels_key=labels_key, classes_key=classes_key
        )
        self.captions = read_npz_captions(self.path, captions_key, expected=len(self.images))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:  # type: ignore[override]
        x, _ = super().__getitem__(index)
        i = int(index)
        return x, self.captions[i + len(self.captions) if i < 0 else i]


def read_sidecar_captions(files: Sequence[str | os.PathLike], ext: str = ".txt", missing: str = "error") -> list[str]:
    """The caption of each image file: the UTF-8 text of the file of the same name with ``ext``,
    surrounding whitespace stripped.

    Args:
        missing: ``"error"`` (a :class:`DataError` naming how many and the first) or ``"empty"``
            (the empty caption, i.e. those images are trained unconditionally).
    """
    if missing not in ("error", "empty"):
        raise DataError(f"missing_caption must be 'error' or 'empty', got {missing!r}")
    ext = ext if ext.startswith(".") else "." + ext
    out: list[str] = []
    absent: list[Path] = []
    for f in files:
        side = Path(f).with_suffix(ext)
        try:
            out.append(side.read_text(encoding="utf-8").strip())
        except FileNotFoundError:
            absent.append(side)
            out.append("")
        except UnicodeDecodeError as err:
            raise DataError(f"caption file {str(side)!r} is not UTF-8 text ({err})") from None
        except OSError as err:
            raise DataError(f"cannot read caption file {str(side)!r}: {err}") from None
    if absent and missing == "error":
        raise DataError(
            f"{len(absent)} of {len(out)} images have no caption file (e.g. {str(absent[0])!r}); write one "
            f"{ext} file per image (same name, {ext} instead of the image extension), or pass "
            "missing_caption='empty' to train those images unconditionally"
        )
    return out


class CaptionedFolderDataset(Dataset):
    """An image folder with a sidecar ``.txt`` caption per image: items ``(image, caption)``.

    Args: as :class:`~patchforcing.data.ImageFolderDataset` (``flip`` defaults to False), plus
        ``caption_ext`` (``".txt"``) and ``missing_caption`` (``"error"`` | ``"empty"``, see
        :func:`read_sidecar_captions`). Captions are read once, at construction.

    An unreadable image is replaced by a deterministic other one, as in the image folder; its
    caption comes with it.

    Attributes: ``captions`` (item order), ``samples`` (``(path, label)``), ``labels``,
    ``class_names``, ``num_classes``, ``resolution``, ``channels`` (3), ``root``, ``bad_files``.
    """

    channels: int = 3

    def __init__(
        self,
        root: str | os.PathLike,
        resolution: int,
        flip: bool = False,
        seed: int = 0,
        allow_flat: bool = True,
        extensions: tuple[str, ...] = IMG_EXTENSIONS,
        caption_ext: str = ".txt",
        missing_caption: str = "error",
        max_bad_fraction: float = 0.5,
        min_attempts: int = 20,
    ) -> None:
        images = ImageFolderDataset(
            root,
            resolution,
            flip=flip,
            seed=seed,
            allow_flat=allow_flat,
            extensions=extensions,
            max_bad_fraction=max_bad_fraction,
            min_attempts=min_attempts,
        )
        self.root = images.root
        self.samples: list[tuple[str, int]] = list(images.samples)
        self.labels = images.labels
        self.class_names = images.class_names
        self.num_classes = images.num_classes
        self.resolution = images.resolution
        self.captions = read_sidecar_captions([p for p, _ in self.samples], caption_ext, missing_caption)
        # the wrapped folder returns each file's own index as its "label", so that the caption of
        # a substitute for an unreadable file is the substitute's
        images.samples = [(p, i) for i, (p, _) in enumerate(self.samples)]
        self.images = images

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self.images.set_epoch(epoch)

    @property
    def bad_files(self) -> list[str]:
        return self.images.bad_files

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        x, j = self.images[index]
        return x, self.captions[j]


class WithCaptions(Dataset):
    """``dataset`` (items ``(x, anything)``) with item ``i``'s second element replaced by ``captions[i]``.

    For data sets in the order of a captioned source, e.g. a latent store encoded from a
    :class:`CaptionedNpzDataset`'s file (``WithCaptions(LatentDataset(dir), npz.captions)``) or an
    online-encoded image data set. Other attributes (``set_epoch``, ``resolution``,
    ``input_size``, ...) are the wrapped data set's.
    """

    def __init__(self, dataset: Dataset, captions: Sequence[str]):
        n = len(dataset)  # type: ignore[arg-type]
        if len(captions) != n:
            raise DataError(f"{len(captions)} captions for a data set of {n} items")
        bad = next((i for i, c in enumerate(captions) if not isinstance(c, str)), None)
        if bad is not None:
            raise DataError(f"caption {bad} is a {type(captions[bad]).__name__}, not a string")
        self.dataset = dataset
        self.captions = list(captions)

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> tuple[Any, str]:
        x, _ = self.dataset[index]
        i = int(index)
        return x, self.captions[i + len(self.captions) if i < 0 else i]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("dataset", "captions"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


_COMMON = {"kind", "path", "resolution", "flip", "seed"}
_KEYS: dict[str, set[str]] = {
    "npz": _COMMON | {"key", "captions_key", "labels_key", "classes_key"},
    "folder": _COMMON | {"allow_flat", "caption_ext", "missing_caption", "max_bad_fraction", "min_attempts"},
    "shards": _COMMON | {"shuffle", "shuffle_buffer", "rank", "world_size"},
}


def build_captioned_dataset(spec: Mapping[str, Any]) -> Dataset:
    """A captioned data set from a config dict.

    Examples::

        build_captioned_dataset({"kind": "npz", "path": "emoji-google-64.npz", "resolution": 32})
        build_captioned_dataset({"kind": "folder", "path": "/data/captioned", "resolution": 256})
        build_captioned_dataset({"kind": "shards", "path": "shards/{000000..000999}.tar", "resolution": 256})

    Keys: ``kind`` (``npz`` | ``folder`` | ``shards``), ``path`` (required), ``resolution``
    (required for folder and shards; npz: default the stored size), ``flip`` (default False),
    ``seed`` (0); npz: ``key``, ``captions_key``, ``labels_key``, ``classes_key``; folder:
    ``allow_flat``, ``caption_ext``, ``missing_caption``, ``max_bad_fraction``, ``min_attempts``;
    shards: ``shuffle``, ``shuffle_buffer``, ``rank``, ``world_size``.

    Raises:
        DataError: unknown kind or key, missing path/resolution, a data set that fails to load.
    """
    if not isinstance(spec, Mapping):
        raise DataError(f"dataset spec must be a dict, got {type(spec).__name__}")
    raw = spec.get("kind")
    kind = CAPTIONED_KINDS.get(str(raw).lower()) if raw is not None else None
    if kind is None:
        raise DataError(f"captioned dataset kind must be one of {sorted(CAPTIONED_KINDS)}, got {raw!r}")
    unknown = set(spec) - _KEYS[kind]
    if unknown:
        raise DataError(
            f"captioned dataset spec ({raw!r}) has unknown key(s) {sorted(unknown)}; allowed: {sorted(_KEYS[kind])}"
        )
    path = spec.get("path")
    if path is None or str(path) == "":
        raise DataError(f"captioned dataset kind {raw!r} needs a 'path'")
    resolution = spec.get("resolution")
    if kind != "npz" and resolution is None:
        raise DataError(f"captioned dataset kind {raw!r} ({path!r}) needs a 'resolution'")
    common = {"flip": bool(spec.get("flip", False)), "seed": int(spec.get("seed", 0) or 0)}
    extra = {k: spec[k] for k in _KEYS[kind] - _COMMON if k in spec}
    if kind == "npz":
        res = None if resolution is None else int(resolution)
        return CaptionedNpzDataset(os.path.expanduser(os.fspath(path)), res, **common, **extra)
    if kind == "folder":
        return CaptionedFolderDataset(os.path.expanduser(os.fspath(path)), int(resolution), **common, **extra)
    return ShardDataset(path, int(resolution), **common, **extra)
