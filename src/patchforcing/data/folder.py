"""``ImageFolderDataset``: an ImageNet-layout folder of image files, ADM centre-cropped.

Layout: ``root/<class name>/**/<image>``; classes are the sub-folder names, sorted, mapped to
``0 .. K-1``. With ``allow_flat=True`` a folder with images but no class sub-folders is one class
(label 0). Files are only opened in ``__getitem__``; a file that cannot be decoded is skipped
(a deterministic substitute is returned), named once in a warning and counted; when more than
``max_bad_fraction`` of the files tried are bad (after ``min_attempts`` files) a
:class:`DataError` is raised, since the folder is then probably not what was meant.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..utils.seeding import item_hash
from .augment import hflip_flag
from .convert import composite_on_white, to_float
from .errors import DataError

__all__ = ["ImageFolderDataset", "IMG_EXTENSIONS", "load_rgb", "to_rgb", "center_crop_adm", "scan_image_files"]

#: lower-case file extensions read as images
IMG_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".webp",
    ".tif",
    ".tiff",
    ".ppm",
    ".pgm",
    ".pbm",
    ".jfif",
)

_LAYOUT = "expected root/<class name>/<image files> (ImageNet layout) or, with allow_flat=True, root/<image files>"
_LOAD_ERRORS = (OSError, ValueError, SyntaxError, EOFError, MemoryError, Image.DecompressionBombError)
_SUBST_SALT = 0x5B_57_17_07


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> ``"RGB"``; transparency (RGBA, LA, PA, palette/tRNS) is composited on white.

    16-bit / 32-bit grey modes (``I;16``, ``I``, ``F``) are scaled down to 8 bits rather than clipped.
    """
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(img, dtype=np.float32)
        if img.mode.startswith("I;16") or a.max(initial=0.0) > 255.0:
            a = a / 257.0
        return Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if "A" in img.getbands() or img.mode in ("RGBa", "La", "PA") or "transparency" in img.info:
        rgba = np.asarray(img.convert("RGBA"))
        return Image.fromarray(composite_on_white(rgba), "RGB")
    return img.convert("RGB")


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image file as RGB (raises ``OSError`` & co. on a bad file)."""
    with Image.open(path) as img:
        img.load()
        return to_rgb(img)


def center_crop_adm(img: Image.Image, resolution: int) -> np.ndarray:
    """ADM-style centre crop: box-halve while the short side >= 2 * resolution, bicubic-resize the
    short side to ``resolution``, then crop the centre square.

    Returns:
        ``uint8`` array ``(resolution, resolution, C)``.
    """
    while min(img.size) >= 2 * resolution:
        img = img.resize((img.size[0] // 2, img.size[1] // 2), Image.BOX)
    scale = resolution / min(img.size)
    new_size = (max(resolution, round(img.size[0] * scale)), max(resolution, round(img.size[1] * scale)))
    if new_size != img.size:
        img = img.resize(new_size, Image.BICUBIC)
    arr = np.asarray(img)
    top = (arr.shape[0] - resolution) // 2
    left = (arr.shape[1] - resolution) // 2
    return arr[top : top + resolution, left : left + resolution]


def _is_image(name: str, exts: tuple[str, ...]) -> bool:
    return not name.startswith(".") and name.lower().endswith(exts)


def scan_image_files(
    folder: str | os.PathLike, exts: tuple[str, ...] = IMG_EXTENSIONS, recursive: bool = True
) -> list[str]:
    """Image files under ``folder``: paths ending in one of ``exts`` (lower-case, with the dot;
    matched case-insensitively), sorted per directory, hidden files and folders skipped, symlinks
    followed; only ``folder`` itself when ``recursive=False``."""
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if recursive else []
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f, exts))
    return out


class ImageFolderDataset(Dataset):
    """Class-folder images, ADM centre-cropped to ``resolution``, optionally mirrored.

    Args:
        root: the folder (``root/<class>/**/<image>``, or images directly in it, see ``allow_flat``).
        resolution: output side in pixels.
        flip: random horizontal flip, a fair coin fixed per ``(seed, epoch, index)``
            (see :meth:`set_epoch`), so every worker/rank/rerun sees the same thing.
        seed: seed of the flip and of substitute choice for bad files.
        allow_flat: if ``root`` has no class sub-folders with images, use its own images as class 0.
        extensions: accepted file extensions (case-insensitive).
        max_bad_fraction, min_attempts: raise :class:`DataError` once more than ``max_bad_fraction``
            of the distinct files tried are unreadable, counted from ``min_attempts`` files on.

    Items: ``(image, label)``, ``image`` float32 ``(3, resolution, resolution)`` in ``[-1, 1]``.

    Attributes:
        samples (list of ``(path, label)``), labels (``int64 (N,)``), class_names, num_classes,
        resolution, channels (3), bad_files (paths found unreadable so far, in this process).
    """

    channels: int = 3

    def __init__(
        self,
        root: str | os.PathLike,
        resolution: int,
        flip: bool = True,
        seed: int = 0,
        allow_flat: bool = True,
        extensions: tuple[str, ...] = IMG_EXTENSIONS,
        max_bad_fraction: float = 0.5,
        min_attempts: int = 20,
    ) -> None:
        self.root = Path(root).expanduser()
        if int(resolution) < 1:
            raise DataError(f"ImageFolderDataset: resolution must be >= 1, got {resolution!r}")
        self.resolution = int(resolution)
        self.flip = bool(flip)
        self.seed = int(seed)
        self.epoch = 0
        self.max_bad_fraction = float(max_bad_fraction)
        self.min_attempts = int(min_attempts)
        exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)

        if not self.root.exists():
            raise DataError(f"image folder {str(self.root)!r} does not exist; {_LAYOUT}")
        if not self.root.is_dir():
            raise DataError(f"{str(self.root)!r} is not a folder; {_LAYOUT}")

        class_dirs = sorted(e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith("."))
        samples: list[tuple[str, int]] = []
        per_class = [scan_image_files(os.path.join(self.root, d), exts, recursive=True) for d in class_dirs]
        if any(per_class):
            empty = [d for d, files in zip(class_dirs, per_class) if not files]
            if empty:
                warnings.warn(
                    f"image folder {str(self.root)!r}: class folders without images (labels kept): {empty}",
                    stacklevel=2,
                )
            self.class_names = class_dirs
            for label, files in enumerate(per_class):
                samples.extend((f, label) for f in files)
        else:
            flat = scan_image_files(str(self.root), exts, recursive=False)
            if not flat:
                what = f"{len(class_dirs)} sub-folder(s) but no image files" if class_dirs else "no image files"
                raise DataError(f"image folder {str(self.root)!r} has {what} (extensions {', '.join(exts)}); {_LAYOUT}")
            if not allow_flat:
                raise DataError(
                    f"image folder {str(self.root)!r} has images but no class sub-folders and "
                    f"allow_flat=False; {_LAYOUT}"
                )
            self.class_names = [self.root.name or "images"]
            samples = [(f, 0) for f in flat]

        self.samples = samples
        self.labels = np.fromiter((lab for _, lab in samples), dtype=np.int64, count=len(samples))
        self.num_classes = len(self.class_names)
        # per-file status in this process: 0 unknown, 1 read fine, 2 unreadable
        self._status = bytearray(len(samples))
        self._n_ok = 0
        self._n_bad = 0

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """Select the flips of ``epoch`` (call before each epoch, in every worker/rank alike)."""
        self.epoch = int(epoch)

    @property
    def bad_files(self) -> list[str]:
        """Paths found unreadable so far (in this process / worker)."""
        return [self.samples[i][0] for i, s in enumerate(self._status) if s == 2]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        n = len(self.samples)
        i = int(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for {n} images in {str(self.root)!r}")
        arr, label = self._load_or_substitute(i)
        if self.flip and hflip_flag(self.seed, self.epoch, i):
            arr = arr[:, ::-1]
        x = to_float(torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))))
        return x, label

    def _load_or_substitute(self, index: int) -> tuple[np.ndarray, int]:
        j = index
        for k in range(1, 101):
            if self._status[j] != 2:
                path, label = self.samples[j]
                try:
                    arr = center_crop_adm(load_rgb(path), self.resolution)
                except _LOAD_ERRORS as err:
                    self._mark_bad(j, err)
                else:
                    if self._status[j] == 0:
                        self._status[j] = 1
                        self._n_ok += 1
                    return arr, label
            # a deterministic other file: fixed per (seed, index, attempt)
            j = item_hash(_SUBST_SALT, self.seed, index, k) % len(self.samples)
        raise DataError(
            f"image folder {str(self.root)!r}: 100 files in a row were unreadable while substituting "
            f"for index {index} ({self._n_bad} bad files seen)"
        )

    def _mark_bad(self, j: int, err: BaseException) -> None:
        path = self.samples[j][0]
        self._status[j] = 2
        self._n_bad += 1
        warnings.warn(
            f"skipping unreadable image {path!r} ({type(err).__name__}: {err}); "
            f"{self._n_bad} bad file(s) so far in {str(self.root)!r}",
            stacklevel=4,
        )
        tried = self._n_ok + self._n_bad
        if tried >= self.min_attempts and self._n_bad > self.max_bad_fraction * tried:
            raise DataError(
                f"image folder {str(self.root)!r}: {self._n_bad} of {tried} files tried are unreadable "
                f"(more than {self.max_bad_fraction:.0%}); is this really an image folder? {_LAYOUT}"
            )
