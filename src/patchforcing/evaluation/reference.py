"""Image sets to evaluate: sample ``.npz`` files, reference batches and image folders.

:func:`open_images` understands

* **our sample .npz** (``patchforcing sample`` / the ADM convention): ``arr_0`` ``uint8``
  ``(N, H, W, 3)``, optional ``labels``;
* **an ADM reference batch** (e.g. ``VIRTUAL_imagenet256_labeled.npz``): ``arr_0`` images plus
  precomputed Inception statistics ``mu``, ``sigma`` (pool3) and ``mu_s``, ``sigma_s`` (spatial);
  the statistics are exposed in :attr:`ImageSet.stats` and used as they are for FID / sFID;
* **any .npz / .npy of images**: key ``arr_0`` or ``images`` (``(N, H, W)``, ``(N, H, W, 1|3|4)``;
  RGBA is composited on white, grey is repeated to RGB);
* **an image folder** of any layout (searched recursively; every image file counts), each image
  ADM-centre-cropped and resized to the requested resolution.

Arrays are streamed from the ``.npz`` in batches (the member is read straight from the zip), so
50k samples at 256 px (~10 GB) need not fit in memory. Images that must change size (a folder,
or an array whose size differs from the one asked for) go through :func:`center_crop_adm`.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..data.convert import composite_on_white
from ..data.folder import IMG_EXTENSIONS, center_crop_adm, load_rgb, scan_image_files

__all__ = ["EvaluationError", "ImageSet", "open_images", "resize_images", "IMAGE_KEYS", "STATS_KEYS"]

#: array names tried, in order, for the images of an .npz
IMAGE_KEYS: tuple[str, ...] = ("arr_0", "images")
#: statistics of an ADM reference batch
STATS_KEYS: tuple[str, ...] = ("mu", "sigma", "mu_s", "sigma_s")


class EvaluationError(ValueError):
    """Bad evaluation input (missing file, wrong array shape/dtype, unknown metric, ...)."""


def resize_images(images: np.ndarray, resolution: int) -> np.ndarray:
    """``uint8 (B, H, W, 3)`` -> ``(B, R, R, 3)``: ADM centre crop (box-halving, bicubic, crop)."""
    if images.shape[1] == images.shape[2] == resolution:
        return images
    out = np.empty((len(images), resolution, resolution, 3), dtype=np.uint8)
    for i, im in enumerate(images):
        out[i] = center_crop_adm(Image.fromarray(im), resolution)
    return out


def _to_rgb(block: np.ndarray) -> np.ndarray:
    if block.ndim == 3:
        block = block[..., None]
    c = block.shape[-1]
    if c == 4:
        return composite_on_white(block)
    if c == 1:
        return np.repeat(block, 3, axis=-1)
    return block


@dataclass
class _NpyMember:
    """Where an array lives inside an .npz (or a plain .npy) and how to read it in slices."""

    path: Path
    member: str | None  # None: a plain .npy file
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool

    def _open(self):
        if self.member is None:
            return open(self.path, "rb")
        zf = zipfile.ZipFile(self.path)
        return _ZipMember(zf, zf.open(self.member))

    def iter_rows(self, batch: int) -> Iterator[np.ndarray]:
        n = self.shape[0]
        per_row = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        if self.fortran:  # rare; cannot be streamed row-wise
            arr = _read_whole(self.path, self.member)
            for s in range(0, n, batch):
                yield np.ascontiguousarray(arr[s : s + batch])
            return
        with self._open() as f:
            version = np.lib.format.read_magic(f)
            _read_header(f, version)
            for s in range(0, n, batch):
                b = min(batch, n - s)
                buf = _read_exact(f, b * per_row, self.path)
                yield np.frombuffer(buf, dtype=self.dtype).reshape((b,) + tuple(self.shape[1:]))


class _ZipMember:
    def __init__(self, zf: zipfile.ZipFile, f) -> None:
        self.zf, self.f = zf, f

    def read(self, n: int = -1) -> bytes:
        return self.f.read(n)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()
        self.zf.close()


def _read_exact(f, n: int, path: Path) -> bytes:
    chunks, left = [], n
    while left > 0:
        c = f.read(left)
        if not c:
            raise EvaluationError(f"{path}: the image array ends early (truncated file?)")
        chunks.append(c)
        left -= len(c)
    return b"".join(chunks)


def _read_header(f, version: tuple[int, int]):
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)


def _read_whole(path: Path, member: str | None) -> np.ndarray:
    if member is None:
        return np.load(path, allow_pickle=False)
    with np.load(path, allow_pickle=False) as z:
        return z[member[: -len(".npy")]]


def _inspect_member(path: Path, member: str | None) -> _NpyMember:
    if member is None:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            shape, fortran, dtype = _read_header(f, version)
    else:
        with zipfile.ZipFile(path) as zf, zf.open(member) as f:
            version = np.lib.format.read_magic(f)
            shape, fortran, dtype = _read_header(f, version)
    return _NpyMember(path, member, tuple(int(s) for s in shape), np.dtype(dtype), bool(fortran))


@dataclass
class ImageSet:
    """A set of images to evaluate, read lazily in batches.

    Attributes:
        path: where it came from (``"<array>"`` for an in-memory array).
        kind: ``"npz"``, ``"adm-reference"`` (an .npz with ``mu``/``sigma``), ``"npy"``,
            ``"folder"`` or ``"array"``.
        num_images: number of images.
        size: stored ``(H, W)`` (``None`` for a folder, whose images are sized on reading).
        stats: ADM statistics ``{"mu", "sigma"[, "mu_s", "sigma_s"]}`` (float64) or ``None``.
        labels: ``int64 (N,)`` when the file has ``labels`` (informational), else ``None``.
    """

    path: str
    kind: str
    num_images: int
    size: tuple[int, int] | None
    stats: dict[str, np.ndarray] | None = None
    labels: np.ndarray | None = None
    _member: _NpyMember | None = field(default=None, repr=False)
    _array: np.ndarray | None = field(default=None, repr=False)
    _files: list[str] | None = field(default=None, repr=False)

    @property
    def resolution(self) -> int | None:
        """Side of the centre square (``min(H, W)``), ``None`` for a folder."""
        return None if self.size is None else min(self.size)

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the source on disk (for feature caches)."""
        out: dict[str, Any] = {"path": self.path, "kind": self.kind, "num_images": self.num_images}
        p = Path(self.path)
        if p.is_file():
            st = p.stat()
            out.update(size_bytes=st.st_size, mtime_ns=st.st_mtime_ns)
        elif self._files is not None:
            out["files_mtime_ns"] = max((os.stat(f).st_mtime_ns for f in self._files), default=0)
        return out

    def batches(self, batch_size: int, resolution: int | None = None) -> Iterator[np.ndarray]:
        """Yield ``uint8 (B, R, R, 3)`` batches (``R`` = ``resolution``; ``None`` keeps the stored
        size, which a folder does not have)."""
        if batch_size < 1:
            raise EvaluationError(f"batch size must be >= 1, got {batch_size}")
        if self._files is not None:
            if resolution is None:
                raise EvaluationError(f"{self.path}: an image folder needs a resolution to read it at")
            for s in range(0, len(self._files), batch_size):
                out = np.empty((len(self._files[s : s + batch_size]), resolution, resolution, 3), np.uint8)
                for i, f in enumerate(self._files[s : s + batch_size]):
                    try:
                        out[i] = center_crop_adm(load_rgb(f), resolution)
                    except (OSError, ValueError, SyntaxError) as e:
                        raise EvaluationError(f"cannot read image {f}: {e}") from None
                yield out
            return
        if self._array is not None:
            source = (self._array[s : s + batch_size] for s in range(0, self.num_images, batch_size))
        else:
            assert self._member is not None
            source = self._member.iter_rows(batch_size)
        for block in source:
            block = _to_rgb(np.asarray(block))
            if resolution is not None and block.shape[1:3] != (resolution, resolution):
                block = resize_images(block, resolution)
            elif block.shape[1] != block.shape[2]:
                block = resize_images(block, min(block.shape[1:3]))
            yield np.ascontiguousarray(block)


def _check_array_meta(where: str, key: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
    ok_shape = len(shape) == 4 and shape[-1] in (1, 3, 4) or len(shape) == 3
    if not ok_shape:
        raise EvaluationError(
            f"{where}: array {key!r} has shape {shape}; expected uint8 images (N, H, W, 3) "
            "(or (N, H, W), (N, H, W, 1), (N, H, W, 4))"
        )
    if dtype != np.uint8:
        hint = " (float images? convert with patchforcing.data.to_uint8)" if dtype.kind == "f" else ""
        raise EvaluationError(f"{where}: array {key!r} has dtype {dtype}; expected uint8{hint}")
    if shape[0] < 2:
        raise EvaluationError(f"{where}: array {key!r} holds {shape[0]} image(s); need at least 2")
    if min(shape[1], shape[2]) < 1:
        raise EvaluationError(f"{where}: array {key!r} has empty images {shape}")


def open_images(source: Any, *, key: str | None = None, role: str = "images") -> ImageSet:
    """Open ``source`` as an :class:`ImageSet` without reading the images yet.

    Args:
        source: an ``.npz``/``.npy`` path, an image folder, an existing :class:`ImageSet`, or an
            in-memory ``uint8`` array ``(N, H, W, C)``.
        key: the image array's name in an .npz (default: the first of :data:`IMAGE_KEYS` present).
        role: a word for error messages (``"samples"``, ``"reference"``).

    Raises:
        EvaluationError: missing file, no image array, wrong shape or dtype, bad statistics.
    """
    if isinstance(source, ImageSet):
        return source
    if isinstance(source, np.ndarray):
        arr = source[..., None] if source.ndim == 3 else source
        _check_array_meta(f"{role} array", "images", tuple(arr.shape), arr.dtype)
        return ImageSet("<array>", "array", int(arr.shape[0]), (int(arr.shape[1]), int(arr.shape[2])), _array=arr)
    path = Path(os.fspath(source)).expanduser()
    where = f"{role} {str(path)!r}"
    if not path.exists():
        raise EvaluationError(f"{where} does not exist")
    if path.is_dir():
        files = scan_image_files(path)
        if len(files) < 2:
            raise EvaluationError(
                f"{where} is a folder with {len(files)} image file(s) (searched recursively for "
                f"{', '.join(IMG_EXTENSIONS)}); need at least 2"
            )
        return ImageSet(str(path), "folder", len(files), None, _files=files)
    if path.suffix.lower() == ".npy":
        try:
            member = _inspect_member(path, None)
        except (OSError, ValueError) as e:
            raise EvaluationError(f"cannot read {where} as .npy: {e}") from None
        _check_array_meta(where, "<npy>", member.shape, member.dtype)
        return ImageSet(str(path), "npy", member.shape[0], member.shape[1:3], _member=member)
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n[: -len(".npy")] for n in zf.namelist() if n.endswith(".npy")]
    except (zipfile.BadZipFile, OSError) as e:
        raise EvaluationError(
            f"cannot read {where} as .npz (expected a .npz, a .npy or an image folder): {e}"
        ) from None
    if key is None:
        key = next((k for k in IMAGE_KEYS if k in names), None)
        if key is None:
            raise EvaluationError(
                f"{where} has no image array {' or '.join(IMAGE_KEYS)}; arrays in it: {sorted(names)}"
            )
    elif key not in names:
        raise EvaluationError(f"{where} has no array {key!r}; arrays in it: {sorted(names)}")
    try:
        member = _inspect_member(path, f"{key}.npy")
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise EvaluationError(f"cannot read array {key!r} of {where}: {e}") from None
    _check_array_meta(where, key, member.shape, member.dtype)

    stats = labels = None
    present = [k for k in STATS_KEYS if k in names]
    wanted = [k for k in ("labels",) if k in names] + present
    if wanted:
        try:
            with np.load(path, allow_pickle=False) as z:
                small = {k: z[k] for k in wanted}
        except (ValueError, OSError, zipfile.BadZipFile) as e:
            raise EvaluationError(f"cannot read {wanted} of {where}: {e}") from None
        if "labels" in small:
            lab = small["labels"]
            if lab.ndim == 1 and len(lab) == member.shape[0] and np.issubdtype(lab.dtype, np.integer):
                labels = lab.astype(np.int64)
        if "mu" in small or "sigma" in small:
            stats = _check_stats(where, small)
    kind = "adm-reference" if stats is not None else "npz"
    return ImageSet(str(path), kind, member.shape[0], member.shape[1:3], stats=stats, labels=labels, _member=member)


def _check_stats(where: str, small: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    stats: dict[str, np.ndarray] = {}
    for m, s in (("mu", "sigma"), ("mu_s", "sigma_s")):
        if m not in small and s not in small:
            continue
        if (m in small) != (s in small):
            raise EvaluationError(f"{where} has {m if m in small else s!r} without {s if m in small else m!r}")
        mu, sigma = np.asarray(small[m], np.float64).reshape(-1), np.asarray(small[s], np.float64)
        if sigma.shape != (mu.size, mu.size) or not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise EvaluationError(
                f"{where}: statistics {m!r} {small[m].shape} / {s!r} {small[s].shape} are not a finite "
                "mean vector and its square covariance"
            )
        stats[m], stats[s] = mu, sigma
    return stats
