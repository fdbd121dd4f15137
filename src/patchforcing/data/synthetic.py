"""``SyntheticShapes``: a procedural, class-conditional image set with very uneven per-patch difficulty.

Every image is a flat background with one big flat shape and one small, detailed square "label"
(text-like glyphs, 1-pixel stripes, a checkerboard, colour noise or thin diagonal hatching) in a
corner. Most 4x4 patches are therefore exactly constant while a few carry almost all the detail:
the situation Patch Forcing is about. No files; item ``i`` is a pure function of ``(seed, i)``.

The class decides everything that is learnable: the shape kind, the background and shape colours
and the kind of detail (see :data:`SHAPES`, :data:`BACKGROUNDS`, :data:`FOREGROUNDS`,
:data:`DETAILS`). Per item: shape position/size jitter, a small colour jitter, which corner holds
the detail patch, and the detail's content (glyphs, stripe orientation, noise).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..utils.seeding import item_hash
from .convert import save_image_grid
from .errors import DataError

__all__ = ["SyntheticShapes", "SHAPES", "DETAILS", "BACKGROUNDS", "FOREGROUNDS", "save_synthetic_grid"]

_SALT = 0x53_59_4E_54  # "SYNT"

Mask = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def _circle(dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    return dx * dx + dy * dy <= r * r


def _square(dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    return np.maximum(np.abs(dx), np.abs(dy)) <= 0.8 * r


def _triangle(dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:  # apex up
    return (dy >= -r) & (dy <= 0.75 * r) & (np.abs(dx) <= 0.6 * (dy + r))


def _ring(dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    d2 = dx * dx + dy * dy
    return (d2 <= r * r) & (d2 >= (0.5 * r) ** 2)


def _diamond(dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    return np.abs(dx) + np.abs(dy) <= 1.1 * r


def _plus(dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    ax, ay = np.abs(dx), np.abs(dy)
    return ((ax <= 0.3 * r) & (ay <= r)) | ((ay <= 0.3 * r) & (ax <= r))


def _ellipse(dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:  # wide
    return (dx / (1.25 * r)) ** 2 + (dy / (0.6 * r)) ** 2 <= 1.0


def _bar(dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:  # tall rectangle
    return (np.abs(dx) <= 0.4 * r) & (np.abs(dy) <= 1.1 * r)


def _half_disc(dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:  # flat side down
    e = dy - 0.35 * r
    return (dx * dx + e * e <= (1.15 * r) ** 2) & (e <= 0)


def _cross(dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:  # "X"
    ax, ay = np.abs(dx), np.abs(dy)
    return (np.abs(ax - ay) <= 0.3 * r) & (np.maximum(ax, ay) <= 0.85 * r)


#: class -> (shape name, mask function of (dx, dy, r) in image-size units)
SHAPES: tuple[tuple[str, Mask], ...] = (
    ("circle", _circle),
    ("square", _square),
    ("triangle", _triangle),
    ("ring", _ring),
    ("diamond", _diamond),
    ("plus", _plus),
    ("ellipse", _ellipse),
    ("bar", _bar),
    ("half-disc", _half_disc),
    ("cross", _cross),
)
MAX_CLASSES = len(SHAPES)

#: class -> flat background colour (RGB in [0, 1])
BACKGROUNDS = np.array(
    [
        (0.60, 0.78, 0.95),  # sky blue
        (0.95, 0.85, 0.55),  # sand
        (0.70, 0.90, 0.65),  # light green
        (0.93, 0.66, 0.70),  # pink
        (0.78, 0.72, 0.92),  # lavender
        (0.30, 0.32, 0.40),  # slate
        (0.98, 0.95, 0.85),  # cream
        (0.50, 0.82, 0.80),  # teal
        (0.85, 0.55, 0.35),  # terracotta
        (0.20, 0.40, 0.25),  # forest
    ],
    dtype=np.float32,
)
#: class -> flat shape colour (RGB in [0, 1])
FOREGROUNDS = np.array(
    [
        (0.85, 0.12, 0.12),  # red
        (0.15, 0.28, 0.75),  # blue
        (0.50, 0.18, 0.60),  # purple
        (0.08, 0.42, 0.28),  # green
        (0.95, 0.58, 0.08),  # orange
        (0.95, 0.88, 0.25),  # yellow
        (0.10, 0.10, 0.10),  # black
        (0.80, 0.18, 0.50),  # magenta
        (0.18, 0.18, 0.50),  # navy
        (0.95, 0.95, 0.95),  # white
    ],
    dtype=np.float32,
)
#: detail kinds; class ``c`` uses ``DETAILS[c % len(DETAILS)]``
DETAILS: tuple[str, ...] = ("glyphs", "stripes", "checker", "noise", "hatch")

_PAPER = np.array((0.97, 0.97, 0.94), dtype=np.float32)
_INK = np.array((0.06, 0.06, 0.10), dtype=np.float32)

# The eight strokes glyphs are made of, on a 3x3 cell: 3 rows, 3 columns, 2 diagonals.
_STROKES = np.zeros((8, 3, 3), dtype=bool)
for _k in range(3):
    _STROKES[_k, _k, :] = True
    _STROKES[3 + _k, :, _k] = True
_STROKES[6] = np.eye(3, dtype=bool)
_STROKES[7] = np.eye(3, dtype=bool)[::-1]
_STROKES.setflags(write=False)
del _k


class SyntheticShapes(Dataset):
    """Procedural class-conditional shapes with a small detailed patch; no files needed.

    Args:
        size: image side ``H = W`` in pixels (>= 16).
        num_classes: 1 .. 10; class ``c`` has shape ``SHAPES[c]``, background ``BACKGROUNDS[c]``,
            shape colour ``FOREGROUNDS[c]`` and detail ``DETAILS[c % 5]``.
        length: number of items; the label of item ``i`` is ``i % num_classes`` (balanced).
        seed: data seed; item ``i`` depends only on ``(seed, i)``.

    Items: ``(image, label)`` with ``image`` float32 ``(3, size, size)`` in ``[-1, 1]`` and ``label``
    an ``int``. :meth:`batch` renders many items at once (vectorised, same pixels as indexing).

    Attributes:
        num_classes, resolution (== size), channels (== 3), class_names (e.g. ``"ring/noise"``),
        labels (``int64 (length,)``).
    """

    channels: int = 3

    def __init__(self, size: int = 32, num_classes: int = 8, length: int = 10_000, seed: int = 0) -> None:
        if not isinstance(size, (int, np.integer)) or size < 16:
            raise DataError(f"SyntheticShapes: size must be an int >= 16, got {size!r}")
        if not 1 <= int(num_classes) <= MAX_CLASSES:
            raise DataError(f"SyntheticShapes: num_classes must be in 1..{MAX_CLASSES}, got {num_classes!r}")
        if int(length) < 1:
            raise DataError(f"SyntheticShapes: length must be >= 1, got {length!r}")
        self.size = int(size)
        self.resolution = self.size
        self.num_classes = int(num_classes)
        self.length = int(length)
        self.seed = int(seed)
        self.class_names = [f"{SHAPES[c][0]}/{DETAILS[c % len(DETAILS)]}" for c in range(self.num_classes)]
        # geometry in pixels: detail patch side, glyph cells per side, corner margin
        self._patch = max(8, self.size // 4)
        self._cells = self._patch // 4
        self._margin = max(1, self.size // 32)
        coords = (np.arange(self.size, dtype=np.float32) + 0.5) / self.size
        coords.setflags(write=False)
        self._coords = coords

    # ------------------------------------------------------------------ Dataset protocol
    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        index = self._check_index(index)
        img = self.render([index])[0]
        return torch.from_numpy(img.transpose(2, 0, 1) * 2.0 - 1.0), index % self.num_classes

    def set_epoch(self, epoch: int) -> None:
        """No-op (items do not depend on the epoch); present so all data sets share the interface."""

    @property
    def labels(self) -> np.ndarray:
        """``int64 (length,)``: the label of every item (``i % num_classes``)."""
        return np.arange(self.length, dtype=np.int64) % self.num_classes

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Render several items at once.

        Returns:
            images float32 ``(B, 3, size, size)`` in ``[-1, 1]`` and labels int64 ``(B,)``;
            identical to stacking ``self[i]``.
        """
        idx = [self._check_index(i) for i in indices]
        imgs = self.render(idx)
        x = torch.from_numpy(np.ascontiguousarray(imgs.transpose(0, 3, 1, 2))) * 2.0 - 1.0
        y = torch.tensor([i % self.num_classes for i in idx], dtype=torch.int64)
        return x, y

    # ------------------------------------------------------------------ rendering
    def _check_index(self, index: int) -> int:
        i = int(index)
        if i < 0:
            i += self.length
        if not 0 <= i < self.length:
            raise IndexError(f"index {index} out of range for SyntheticShapes of length {self.length}")
        return i

    def _draw(self, index: int) -> dict[str, np.ndarray]:
        """The random choices of item ``index``: a pure function of ``(seed, index)``."""
        rng = np.random.default_rng(item_hash(_SALT, self.seed, index))
        s, n = self._patch, self._cells
        u = rng.random(6, dtype=np.float32)
        jitter = rng.random(6, dtype=np.float32)
        strokes = rng.random((n, n, 8), dtype=np.float32) < 0.3
        pick = rng.integers(0, 8, size=(n, n))  # guarantee at least one stroke per glyph
        strokes[np.arange(n)[:, None], np.arange(n)[None, :], pick] = True
        return dict(
            centre=0.5 + (u[:2] - 0.5) * 0.12,  # (cx, cy), image-size units
            radius=0.22 + 0.08 * u[2:3],
            corner=(u[3:4] * 4).astype(np.int64).clip(0, 3),
            orient=(u[4:5] < 0.5),
            bg_jit=(jitter[:3] - 0.5) * 0.08,
            fg_jit=(jitter[3:] - 0.5) * 0.14,
            strokes=strokes,
            noise=rng.random((s, s, 3), dtype=np.float32),
        )

    def render(self, indices: Sequence[int]) -> np.ndarray:
        """Render items (no bounds check) as float32 ``(B, size, size, 3)`` in ``[0, 1]``."""
        idx = np.asarray(list(indices), dtype=np.int64)
        b, hw, s = len(idx), self.size, self._patch
        draws = [self._draw(int(i)) for i in idx]
        p = {k: np.stack([d[k] for d in draws]) for k in draws[0]}
        cls = idx % self.num_classes

        bg = np.clip(BACKGROUNDS[cls] + p["bg_jit"], 0.0, 1.0)
        fg = np.clip(FOREGROUNDS[cls] + p["fg_jit"], 0.0, 1.0)
        img = np.empty((b, hw, hw, 3), dtype=np.float32)
        img[:] = bg[:, None, None, :]

        # one big flat shape
        dx = self._coords[None, None, :] - p["centre"][:, 0, None, None]  # (B, 1, W)
        dy = self._coords[None, :, None] - p["centre"][:, 1, None, None]  # (B, H, 1)
        r = p["radius"][:, :, None]  # (B, 1, 1)
        for c in np.unique(cls):
            sel = np.flatnonzero(cls == c)
            mask = SHAPES[c][1](dx[sel], dy[sel], r[sel])  # (b_c, H, W)
            img[sel] = np.where(mask[..., None], fg[sel, None, None, :], img[sel])

        # one small detailed patch in a corner
        patch = self._details(cls, fg, p)  # (B, s, s, 3)
        corner = p["corner"][:, 0]
        lo, hi = self._margin, hw - s - self._margin
        y0 = np.where(corner < 2, lo, hi)
        x0 = np.where(corner % 2 == 0, lo, hi)
        ar = np.arange(s)
        rows = (y0[:, None] + ar)[:, :, None]
        cols = (x0[:, None] + ar)[:, None, :]
        img[np.arange(b)[:, None, None], rows, cols] = patch
        return img

    def _details(self, cls: np.ndarray, fg: np.ndarray, p: dict[str, np.ndarray]) -> np.ndarray:
        """Detail patches ``(B, s, s, 3)`` in ``[0, 1]`` by the class's detail kind."""
        b, s, n = len(cls), self._patch, self._cells
        yy, xx = np.mgrid[0:s, 0:s]
        kind = cls % len(DETAILS)
        out = np.empty((b, s, s, 3), dtype=np.float32)
        out[:] = _PAPER
        # coloured ink is the shape colour, unless that is too pale to show on the paper
        light = (fg @ np.array([0.299, 0.587, 0.114], dtype=np.float32)) > 0.7
        colour_ink = np.where(light[:, None], _INK, fg)
        for k in np.unique(kind):
            sel = np.flatnonzero(kind == k)
            name = DETAILS[k]
            if name == "noise":
                out[sel] = p["noise"][sel]
                continue
            if name == "glyphs":
                # each glyph: a union of strokes on a 3x3 cell, cells on a 4-pixel pitch
                g = (p["strokes"][sel][..., None, None] & _STROKES).any(axis=3)  # (b, n, n, 3, 3)
                cell = np.zeros((len(sel), n, 4, n, 4), dtype=bool)
                cell[:, :, :3, :, :3] = g.transpose(0, 1, 3, 2, 4)
                on = np.zeros((len(sel), s, s), dtype=bool)
                off = (s - 4 * n + 1) // 2
                on[:, off : off + 4 * n, off : off + 4 * n] = cell.reshape(len(sel), 4 * n, 4 * n)
                ink = np.broadcast_to(_INK, (len(sel), 3))
            elif name == "stripes":  # 1-pixel stripes, horizontal or vertical per item
                horiz = p["orient"][sel, 0][:, None, None]
                on = np.where(horiz, yy % 2 == 0, xx % 2 == 0)
                ink = colour_ink[sel]
            elif name == "checker":
                on = np.broadcast_to((yy + xx) % 2 == 0, (len(sel), s, s))
                ink = np.broadcast_to(_INK, (len(sel), 3))
            else:  # "hatch": thin diagonal lines, direction per item
                right = p["orient"][sel, 0][:, None, None]
                on = np.where(right, (xx + yy) % 3 == 0, (xx - yy) % 3 == 0)
                ink = colour_ink[sel]
            out[sel] = np.where(on[..., None], ink[:, None, None, :], _PAPER)
        return out


def save_synthetic_grid(
    path: str | os.PathLike,
    size: int = 32,
    num_classes: int = 8,
    per_class: int = 8,
    seed: int = 0,
    scale: int = 4,
) -> torch.Tensor:
    """Write real ``SyntheticShapes`` examples as a PNG: one row per class, ``per_class`` columns.

    Returns:
        the images, float32 ``(num_classes * per_class, 3, size, size)`` in ``[-1, 1]``, class-major.
    """
    ds = SyntheticShapes(size=size, num_classes=num_classes, length=num_classes * per_class, seed=seed)
    order = [i * num_classes + c for c in range(num_classes) for i in range(per_class)]
    x, _ = ds.batch(order)
    save_image_grid(x, path, nrow=per_class, scale=scale)
    return x
