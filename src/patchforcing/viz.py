"""Pictures of samples and of the sampling process (headless; drawn with PIL only).

Everything here takes tensors on any device (they are moved to the CPU) or NumPy arrays,
returns :class:`PIL.Image.Image` objects and, when ``path`` is given, also writes the picture
(parent folders are created; the format follows the file extension).

Images are ``(B, C, H, W)`` in roughly ``[-1, 1]`` and are converted with
``uint8 = clamp(127.5 * x + 128, 0, 255)`` truncated towards zero (so ``-1 -> 0``, ``0 -> 128``,
``1 -> 255``). ``C = 1`` is shown grey, ``C = 3`` as RGB; any other channel count shows channel 0
grey (``C = 2``) or the first three channels (``C >= 4``). Latent models should be decoded
first: the trajectory pictures take a ``decode`` callable ``(B, C, h, w) -> (B, 3, H, W)``
(values in ``[-1, 1]``) for exactly that.

Public functions:

* :func:`to_uint8_images`, :func:`make_grid`, :func:`save_grid`: sample grids.
* :func:`colorize`, :func:`colorbar`, :func:`patch_map_image`: value maps and their scales
  (colormaps ``"viridis"``, ``"magma"``, ``"coolwarm"``: small anchor tables, linearly
  interpolated; close to, not identical with, the matplotlib maps).
* :func:`trajectory_sheet`, :func:`trajectory_gif`: one image's sampling run, call by call
  (state, clean estimate, per-patch time, uncertainty, certain-patch mask).
* :func:`uncertainty_time_figure`: the overview (several images x several steps).
* :func:`sampler_comparison`: sample grids of several samplers side by side.

Conventions of the trajectory pictures: the *uncertainty* of a patch is ``exp(logvar)``
averaged over its ``p x p`` pixels (the quantity the samplers threshold, see
:func:`patchforcing.sampling.certain_mask`), shown on a log colour scale shared by the whole
picture; *time* ``t`` is shown on the fixed scale ``[0, 1]`` (0 = noise, 1 = data).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Mapping, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "CMAPS",
    "to_uint8_images",
    "make_grid",
    "save_grid",
    "colorize",
    "colorbar",
    "patch_map_image",
    "trajectory_sheet",
    "trajectory_gif",
    "uncertainty_time_figure",
    "sampler_comparison",
]

PathLike = Union[str, "os.PathLike[str]"]
Decode = Callable[[torch.Tensor], torch.Tensor]

# --------------------------------------------------------------------------------------------
# Style
# --------------------------------------------------------------------------------------------

_BG = (255, 255, 255)
_FG = (25, 25, 25)
_MUTED = (105, 105, 105)
_RULE = (222, 222, 222)
_NA_FILL = (232, 232, 232)
_CERTAIN = (40, 120, 190)  # blue
_UNCERTAIN = (240, 140, 30)  # orange (blue/orange: safe for the common colour blindnesses)
_OUTLINE = (60, 60, 60)

_TITLE_PX = 18
_HEAD_PX = 14
_TEXT_PX = 13
_TICK_PX = 12

_MARGIN = 12
_COL_GAP = 10
_ROW_GAP = 8

# Colormap anchors (evenly spaced); approximations of the matplotlib maps of the same names.
CMAPS: dict[str, tuple[str, ...]] = {
    "viridis": ("#440154", "#472c7a", "#3b518b", "#2c718e", "#21908d", "#27ad81", "#5cc863", "#aadc32", "#fde725"),
    "magma": ("#000004", "#1c1044", "#4f127b", "#812581", "#b5367a", "#e55964", "#fb8761", "#fec287", "#fcfdbf"),
    "coolwarm": ("#3b4cc0", "#6788ee", "#9abbff", "#c9d7f0", "#dddddd", "#f2cbb7", "#f7a889", "#e26952", "#b40426"),
}

_TIME_CMAP = "viridis"
_UNC_CMAP = "magma"

_MEDIANCUT = getattr(getattr(Image, "Quantize", None), "MEDIANCUT", 0)  # Pillow < 9.1: plain ints
_NO_DITHER = getattr(getattr(Image, "Dither", None), "NONE", 0)


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    return torch.as_tensor(np.asarray(x))


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _save(img: Image.Image, path: PathLike | None, **kwargs: Any) -> Image.Image:
    if path is not None:
        parent = os.path.dirname(os.fspath(path))
        if parent:
            os.makedirs(parent, exist_ok=True)
        img.save(path, **kwargs)
    return img


def _auto_scale(h: int, w: int, min_px: int) -> int:
    """Smallest integer factor that makes the longer side at least ``min_px`` (1 if already so)."""
    longest = max(h, w, 1)
    return max(1, math.ceil(min_px / longest))


def _hex(c: str) -> tuple[int, int, int]:
    c = c.lstrip("#")
    return int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)


# --------------------------------------------------------------------------------------------
# Text (Pillow's default font; scalable when Pillow >= 10.1 with FreeType)
# --------------------------------------------------------------------------------------------

_BITMAP_PX = 11  # nominal height of Pillow's bitmap default font


@lru_cache(maxsize=None)
def _font(size: int) -> tuple[Any, bool]:
    """``(font, scalable)``: ``load_default(size=...)`` where available, the bitmap font otherwise."""
    try:
        font = ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError, ValueError, AttributeError):  # Pillow < 10.1 / no FreeType
        font = ImageFont.load_default()
    return font, isinstance(font, ImageFont.FreeTypeFont)


@lru_cache(maxsize=8192)
def _text_mask(text: str, size: int) -> Image.Image:
    """One line of text as an ``L`` mask (255 = ink), ``size`` px nominal height.

    With the bitmap fallback font the text is drawn at its native size and enlarged by an
    integer factor (nearest neighbour) so that sizes stay comparable.
    """
    font, scalable = _font(size)
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    if scalable:
        ascent, descent = font.getmetrics()
        right = probe.textbbox((0, 0), text, font=font)[2] if text else 0
        im = Image.new("L", (max(1, right + 1), ascent + descent), 0)
        if text:
            ImageDraw.Draw(im).text((0, 0), text, font=font, fill=255)
        return im
    line_h = probe.textbbox((0, 0), "Ag|", font=font)[3]
    right, bottom = probe.textbbox((0, 0), text, font=font)[2:] if text else (0, 0)
    im = Image.new("L", (max(1, right + 1), max(line_h, bottom) + 1), 0)
    if text:
        ImageDraw.Draw(im).text((0, 0), text, font=font, fill=255)
    k = max(1, round(size / _BITMAP_PX))
    return im.resize((im.width * k, im.height * k), Image.NEAREST) if k > 1 else im


def _text_size(text: str, size: int) -> tuple[int, int]:
    """``(width, height)`` of (possibly multi-line) text."""
    masks = [_text_mask(line, size) for line in text.split("\n")]
    return max(m.width for m in masks), sum(m.height for m in masks)


def _put_text(img: Image.Image, x: int, y: int, text: str, size: int = _TEXT_PX,
              fill: tuple[int, int, int] = _FG, align: str = "left") -> int:
    """Draw text with its top at ``y``; ``x`` is the left edge, centre or right edge (``align``).

    Returns the y below the text.
    """
    for line in text.split("\n"):
        m = _text_mask(line, size)
        if align == "center":
            lx = int(round(x - m.width / 2))
        elif align == "right":
            lx = int(x - m.width)
        else:
            lx = int(x)
        img.paste(fill, (lx, int(y), lx + m.width, int(y) + m.height), m)
        y += m.height
    return int(y)


def _rotated_text(text: str, size: int, fill: tuple[int, int, int] = _FG) -> Image.Image:
    """RGBA image of one line of text reading bottom to top."""
    m = _text_mask(text, size).rotate(90, expand=True)
    out = Image.new("RGBA", m.size, fill + (0,))
    out.putalpha(m)
    return out


# --------------------------------------------------------------------------------------------
# Images and grids
# --------------------------------------------------------------------------------------------


def to_uint8_images(x: Any) -> np.ndarray:
    """Images as ``(B, H, W, 3)`` uint8.

    Args:
        x: ``(B, C, H, W)`` or ``(C, H, W)`` float tensor/array in roughly ``[-1, 1]`` (any
            device), converted with ``clamp(127.5 * x + 128, 0, 255)`` and truncation to uint8
            (NaN -> 128). ``C = 1``: grey; ``C = 2``: channel 0 grey; ``C >= 3``: the first three
            channels (latents should be decoded by the caller first). A uint8 array that is
            already channels-last, ``(B, H, W, 1|3|4)`` or ``(H, W, 1|3|4)``, is passed through
            (grey repeated, alpha dropped).
    """
    if isinstance(x, np.ndarray) and x.dtype == np.uint8:
        a = x[None] if x.ndim == 3 else x
        if a.ndim != 4 or a.shape[-1] not in (1, 3, 4):
            raise ValueError(f"uint8 images must be channels-last (B, H, W, 1|3|4), got shape {x.shape}")
        a = np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a[..., :3]
        return np.ascontiguousarray(a)
    t = _tensor(x)
    if t.dim() == 3:
        t = t.unsqueeze(0)
    if t.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W) or (C, H, W), got shape {tuple(t.shape)}")
    C = t.shape[1]
    if C == 0:
        raise ValueError("images have no channels")
    if C < 3:
        t = t[:, :1].expand(-1, 3, -1, -1)
    else:
        t = t[:, :3]
    t = torch.nan_to_num(t.float(), nan=0.0, posinf=1.0, neginf=-1.0)
    u8 = (127.5 * t + 128.0).clamp(0.0, 255.0).to(torch.uint8)
    return np.ascontiguousarray(u8.permute(0, 2, 3, 1).numpy())


def _upscale(images: np.ndarray, factor: int) -> np.ndarray:
    if factor <= 1:
        return images
    return images.repeat(factor, axis=1).repeat(factor, axis=2)


def make_grid(images: Any, nrow: int | None = None, padding: int = 2,
              pad_value: int | Sequence[int] = 255) -> np.ndarray:
    """Tile images into one array.

    Args:
        images: ``(B, H, W, 3)`` uint8 (or anything :func:`to_uint8_images` takes).
        nrow: images per row (default ``ceil(sqrt(B))``); the number of rows is
            ``ceil(B / nrow)``.
        padding: pixels between tiles and around the border.
        pad_value: grey level or RGB triple of the padding (and of empty cells).
    Returns:
        ``(rows * H + (rows + 1) * padding, cols * W + (cols + 1) * padding, 3)`` uint8 with
        ``cols = min(nrow, B)``; image ``k`` sits at row ``k // cols``, column ``k % cols``,
        top-left corner ``(padding + r * (H + padding), padding + c * (W + padding))``.
    """
    imgs = to_uint8_images(images)
    B, H, W, _ = imgs.shape
    if B == 0:
        raise ValueError("make_grid: no images")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    n = math.ceil(math.sqrt(B)) if nrow is None else int(nrow)
    if n < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    cols = min(n, B)
    rows = math.ceil(B / cols)
    fill = np.asarray(pad_value, dtype=np.uint8).reshape(-1)
    grid = np.empty((rows * H + (rows + 1) * padding, cols * W + (cols + 1) * padding, 3), dtype=np.uint8)
    grid[...] = fill if fill.size == 3 else fill[0]
    for k in range(B):
        r, c = divmod(k, cols)
        y, x = padding + r * (H + padding), padding + c * (W + padding)
        grid[y : y + H, x : x + W] = imgs[k]
    return grid


def save_grid(x: Any, path: PathLike | None = None, nrow: int | None = None, upscale: int | None = None,
              *, padding: int = 2, pad_value: int | Sequence[int] = 255, min_tile: int = 96) -> Image.Image:
    """A sample grid as a picture (and a file when ``path`` is given).

    Args:
        x: ``(B, C, H, W)`` tensor in ``[-1, 1]`` or ``(B, H, W, 3)`` uint8 array.
        upscale: integer nearest-neighbour enlargement of every image; default: the smallest
            factor that makes tiles at least ``min_tile`` (96) px (so 32 x 32 samples become
            96 x 96); 1 keeps the native size. Padding is not enlarged.
    """
    imgs = to_uint8_images(x)
    factor = _auto_scale(imgs.shape[1], imgs.shape[2], min_tile) if upscale is None else int(upscale)
    if factor < 1:
        raise ValueError(f"upscale must be >= 1, got {upscale}")
    img = Image.fromarray(make_grid(_upscale(imgs, factor), nrow=nrow, padding=padding, pad_value=pad_value))
    return _save(img, path)


# --------------------------------------------------------------------------------------------
# Colour maps and scales
# --------------------------------------------------------------------------------------------


def _cmap_table(cmap: str) -> np.ndarray:
    if cmap not in CMAPS:
        raise ValueError(f"unknown colormap {cmap!r}; available: {sorted(CMAPS)}")
    return np.array([_hex(c) for c in CMAPS[cmap]], dtype=np.float64)


def _apply_cmap(frac: np.ndarray, cmap: str) -> np.ndarray:
    """``frac`` in ``[0, 1]`` -> uint8 RGB (linear interpolation between the anchors)."""
    table = _cmap_table(cmap)
    pos = np.linspace(0.0, 1.0, len(table))
    f = np.clip(frac, 0.0, 1.0)
    out = np.stack([np.interp(f, pos, table[:, c]) for c in range(3)], axis=-1)
    return np.rint(out).astype(np.uint8)


def _limits(v: np.ndarray, vmin: float | None, vmax: float | None) -> tuple[float, float]:
    finite = v[np.isfinite(v)]
    lo = float(vmin) if vmin is not None else (float(finite.min()) if finite.size else 0.0)
    hi = float(vmax) if vmax is not None else (float(finite.max()) if finite.size else 1.0)
    if hi < lo:
        raise ValueError(f"vmin ({lo}) must not exceed vmax ({hi})")
    return lo, hi


def _fractions(values: Any, vmin: float | None, vmax: float | None, log: bool) -> tuple[np.ndarray, np.ndarray]:
    v = _numpy(values).astype(np.float64)
    if log:
        if (vmin is not None and vmin <= 0) or (vmax is not None and vmax <= 0):
            raise ValueError("a log scale needs vmin > 0 and vmax > 0")
        with np.errstate(divide="ignore", invalid="ignore"):
            v = np.where(v > 0, np.log10(np.where(v > 0, v, 1.0)), np.nan)
        vmin = None if vmin is None else math.log10(vmin)
        vmax = None if vmax is None else math.log10(vmax)
    lo, hi = _limits(v, vmin, vmax)
    finite = np.isfinite(v)
    if hi > lo:
        frac = (np.where(finite, v, lo) - lo) / (hi - lo)
    else:  # a constant map: the middle colour
        frac = np.full(v.shape, 0.5)
    return frac, finite


def colorize(values: Any, vmin: float | None = None, vmax: float | None = None, cmap: str = "viridis",
             *, log: bool = False, nan_color: Sequence[int] = (128, 128, 128)) -> np.ndarray:
    """Map values to colours.

    Args:
        values: ``(H, W)`` (any shape) floats, tensor or array.
        vmin, vmax: the values of the first and last colour (default: the finite min / max);
            values outside are clipped. Equal limits map everything to the middle colour.
        cmap: ``"viridis"``, ``"magma"`` or ``"coolwarm"``.
        log: log10 scale (``vmin``, ``vmax`` are then the positive values, not their logs);
            non-positive values count as missing.
        nan_color: colour of NaN / missing values.
    Returns:
        ``values.shape + (3,)`` uint8.
    """
    frac, finite = _fractions(values, vmin, vmax, log)
    out = _apply_cmap(frac, cmap)
    out[~finite] = np.asarray(nan_color, dtype=np.uint8)
    return out


def _decimals(step: float) -> int:
    for d in range(0, 10):
        if abs(step * 10**d - round(step * 10**d)) < 1e-6 * max(1.0, step * 10**d):
            return d
    return 10


def _fmt(v: float, step: float | None = None) -> str:
    """A short tick label."""
    if v == 0 or abs(v) < 1e-300:
        return "0"
    a = abs(v)
    if step is not None and 1e-3 <= a < 1e5 and step >= 1e-4:
        s = f"{v:.{_decimals(step)}f}"
        if "." in s:
            s = s.rstrip("0").rstrip(".")
    elif 1e-3 <= a < 1e5:
        s = f"{v:.2g}" if a < 1 else f"{v:.3g}"
    else:
        mant, exp = f"{v:.1e}".split("e")
        mant = mant.rstrip("0").rstrip(".")
        s = f"{mant}e{int(exp)}"
    return "0" if s.strip("-0.") == "" else s


def _linear_ticks(lo: float, hi: float, max_ticks: int) -> tuple[list[float], float | None]:
    if not hi > lo:
        return [lo], None
    max_ticks = max(2, max_ticks)
    raw = (hi - lo) / (max_ticks - 1)
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1.0, 2.0, 2.5, 5.0, 10.0) if m * mag >= raw * (1 - 1e-9))
    first, last = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
    ticks = [k * step for k in range(first, last + 1)]
    return ticks, step


def _log_ticks(lo: float, hi: float, max_ticks: int) -> tuple[list[float], float | None]:
    """Ticks (values) of a log scale from ``lo`` to ``hi`` (both > 0)."""
    if not hi > lo:
        return [lo], None
    a, b = math.log10(lo), math.log10(hi)
    max_ticks = max(2, max_ticks)
    if b - a >= 1 - 1e-9:
        ks = list(range(math.ceil(a - 1e-9), math.floor(b + 1e-9) + 1))
        stride = math.ceil(len(ks) / max_ticks)
        ticks = [10.0**k for k in ks[::stride]]
        for mults in ((5.0,), (2.0, 5.0)):  # few decades: add 5x, then 2x and 5x values if they fit
            if len(ticks) >= 3:
                break
            extra = [m * 10.0**k for k in range(math.floor(a), math.ceil(b) + 1) for m in mults]
            extra = [e for e in extra if lo * (1 - 1e-9) <= e <= hi * (1 + 1e-9)]
            if len(ticks) + len(extra) <= max_ticks:
                ticks = sorted(set(ticks) | set(extra))
        return ticks, None
    return _linear_ticks(lo, hi, max_ticks)  # less than a decade: evenly spaced values


def _tick_fraction(v: float, lo: float, hi: float, log: bool) -> float:
    if not hi > lo:
        return 0.5
    if log:
        return (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))
    return (v - lo) / (hi - lo)


def colorbar(length: int, vmin: float, vmax: float, cmap: str = "viridis", label: str | None = None, *,
             orientation: str = "horizontal", log: bool = False, thickness: int = 12,
             font_size: int = _TICK_PX, max_ticks: int | None = None,
             ticks: Sequence[float] | None = None) -> Image.Image:
    """A colour bar with tick labels (and an optional label) as a picture.

    Args:
        length: width (horizontal) or height (vertical) of the picture in pixels.
        vmin, vmax: the values at the two ends (positive when ``log``).
        cmap: colormap name (see :func:`colorize`).
        label: text above the bar (horizontal) or along its right side (vertical).
        orientation: ``"horizontal"`` (low values left) or ``"vertical"`` (low values at the bottom).
        log: log10 scale; ticks at decades when the range spans one, else at round values.
        max_ticks: at most this many ticks (default: from the length); ``ticks``: explicit values.
    """
    if orientation not in ("horizontal", "vertical"):
        raise ValueError(f"orientation must be 'horizontal' or 'vertical', got {orientation!r}")
    if log and (vmin <= 0 or vmax <= 0):
        raise ValueError("a log colour bar needs vmin > 0 and vmax > 0")
    if vmax < vmin:
        raise ValueError(f"vmin ({vmin}) must not exceed vmax ({vmax})")
    length = int(length)
    if length < 24:
        raise ValueError(f"a colour bar needs a length of at least 24 px, got {length}")
    horizontal = orientation == "horizontal"
    if max_ticks is None:
        max_ticks = max(2, length // (36 if horizontal else 28))
    if ticks is not None:
        tick_vals, step = [float(t) for t in ticks if min(vmin, vmax) <= t <= max(vmin, vmax)], None
    elif log:
        tick_vals, step = _log_ticks(vmin, vmax, max_ticks)
    else:
        tick_vals, step = _linear_ticks(vmin, vmax, max_ticks)
    if ticks is None and len(tick_vals) < 2 and vmax > vmin:  # too narrow for round values: label the ends
        tick_vals, step = [float(vmin), float(vmax)], None
    labels = [_fmt(v, step) for v in tick_vals]
    line_h = _text_size("Ag", font_size)[1]
    end = 6  # the bar leaves this many px at both ends so the end ticks stay visible
    n = length - 2 * end
    grad = _apply_cmap(np.linspace(0.0, 1.0, n), cmap)  # (n, 3)

    if horizontal:
        lab_h = _text_size(label, font_size)[1] + 3 if label else 0
        bar_y = lab_h
        height = lab_h + thickness + 4 + line_h + 2
        img = Image.new("RGB", (length, height), _BG)
        if label:
            _put_text(img, length // 2, 0, label, font_size, align="center")
        img.paste(Image.fromarray(np.repeat(grad[None], thickness, axis=0)), (end, bar_y))
        draw = ImageDraw.Draw(img)
        draw.rectangle((end - 1, bar_y - 1, end + n, bar_y + thickness), outline=_OUTLINE)
        prev_right = -10**9
        for v, text in zip(tick_vals, labels):
            x = end + int(round(_tick_fraction(v, vmin, vmax, log) * (n - 1)))
            draw.line((x, bar_y + thickness, x, bar_y + thickness + 3), fill=_OUTLINE)
            w = _text_size(text, font_size)[0]
            lx = min(max(0, x - w // 2), length - w)
            if lx < prev_right + 4:
                continue
            _put_text(img, lx, bar_y + thickness + 4, text, font_size)
            prev_right = lx + w
        return img

    tick_w = max([_text_size(t, font_size)[0] for t in labels] + [1])
    lab = _rotated_text(label, font_size) if label else None
    width = thickness + 5 + tick_w + (4 + lab.width if lab is not None else 0) + 1
    img = Image.new("RGB", (width, length), _BG)
    col = np.repeat(grad[::-1][:, None], thickness, axis=1)  # high values at the top
    img.paste(Image.fromarray(col), (1, end))
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, end - 1, thickness + 1, end + n), outline=_OUTLINE)
    prev_top = 10**9
    for v, text in zip(tick_vals, labels):
        y = end + n - 1 - int(round(_tick_fraction(v, vmin, vmax, log) * (n - 1)))
        draw.line((thickness + 1, y, thickness + 4, y), fill=_OUTLINE)
        ty = min(max(0, y - line_h // 2), length - line_h)
        if ty + line_h > prev_top - 1:
            continue
        _put_text(img, thickness + 5, ty, text, font_size)
        prev_top = ty
    if lab is not None:
        img.paste(lab, (width - lab.width - 1, max(0, (length - lab.height) // 2)), lab)
    return img


def patch_map_image(values: Any, size: tuple[int, int] | int | None = None, *, vmin: float | None = None,
                    vmax: float | None = None, cmap: str = "viridis", log: bool = False,
                    min_tile: int = 96) -> Image.Image:
    """A per-patch value map, nearest-neighbour enlarged.

    Args:
        values: ``(h, w)`` one value per patch (or ``(N,)`` with ``N`` a square number).
        size: output ``(width, height)`` in pixels, or one int for a square; default: the
            smallest integer enlargement with the longer side at least ``min_tile`` px.
        vmin, vmax, cmap, log: as in :func:`colorize`.
    """
    v = _numpy(values).astype(np.float64)
    if v.ndim == 1:
        side = math.isqrt(v.size)
        if side * side != v.size:
            raise ValueError(f"{v.size} patch values are not a square grid; pass them as (h, w)")
        v = v.reshape(side, side)
    if v.ndim != 2:
        raise ValueError(f"patch values must be (h, w), got shape {v.shape}")
    rgb = Image.fromarray(colorize(v, vmin, vmax, cmap, log=log))
    if size is None:
        k = _auto_scale(v.shape[0], v.shape[1], min_tile)
        size = (v.shape[1] * k, v.shape[0] * k)
    elif isinstance(size, int):
        size = (size, size)
    return rgb.resize((int(size[0]), int(size[1])), Image.NEAREST)


# --------------------------------------------------------------------------------------------
# Records -> panels
# --------------------------------------------------------------------------------------------


def _records(record: Any) -> list:
    if hasattr(record, "record") and not isinstance(record, (list, tuple)):
        record = record.record
    if record is None:
        raise ValueError("no record: sample with pf.sample(..., record=True)")
    record = list(record)
    if not record:
        raise ValueError("the record is empty")
    return record


def _patch_geometry(rec: Any, patch_size: int | None) -> tuple[int, int, int]:
    """``(p, h, w)``: patch size and patch grid of the recorded state."""
    H, W = rec.x.shape[-2:]
    N = rec.t.shape[-1]
    if patch_size is None:
        p = int(round(math.sqrt(H * W / max(N, 1))))
    else:
        p = int(patch_size)
    if p < 1 or H % p or W % p or (H // p) * (W // p) != N:
        raise ValueError(f"{N} patch times do not tile a {H}x{W} state with patch size {patch_size or p}")
    return p, H // p, W // p


def _patch_variance(logvar: torch.Tensor, image: int, p: int) -> np.ndarray:
    """``(h, w)`` float64: ``exp(logvar)`` averaged over each patch of one image."""
    lv = _tensor(logvar)[image, 0].double()
    var = torch.exp(lv.clamp(max=700.0))
    h, w = var.shape[0] // p, var.shape[1] // p
    return var.reshape(h, p, w, p).mean(dim=(1, 3)).numpy()


def _select(n: int, every: int) -> list[int]:
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    idx = list(range(0, n, every))
    if idx[-1] != n - 1:
        idx.append(n - 1)
    return idx


def _image_tiles(states: list[torch.Tensor], decode: Decode | None) -> list[np.ndarray]:
    """(C, H, W) tensors -> (H', W', 3) uint8, decoded in one batch when ``decode`` is given."""
    batch = torch.stack([_tensor(s).float() for s in states])
    if decode is not None:
        with torch.no_grad():
            batch = decode(batch)
    return list(to_uint8_images(batch))


def _log_limits(maps: list[np.ndarray | None]) -> tuple[float, float] | None:
    vals = [m[np.isfinite(m) & (m > 0)] for m in maps if m is not None]
    vals = [v for v in vals if v.size]
    if not vals:
        return None
    allv = np.concatenate(vals)
    lo, hi = float(allv.min()), float(allv.max())
    if hi <= lo:  # constant: widen a little so the bar has a scale
        lo, hi = lo / 1.1, hi * 1.1
    return lo, hi


def _fit(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    return img if img.size == size else img.resize(size, Image.NEAREST)


def _na_tile(size: tuple[int, int], text: str = "n/a") -> Image.Image:
    tile = Image.new("RGB", size, _NA_FILL)
    th = _text_size(text, _HEAD_PX)[1]
    _put_text(tile, size[0] // 2, (size[1] - th) // 2, text, _HEAD_PX, fill=_MUTED, align="center")
    return tile


def _mask_tile(mask: np.ndarray, size: tuple[int, int]) -> Image.Image:
    rgb = np.where(mask[..., None], np.array(_CERTAIN, np.uint8), np.array(_UNCERTAIN, np.uint8)).astype(np.uint8)
    return Image.fromarray(rgb).resize(size, Image.NEAREST)


def _legend(items: Sequence[tuple[tuple[int, int, int], str]], width: int, font_size: int = _TICK_PX) -> Image.Image:
    line_h = _text_size("Ag", font_size)[1]
    sw = max(10, line_h - 4)
    img = Image.new("RGB", (width, len(items) * (line_h + 2)), _BG)
    draw = ImageDraw.Draw(img)
    for i, (colour, text) in enumerate(items):
        y = i * (line_h + 2)
        top = y + (line_h - sw) // 2
        draw.rectangle((6, top, 6 + sw, top + sw), fill=colour, outline=_OUTLINE)
        _put_text(img, 6 + sw + 6, y, text, font_size)
    return img


def _paste_framed(canvas: Image.Image, tile: Image.Image, x: int, y: int) -> None:
    canvas.paste(tile, (x, y))
    ImageDraw.Draw(canvas).rectangle((x - 1, y - 1, x + tile.width, y + tile.height), outline=(190, 190, 190))


@dataclass
class _Column:
    header: str
    scale: Image.Image | None  # colour bar / legend below the header


def _table(rows: list[tuple[str, list[Image.Image]]], columns: list[_Column], tile: tuple[int, int], *,
           title: str | None = None, subtitle: str | None = None, label_w: int | None = None,
           footer: bool = False) -> Image.Image:
    """Rows of equally sized tiles with a label column, column headers and scales."""
    tw, th = tile
    col_w = [max(tw, _text_size(c.header, _HEAD_PX)[0], c.scale.width if c.scale is not None else 0) for c in columns]
    if label_w is None:
        label_w = max([_text_size(label, _TEXT_PX)[0] for label, _ in rows] + [1])
    x0 = _MARGIN + label_w + _COL_GAP
    col_x = []
    x = x0
    for w in col_w:
        col_x.append(x)
        x += w + _COL_GAP
    width = max(x - _COL_GAP + _MARGIN, _MARGIN * 2 + (_text_size(title, _TITLE_PX)[0] if title else 0),
                _MARGIN * 2 + (_text_size(subtitle, _TEXT_PX)[0] if subtitle else 0))
    head_text_h = max(_text_size(c.header, _HEAD_PX)[1] for c in columns)
    scale_h = max([c.scale.height for c in columns if c.scale is not None] + [0])
    header_h = head_text_h + (4 + scale_h if scale_h else 0)
    title_h = (_text_size(title, _TITLE_PX)[1] + 4 if title else 0) + (_text_size(subtitle, _TEXT_PX)[1] + 4 if subtitle else 0)
    row_h = [max(th, _text_size(label, _TEXT_PX)[1]) for label, _ in rows]
    body_h = sum(row_h) + _ROW_GAP * len(rows)
    height = _MARGIN + title_h + (8 if title_h else 0) + header_h + _ROW_GAP + body_h + _MARGIN
    if footer:
        height += header_h + _ROW_GAP
    img = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(img)

    y = _MARGIN
    if title:
        y = _put_text(img, _MARGIN, y, title, _TITLE_PX) + 4
    if subtitle:
        y = _put_text(img, _MARGIN, y, subtitle, _TEXT_PX, fill=_MUTED) + 4
    if title_h:
        y += 8

    def header_at(y_top: int) -> None:
        for c, cx, cw in zip(columns, col_x, col_w):
            _put_text(img, cx + cw // 2, y_top + head_text_h - _text_size(c.header, _HEAD_PX)[1], c.header, _HEAD_PX, align="center")
            if c.scale is not None:
                img.paste(c.scale, (cx + (cw - c.scale.width) // 2, y_top + head_text_h + 4))

    header_at(y)
    y += header_h + _ROW_GAP
    for (label, tiles), rh in zip(rows, row_h):
        draw.line((_MARGIN, y - _ROW_GAP // 2, width - _MARGIN, y - _ROW_GAP // 2), fill=_RULE)
        lh = _text_size(label, _TEXT_PX)[1]
        _put_text(img, _MARGIN, y + (rh - lh) // 2, label, _TEXT_PX)
        for t, cx, cw in zip(tiles, col_x, col_w):
            _paste_framed(img, t, cx + (cw - tw) // 2, y + (rh - th) // 2)
        y += rh + _ROW_GAP
    if footer:
        draw.line((_MARGIN, y - _ROW_GAP // 2, width - _MARGIN, y - _ROW_GAP // 2), fill=_RULE)
        header_at(y)
    return img


@dataclass
class _Panels:
    """Everything needed to draw the rows of one image's trajectory."""

    labels: list[str]
    rows: list[list[Image.Image]]
    columns: list[_Column]
    tile: tuple[int, int]


def _trajectory_panels(record: list, image_index: int, indices: list[int], patch_size: int | None,
                       decode: Decode | None, tile: int | None) -> _Panels:
    first = record[indices[0]]
    B = first.x.shape[0]
    if not -B <= image_index < B:
        raise IndexError(f"image_index {image_index} out of range for a batch of {B}")
    i = image_index % B
    p, h, w = _patch_geometry(first, patch_size)
    recs = [record[k] for k in indices]

    states = _image_tiles([r.x[i] for r in recs], decode)
    cleans = _image_tiles([r.x1_hat[i] for r in recs], decode)
    ih, iw = states[0].shape[:2]
    k = _auto_scale(ih, iw, 128 if tile is None else tile)
    if tile is not None and max(ih, iw) > tile:
        k = 1
    size = (iw * k, ih * k)

    var_maps = [None if r.logvar is None else _patch_variance(r.logvar, i, p) for r in recs]
    limits = _log_limits(var_maps)
    scale_len = max(size[0], 120)

    rows, labels = [], []
    for r, xs, xc, vm in zip(recs, states, cleans, var_maps):
        t = _numpy(_tensor(r.t)[i]).astype(np.float64).reshape(h, w)
        tiles = [
            _fit(Image.fromarray(xs), size),
            _fit(Image.fromarray(xc), size),
            patch_map_image(t, size, vmin=0.0, vmax=1.0, cmap=_TIME_CMAP),
            _na_tile(size) if vm is None or limits is None
            else patch_map_image(vm, size, vmin=limits[0], vmax=limits[1], cmap=_UNC_CMAP, log=True),
            _na_tile(size) if r.mask is None else _mask_tile(_numpy(_tensor(r.mask)[i]).astype(bool).reshape(h, w), size),
        ]
        tmin, tmax = float(t.min()), float(t.max())
        lines = [f"step {r.step} · call {r.call}", f"s = {r.s:.2f} -> {r.s_next:.2f}"]
        lines.append(f"t = {tmin:.2f}" if tmax - tmin < 5e-3 else f"t: {tmin:.2f} to {tmax:.2f}")
        if r.mask is not None:
            frac = float(_tensor(r.mask)[i].float().mean())
            lines.append(f"certain: {100 * frac:.0f}%")
        labels.append("\n".join(lines))
        rows.append(tiles)

    columns = [
        _Column("current state x", None),
        _Column("predicted clean image", None),
        _Column("per-patch time t", colorbar(scale_len, 0.0, 1.0, _TIME_CMAP, "0 = noise, 1 = data")),
        _Column("uncertainty",
                None if limits is None else colorbar(scale_len, limits[0], limits[1], _UNC_CMAP, "variance (log scale)", log=True)),
        _Column("certain patches", _legend([(_CERTAIN, "certain"), (_UNCERTAIN, "uncertain"), (_NA_FILL, "n/a: no mask")], scale_len)),
    ]
    return _Panels(labels, rows, columns, size)


def trajectory_sheet(record: Any, image_index: int = 0, every: int = 1, patch_size: int | None = None,
                     decode: Decode | None = None, path: PathLike | None = None, *, tile: int | None = None,
                     title: str | None = None, note: str | None = None) -> Image.Image:
    """One image's sampling run as a contact sheet: one row per recorded network call.

    Columns: the call's input state ``x``, its clean estimate ``x1_hat``, the per-patch time
    ``t`` (fixed scale ``[0, 1]``), the per-patch uncertainty (``exp(logvar)`` averaged per
    patch, log colour scale shared by all rows; "n/a" without a log-variance) and the
    certain / uncertain patch mask ("n/a" where the call had none). Each row is labelled with
    step, call index, the step's times and the range of ``t``.

    Args:
        record: ``SampleResult.record`` (a list of ``CallRecord``) or the ``SampleResult``.
        image_index: which image of the batch.
        every: keep every ``every``-th call (calls ``0, every, 2 every, ...``); the last call is
            always kept, so there are ``len(range(0, n, every))`` rows, plus one when
            ``(n - 1) % every != 0``.
        patch_size: ``p`` of the model (inferred from the record when ``None``).
        decode: latent models: ``(B, C, h, w) -> (B, 3, H, W)`` in ``[-1, 1]`` for the images.
        path: also write the picture there (PNG by extension).
        tile: minimum tile size in px (default 128; small images are enlarged by an integer factor).
        title: heading (default: image index and number of calls).
        note: an extra line under the explanation (e.g. that the maps are on a latent grid).
    """
    rec = _records(record)
    indices = _select(len(rec), every)
    panels = _trajectory_panels(rec, image_index, indices, patch_size, decode, tile)
    if title is None:
        title = f"Sampling trajectory of image {image_index}"
    subtitle = (f"{len(indices)} of {len(rec)} network calls, top to bottom. "
                "Bright uncertainty = the model is unsure; t = how far a patch has been denoised.")
    if note:
        subtitle += "\n" + note
    img = _table(list(zip(panels.labels, panels.rows)), panels.columns, panels.tile, title=title,
                 subtitle=subtitle, footer=len(indices) >= 6)
    return _save(img, path)


def _to_palette(frame: Image.Image) -> Image.Image:
    """A GIF frame: fixed entries for the colour maps, legend and text greys, the rest adaptive.

    (Pillow's default conversion uses a web palette that bands the colour maps and greys.)
    """
    fixed = [tuple(c) for name in (_TIME_CMAP, _UNC_CMAP) for c in _apply_cmap(np.linspace(0, 1, 32), name).tolist()]
    fixed += [(g, g, g) for g in np.linspace(0, 255, 16).round().astype(int).tolist()]
    fixed += [_BG, _FG, _MUTED, _RULE, _NA_FILL, _CERTAIN, _UNCERTAIN, _OUTLINE]
    fixed = list(dict.fromkeys(fixed))
    rest = 256 - len(fixed)
    adaptive = frame.quantize(rest, method=_MEDIANCUT, dither=_NO_DITHER).getpalette()[: 3 * rest]
    palette = np.array([list(c) for c in fixed] + np.asarray(adaptive).reshape(-1, 3).tolist(), dtype=np.int32)
    rgb = np.asarray(frame.convert("RGB"))
    colours, inverse = np.unique(rgb.reshape(-1, 3), axis=0, return_inverse=True)
    # exact nearest palette entry (Pillow's palette mapping is approximate: it turns white grey)
    dist = ((colours[:, None, :].astype(np.int32) - palette[None]) ** 2).sum(-1)
    index = dist.argmin(axis=1).astype(np.uint8)[inverse.reshape(-1)].reshape(rgb.shape[:2])
    out = Image.frombytes("P", frame.size, index.tobytes())
    flat = palette.astype(np.uint8).reshape(-1).tolist()
    out.putpalette(flat + [0] * (768 - len(flat)))
    return out


def trajectory_gif(record: Any, path: PathLike | None, image_index: int = 0, every: int = 1,
                   patch_size: int | None = None, duration_ms: int = 400, *, decode: Decode | None = None,
                   tile: int | None = None, hold_last_ms: int = 1600, title: str | None = None,
                   note: str | None = None) -> list[Image.Image]:
    """The panels of :func:`trajectory_sheet` as an animation, one frame per kept call.

    Frames share the colour scales of the whole run. Frame count: as the rows of
    :func:`trajectory_sheet` with the same ``every``. The last frame stays ``hold_last_ms``.
    ``title`` (default ``"Sampling image I"``) is followed by ``": call k of n"`` on each frame;
    ``note`` is a line of text under it.

    Returns:
        the frames (RGB); written as a looping GIF to ``path`` when given.
    """
    rec = _records(record)
    indices = _select(len(rec), every)
    panels = _trajectory_panels(rec, image_index, indices, patch_size, decode, tile)
    label_w = max(_text_size(label, _TEXT_PX)[0] for label in panels.labels)
    head = title if title else f"Sampling image {image_index}"
    frames = []
    for n, (label, row) in enumerate(zip(panels.labels, panels.rows)):
        frames.append(_table([(label, row)], panels.columns, panels.tile, label_w=label_w,
                             title=f"{head}: call {n + 1} of {len(indices)}", subtitle=note))
    if path is not None:
        durations = [int(duration_ms)] * len(frames)
        durations[-1] = max(int(duration_ms), int(hold_last_ms))
        parent = os.path.dirname(os.fspath(path))
        if parent:
            os.makedirs(parent, exist_ok=True)
        pal = [_to_palette(f) for f in frames]
        pal[0].save(path, format="GIF", save_all=True, append_images=pal[1:], duration=durations,
                    loop=0, disposal=1)
    return frames


# --------------------------------------------------------------------------------------------
# Overview and comparison figures
# --------------------------------------------------------------------------------------------


def _steps(record: list) -> dict[int, list]:
    by_step: dict[int, list] = {}
    for r in record:
        by_step.setdefault(int(r.step), []).append(r)
    return by_step


def uncertainty_time_figure(record: Any, patch_size: int | None = None, path: PathLike | None = None,
                            num_images: int = 4, num_steps: int = 6, *, final: Any = None,
                            decode: Decode | None = None, title: str | None = None,
                            tile: int = 96, row_labels: Sequence[str] | None = None) -> Image.Image:
    """Overview: where the model is unsure and how fast each patch is denoised.

    Rows are the first ``num_images`` images; column groups are ``num_steps`` evenly spaced
    outer steps (first and last included), each with the uncertainty map (``exp(logvar)``
    averaged per patch, from the step's first call; one log scale for the whole figure) and the
    per-patch time map (from the step's call with the widest spread of times, e.g. the
    look-ahead call; scale ``[0, 1]``). The last column shows ``final`` (the samples, e.g.
    ``res.x``) or, when not given, the clean estimate of the last call. Colour bars at the bottom.

    Args:
        record: ``SampleResult.record`` or the ``SampleResult``.
        patch_size: ``p`` of the model (inferred when ``None``).
        path: also write the picture there.
        final: ``(B, C, H, W)`` final samples (decoded with ``decode`` if given).
        decode: latent models: ``(B, C, h, w) -> (B, 3, H, W)`` in ``[-1, 1]``.
        tile: minimum tile size in px.
        row_labels: one label per row (default ``"image i"``), e.g. ``"sample 12 (class 3)"``.
    """
    rec = _records(record)
    p, h, w = _patch_geometry(rec[0], patch_size)
    by_step = _steps(rec)
    step_ids = sorted(by_step)
    picks = sorted({step_ids[int(round(j))] for j in np.linspace(0, len(step_ids) - 1, max(1, min(num_steps, len(step_ids))))})
    B = rec[0].x.shape[0]
    n_img = max(1, min(int(num_images), B))

    groups = []  # (step, s, var maps per image or None, t maps per image)
    for k in picks:
        calls = by_step[k]
        with_lv = [c for c in calls if c.logvar is not None]
        spreads = [float((_tensor(c.t)[:n_img].amax(1) - _tensor(c.t)[:n_img].amin(1)).mean()) for c in calls]
        t_call = calls[max(range(len(calls)), key=lambda j: (spreads[j], j))]
        var = None if not with_lv else [_patch_variance(with_lv[0].logvar, i, p) for i in range(n_img)]
        tmaps = [_numpy(_tensor(t_call.t)[i]).astype(np.float64).reshape(h, w) for i in range(n_img)]
        groups.append((k, calls[0].s, var, tmaps))
    limits = _log_limits([m for g in groups if g[2] is not None for m in g[2]])

    if final is not None:
        fin = _tensor(final)[:n_img].float()
        if decode is not None:
            with torch.no_grad():
                fin = decode(fin)
        finals = to_uint8_images(fin)
        final_head = "final sample"
    else:
        finals = np.stack(_image_tiles([rec[-1].x1_hat[i] for i in range(n_img)], decode))
        final_head = "final estimate"
    fh, fw = finals.shape[1:3]
    kf = _auto_scale(fh, fw, tile)
    size = (fw * kf, fh * kf)

    pair_gap, group_gap = 4, 14
    group_w = 2 * size[0] + pair_gap
    group_heads = [f"step {k} · s = {s:.2f}" for k, s, _, _ in groups]
    group_w = max([group_w] + [_text_size(t, _HEAD_PX)[0] + 4 for t in group_heads])
    final_w = max(size[0], _text_size(final_head, _HEAD_PX)[0])
    row_labels = [f"image {i}" for i in range(n_img)] if row_labels is None else [str(v) for v in row_labels][:n_img]
    if len(row_labels) < n_img:
        raise ValueError(f"row_labels: {len(row_labels)} labels for {n_img} rows")
    label_w = max(_text_size(t, _TEXT_PX)[0] for t in row_labels)

    if title is None:
        title = "Where the model is unsure, and how far each patch has been denoised"
    subtitle = ("Rows: images. Column pairs: sampling steps. Left of each pair: uncertainty per patch "
                "(bright = unsure). Right: per-patch time t (0 = noise, 1 = data).")
    bar_len = max(220, min(360, group_w + 60))
    bars = []
    if limits is not None:
        bars.append(colorbar(bar_len, limits[0], limits[1], _UNC_CMAP, "uncertainty: variance per patch (log scale)", log=True))
    bars.append(colorbar(bar_len, 0.0, 1.0, _TIME_CMAP, "per-patch time t (0 = noise, 1 = data)"))

    x0 = _MARGIN + label_w + _COL_GAP
    body_w = len(groups) * (group_w + group_gap) + final_w
    bars_w = sum(b.width for b in bars) + 40 * (len(bars) - 1)
    width = max(x0 + body_w + _MARGIN, _MARGIN * 2 + _text_size(title, _TITLE_PX)[0],
                _MARGIN * 2 + _text_size(subtitle, _TEXT_PX)[0], _MARGIN * 2 + bars_w)
    head_h = _text_size("Ag", _HEAD_PX)[1]
    sub_h = _text_size("Ag", _TEXT_PX)[1]
    title_h = _text_size(title, _TITLE_PX)[1] + 4 + _text_size(subtitle, _TEXT_PX)[1] + 12
    rows_h = n_img * (size[1] + _ROW_GAP)
    bars_h = max(b.height for b in bars)
    height = _MARGIN + title_h + head_h + 2 + sub_h + 6 + rows_h + 10 + bars_h + _MARGIN
    img = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(img)

    y = _put_text(img, _MARGIN, _MARGIN, title, _TITLE_PX) + 4
    y = _put_text(img, _MARGIN, y, subtitle, _TEXT_PX, fill=_MUTED) + 12
    gx = [x0 + j * (group_w + group_gap) for j in range(len(groups))]
    fx = x0 + len(groups) * (group_w + group_gap)
    for j, head in enumerate(group_heads):
        cx = gx[j] + group_w // 2
        _put_text(img, cx, y, head, _HEAD_PX, align="center")
        left = cx - (2 * size[0] + pair_gap) // 2
        _put_text(img, left + size[0] // 2, y + head_h + 2, "uncertainty", _TEXT_PX, fill=_MUTED, align="center")
        _put_text(img, left + size[0] + pair_gap + size[0] // 2, y + head_h + 2, "time t", _TEXT_PX, fill=_MUTED, align="center")
        if j:  # a faint divider between steps
            dx = gx[j] - group_gap // 2
            draw.line((dx, y, dx, y + head_h + 2 + sub_h + 6 + rows_h - _ROW_GAP), fill=_RULE)
    _put_text(img, fx + final_w // 2, y, final_head, _HEAD_PX, align="center")
    y += head_h + 2 + sub_h + 6

    for i in range(n_img):
        _put_text(img, _MARGIN, y + (size[1] - sub_h) // 2, row_labels[i], _TEXT_PX)
        for j, (_, _, var, tmaps) in enumerate(groups):
            left = gx[j] + (group_w - (2 * size[0] + pair_gap)) // 2
            if var is None or limits is None:
                u = _na_tile(size)
            else:
                u = patch_map_image(var[i], size, vmin=limits[0], vmax=limits[1], cmap=_UNC_CMAP, log=True)
            _paste_framed(img, u, left, y)
            _paste_framed(img, patch_map_image(tmaps[i], size, vmin=0.0, vmax=1.0, cmap=_TIME_CMAP), left + size[0] + pair_gap, y)
        _paste_framed(img, _fit(Image.fromarray(finals[i]), size), fx + (final_w - size[0]) // 2, y)
        y += size[1] + _ROW_GAP

    y += 10
    bx = _MARGIN + max(0, (width - 2 * _MARGIN - bars_w) // 2)
    for b in bars:
        img.paste(b, (bx, y))
        bx += b.width + 40
    return _save(img, path)


def sampler_comparison(grids: Mapping[str, Any], path: PathLike | None = None,
                       labels: Mapping[str, str] | None = None, nrow: int | None = None, *,
                       upscale: int | None = None, title: str | None = None, min_tile: int = 64) -> Image.Image:
    """Sample grids of several samplers side by side, each under its title.

    Args:
        grids: name -> ``(B, C, H, W)`` samples (or ``(B, H, W, 3)`` uint8), in display order.
        labels: name -> title (e.g. ``{"look_ahead": "look_ahead · 24 NFE"}``); default: the name.
        nrow: images per grid row (default ``ceil(sqrt(B))``).
        upscale: nearest-neighbour enlargement (default: tiles at least ``min_tile`` px).
        title: heading over the whole figure.
    """
    if not grids:
        raise ValueError("sampler_comparison: no grids")
    panels = []
    for name, x in grids.items():
        imgs = to_uint8_images(x)
        k = _auto_scale(imgs.shape[1], imgs.shape[2], min_tile) if upscale is None else int(upscale)
        panels.append(((labels or {}).get(name, str(name)), Image.fromarray(make_grid(_upscale(imgs, k), nrow=nrow))))
    head_h = max(_text_size(t, _HEAD_PX)[1] for t, _ in panels)
    widths = [max(g.width, _text_size(t, _HEAD_PX)[0]) for t, g in panels]
    gap = 20
    title_h = _text_size(title, _TITLE_PX)[1] + 10 if title else 0
    width = max(2 * _MARGIN + sum(widths) + gap * (len(panels) - 1), 2 * _MARGIN + (_text_size(title, _TITLE_PX)[0] if title else 0))
    height = 2 * _MARGIN + title_h + head_h + 6 + max(g.height for _, g in panels)
    img = Image.new("RGB", (width, height), _BG)
    if title:
        _put_text(img, _MARGIN, _MARGIN, title, _TITLE_PX)
    x = _MARGIN
    y = _MARGIN + title_h
    for (text, g), w in zip(panels, widths):
        _put_text(img, x + w // 2, y, text, _HEAD_PX, align="center")
        img.paste(g, (x + (w - g.width) // 2, y + head_h + 6))
        x += w + gap
    return _save(img, path)
