"""File helpers: atomic writes (with a clear "no space left" error), JSON, temp-file cleanup,
a run-directory lock, writability checks, and telling local paths from hub ids."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "atomic_write",
    "torch_save_atomic",
    "write_json_atomic",
    "save_npz_atomic",
    "read_json",
    "clean_temp_files",
    "ensure_writable_dir",
    "is_offline",
    "looks_local",
    "RunLock",
    "RunLockedError",
    "TEMP_SUFFIX",
]

#: suffix of the temporary files :func:`atomic_write` renames into place
TEMP_SUFFIX = ".tmp"


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _is_disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    # torch's zip writer reports a short write as "... inline_container.cc ... unexpected pos ..."
    return "unexpected pos" in text or "No space left" in text


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Write ``path`` atomically: ``write(tmp_path)``, fsync, rename over ``path``, fsync the dir.

    A crash at any point leaves either the old file or the new one, never a partial file (a kill
    may leave a ``.NAME.*.tmp`` file beside it: :func:`clean_temp_files` removes those). The file
    gets the permissions the umask allows (as ``open`` would), not ``mkstemp``'s 0600.

    Raises:
        OSError: with ``errno.ENOSPC`` and a message naming ``path`` when the disk is full.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_current_umask())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, Exception) and _is_disk_full(err):
            raise OSError(errno.ENOSPC, f"no space left on the device while writing {path}") from None
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


def save_npz_atomic(path: str | os.PathLike, **arrays: Any) -> Path:
    """``np.savez(path, **arrays)`` (uncompressed), written atomically."""
    import numpy as np

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    return atomic_write(path, write)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """``obj`` as indented JSON, written atomically."""
    text = json.dumps(obj, indent=2, default=str) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file's content; ``ValueError`` naming the file when it is not valid JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def clean_temp_files(directory: str | os.PathLike, pattern: str = f".*{TEMP_SUFFIX}") -> list[Path]:
    """Remove the temporary files a killed :func:`atomic_write` left in ``directory``; returns them."""
    directory = Path(directory)
    removed = []
    if directory.is_dir():
        for p in directory.glob(pattern):
            if p.is_file():
                try:
                    p.unlink()
                    removed.append(p)
                except OSError:
                    pass
    return removed


def ensure_writable_dir(directory: str | os.PathLike, what: str = "output directory") -> Path:
    """Create ``directory`` if needed and check that files can be created in it, before any work.

    Raises:
        PermissionError / OSError: naming the directory, when it cannot be created or written.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{what} {directory} exists and is not a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check.", suffix=TEMP_SUFFIX, dir=directory)
        os.close(fd)
        os.unlink(probe)
    except PermissionError:
        raise PermissionError(f"{what} {directory} is not writable") from None
    except OSError as e:
        if _is_disk_full(e):
            raise OSError(errno.ENOSPC, f"no space left on the device for {what} {directory}") from None
        raise OSError(e.errno, f"cannot write to {what} {directory}: {e.strerror}") from None
    return directory


def is_offline() -> bool:
    """Whether the Hugging Face offline switches (``HF_HUB_OFFLINE`` and friends) are on."""
    return any(
        os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE")
    )


_LOCAL_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors", ".bin", ".npz", ".npy", ".json", ".yaml", ".yml", ".tar")


def looks_local(source: str | os.PathLike) -> bool:
    """Whether ``source`` must be a local path, never a hub id: it exists, starts with ``.``, ``/``
    or ``~``, or ends in a file extension (``runs/x/last.pt``). ``hf://...`` is never local."""
    s = str(source)
    if s.startswith("hf://"):
        return False
    if s.startswith((".", "/", "~")) or os.path.exists(s) or "\\" in s:
        return True
    name = s.rstrip("/").rsplit("/", 1)[-1]
    return Path(name).suffix.lower() in _LOCAL_SUFFIXES


class RunLockedError(RuntimeError):
    """Another live process holds the lock of a run directory."""


class RunLock:
    """An exclusive OS lock on ``directory/.lock`` (``flock``): released when the process dies,
    so a crashed run never leaves a stale lock. Use as a context manager.

    Raises:
        RunLockedError: another process holds the lock (its pid is named when known).
    """

    def __init__(self, directory: str | os.PathLike, name: str = ".lock"):
        self.path = Path(directory) / name
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = os.read(fd, 64).decode(errors="replace").strip()
            finally:
                os.close(fd)
            who = f" (pid {holder})" if holder else ""
            raise RunLockedError(
                f"{self.path.parent} is in use by another process{who}; wait for it to finish or choose another directory"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
