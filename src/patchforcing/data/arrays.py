"""``NpzImageDataset``: images stored as one ``uint8`` NHWC array in a ``.npz`` file.

The file is read once with ``allow_pickle=False``; transparency is composited on white and the
images are centre-cropped to a square and resized to ``resolution`` (box/area filter when
shrinking, bicubic when enlarging) once, at construction. The result is kept as ``uint8``;
items are converted to float one at a time.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .augment import hflip_flag
from .convert import composite_on_white, to_float
from .errors import DataError

__all__ = ["NpzImageDataset"]

_CHUNK = 1024  # images converted at a time (bounds temporary memory)


class NpzImageDataset(Dataset):
    """Images (and optional labels) from a ``.npz`` file.

    Args:
        path: the ``.npz`` file (a plain ``.npy`` array is read as images without labels).
        resolution: output side; ``None`` keeps the stored size (non-square images are
            centre-cropped to their short side either way).
        flip: random horizontal flip, a fair coin fixed per ``(seed, epoch, index)`` (:meth:`set_epoch`).
        seed: seed of the flip.
        key: name of the image array, ``uint8`` ``(N, H, W, C)`` with ``C`` in {1, 3, 4}
            (``(N, H, W)`` is read as ``C = 1``); ``C = 4`` is straight-alpha RGBA, composited on
            white (``rgb * a + 255 * (1 - a)``). A file without ``images`` but with ``arr_0`` (the
            ADM / ``np.savez`` layout, e.g. ``patchforcing sample``'s output) is read with
            ``key="arr_0"`` and ``labels_key="arr_1"`` when the defaults are in use.
        labels_key: name of the integer ``(N,)`` label array; if the file has none, all labels are 0.
        classes_key: name of an optional ``(K,)`` string array of class names; when present it fixes
            ``num_classes = K`` and ``class_names``.

    Items: ``(image, label)``, ``image`` float32 ``(3, resolution, resolution)`` in ``[-1, 1]``.

    Attributes:
        images (``uint8 (N, R, R, 1 or 3)``, after compositing/resizing), labels (``int64 (N,)``),
        num_classes, class_names (``list[str]`` or ``None``), resolution, channels (3).
    """

    channels: int = 3

    def __init__(
        self,
        path: str | os.PathLike,
        resolution: int | None = None,
        flip: bool = True,
        seed: int = 0,
        key: str = "images",
        labels_key: str = "labels",
        classes_key: str = "classes",
    ) -> None:
        self.path = Path(path).expanduser()
        self.flip = bool(flip)
        self.seed = int(seed)
        self.epoch = 0
        if resolution is not None and int(resolution) < 1:
            raise DataError(f"NpzImageDataset: resolution must be >= 1 or None, got {resolution!r}")
        if not self.path.is_file():
            raise DataError(f"npz file {str(self.path)!r} does not exist (or is not a file)")

        images, labels, classes = self._read(key, labels_key, classes_key)
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or images.shape[-1] not in (1, 3, 4) or images.shape[0] == 0:
            raise DataError(
                f"{str(self.path)!r}: array {key!r} has shape {images.shape}; expected a non-empty "
                "(N, H, W, C) NHWC array with C in 1, 3 or 4"
            )
        if images.dtype != np.uint8:
            raise DataError(f"{str(self.path)!r}: array {key!r} has dtype {images.dtype}; expected uint8")
        n, h, w, _ = images.shape
        self.resolution = int(resolution) if resolution is not None else min(h, w)
        self.images = self._prepare(images)

        if labels is None:
            self.labels = np.zeros(n, dtype=np.int64)
        else:
            if labels.ndim != 1 or len(labels) != n or not np.issubdtype(labels.dtype, np.integer):
                raise DataError(
                    f"{str(self.path)!r}: labels {labels_key!r} have shape {labels.shape}, dtype "
                    f"{labels.dtype}; expected integers of shape ({n},)"
                )
            if labels.min() < 0:
                raise DataError(f"{str(self.path)!r}: labels {labels_key!r} contain negative values")
            self.labels = labels.astype(np.int64)
        if classes is not None:
            self.class_names: list[str] | None = [str(c) for c in classes.reshape(-1)]
            self.num_classes = len(self.class_names)
            if self.labels.max() >= self.num_classes:
                raise DataError(
                    f"{str(self.path)!r}: label {int(self.labels.max())} out of range for the "
                    f"{self.num_classes} names in {classes_key!r}"
                )
        else:
            self.class_names = None
            self.num_classes = int(self.labels.max()) + 1

    def _read(
        self, key: str, labels_key: str, classes_key: str
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        where = str(self.path)
        try:
            loaded = np.load(self.path, allow_pickle=False)
            if isinstance(loaded, np.ndarray):  # a plain .npy: images only
                return loaded, None, None
            with loaded as z:
                if key == "images" and key not in z.files and "arr_0" in z.files:  # the ADM layout
                    key = "arr_0"
                    if labels_key == "labels" and "labels" not in z.files:
                        labels_key = "arr_1"
                if key not in z.files:
                    raise DataError(f"{where!r} has no array {key!r}; arrays in it: {sorted(z.files)}")
                images = z[key]
                labels = z[labels_key] if labels_key and labels_key in z.files else None
                classes = z[classes_key] if classes_key and classes_key in z.files else None
        except DataError:
            raise
        except ValueError as err:
            if "pickle" in str(err):
                raise DataError(
                    f"{where!r} needs pickle to load ({err}); refusing (allow_pickle=False). Store "
                    "images/labels as plain numeric arrays and class names as a fixed-width string array"
                ) from None
            raise DataError(f"cannot read {where!r} as .npz: {err}") from None
        except (OSError, EOFError, zipfile.BadZipFile, AttributeError) as err:
            raise DataError(f"cannot read {where!r} as .npz: {type(err).__name__}: {err}") from None
        return images, labels, classes

    def _prepare(self, images: np.ndarray) -> np.ndarray:
        """Composite alpha, centre-crop to square, resize: -> ``uint8 (N, R, R, 1 or 3)``."""
        n, h, w, c = images.shape
        side, res = min(h, w), self.resolution
        top, left = (h - side) // 2, (w - side) // 2
        out = np.empty((n, res, res, 3 if c == 4 else c), dtype=np.uint8)
        for s in range(0, n, _CHUNK):
            block = images[s : s + _CHUNK, top : top + side, left : left + side]
            if c == 4:
                block = composite_on_white(block)
            if side == res:
                out[s : s + len(block)] = block
            elif side % res == 0:  # exact box filter: mean of (f x f) blocks, rounded
                f = side // res
                sums = np.full((len(block), res, res, block.shape[-1]), (f * f) // 2, dtype=np.uint32)
                for dy in range(f):
                    for dx in range(f):
                        sums += block[:, dy::f, dx::f]
                out[s : s + len(block)] = sums // (f * f)
            else:
                filt = Image.BOX if res < side else Image.BICUBIC
                for k, im in enumerate(block):
                    pil = Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im)
                    r = np.asarray(pil.resize((res, res), filt))
                    out[s + k] = r[..., None] if r.ndim == 2 else r
        return out

    def __len__(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        """Select the flips of ``epoch`` (call before each epoch, in every worker/rank alike)."""
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        n = len(self.images)
        i = int(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for {n} images in {str(self.path)!r}")
        arr = self.images[i]
        if self.flip and hflip_flag(self.seed, self.epoch, i):
            arr = arr[:, ::-1]
        x = to_float(torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))))
        if x.shape[0] == 1:
            x = x.expand(3, -1, -1).clone()
        return x, int(self.labels[i])
