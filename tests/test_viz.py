"""Pictures: grid arithmetic, conversions, colour maps and the trajectory figures on real records."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageFont

import patchforcing as pf
from patchforcing import viz

from conftest import randomize

SIZE, PATCH = 16, 2


@pytest.fixture(scope="module")
def pft() -> torch.nn.Module:
    m = pf.create_model("PFT-T/2", input_size=SIZE, in_channels=3, num_classes=4, depth=2, hidden_size=64, num_heads=4)
    return randomize(m, std=0.05, seed=3).eval()


def _run(model: torch.nn.Module, sampler: str, steps: int, batch: int = 3):
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(batch, 3, SIZE, SIZE, generator=g)
    return pf.sample(model, noise, sampler=sampler, steps=steps, y=torch.arange(batch) % 4, record=True)


@pytest.fixture(scope="module")
def look_ahead(pft):
    return _run(pft, "look_ahead", steps=4)  # 1 early call + 3 steps x 2 calls = 7 calls


def _rows(n: int, every: int) -> int:
    return len(range(0, n, every)) + (1 if (n - 1) % every else 0)


# --------------------------------------------------------------------------------------------
# Conversion and grids
# --------------------------------------------------------------------------------------------


def test_to_uint8_exact_values():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0, float("nan")]).view(1, 1, 1, 8)
    out = viz.to_uint8_images(x)
    assert out.shape == (1, 1, 8, 3) and out.dtype == np.uint8
    # clamp(127.5 x + 128, 0, 255) truncated: -1 -> 0.5 -> 0, -0.5 -> 64.25 -> 64, 0.5 -> 191.75 -> 191
    assert out[0, 0, :, 0].tolist() == [0, 0, 64, 128, 191, 255, 255, 128]
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()  # grey


def test_to_uint8_channels_and_passthrough():
    rgb = torch.stack([torch.full((2, 3), -1.0), torch.zeros(2, 3), torch.ones(2, 3)]).unsqueeze(0)
    assert viz.to_uint8_images(rgb)[0, 0, 0].tolist() == [0, 128, 255]
    four = torch.cat([rgb, torch.ones(1, 1, 2, 3)], dim=1)  # C=4: first three channels
    assert viz.to_uint8_images(four)[0, 1, 2].tolist() == [0, 128, 255]
    single = viz.to_uint8_images(rgb[0].requires_grad_())  # (C, H, W), needs no manual detach
    assert single.shape == (1, 2, 3, 3)
    u8 = np.arange(2 * 4 * 5 * 3, dtype=np.uint8).reshape(2, 4, 5, 3)
    assert np.array_equal(viz.to_uint8_images(u8), u8)
    grey = viz.to_uint8_images(u8[..., :1])
    assert grey.shape == (2, 4, 5, 3) and np.array_equal(grey[..., 2], u8[..., 0])
    with pytest.raises(ValueError):
        viz.to_uint8_images(torch.zeros(2, 2))


@pytest.mark.parametrize("B,nrow,padding", [(5, 3, 2), (4, None, 1), (7, 10, 0), (1, 1, 3)])
def test_make_grid_shape_and_placement(B, nrow, padding):
    H, W = 4, 6
    rng = np.random.default_rng(B)
    imgs = rng.integers(0, 255, size=(B, H, W, 3), dtype=np.uint8)
    for k in range(B):
        imgs[k, 0, 0] = (k, 100 + k, 200 - k)  # a marker in each top-left pixel
    grid = viz.make_grid(imgs, nrow=nrow, padding=padding, pad_value=255)
    cols = min(nrow if nrow is not None else int(np.ceil(np.sqrt(B))), B)
    rows = -(-B // cols)
    assert grid.shape == (rows * H + (rows + 1) * padding, cols * W + (cols + 1) * padding, 3)
    for k in range(B):
        r, c = divmod(k, cols)
        y, x = padding + r * (H + padding), padding + c * (W + padding)
        assert grid[y, x].tolist() == [k, 100 + k, 200 - k]
        assert np.array_equal(grid[y : y + H, x : x + W], imgs[k])
    if padding:
        assert (grid[:padding] == 255).all() and (grid[:, :padding] == 255).all()


def test_make_grid_empty_cells_and_pad_colour():
    imgs = np.zeros((5, 2, 2, 3), dtype=np.uint8)
    grid = viz.make_grid(imgs, nrow=3, padding=1, pad_value=(10, 20, 30))
    assert grid.shape == (2 * 2 + 3, 3 * 2 + 4, 3)
    assert grid[0, 0].tolist() == [10, 20, 30]
    assert (grid[4:6, 7:9] == [10, 20, 30]).all()  # the sixth cell is empty


def test_save_grid_upscales_small_images(tmp_path):
    x = torch.rand(6, 3, 32, 32) * 2 - 1
    path = tmp_path / "sub" / "grid.png"
    img = viz.save_grid(x, path, nrow=3)
    assert path.exists()
    assert img.size == (3 * 96 + 4 * 2, 2 * 96 + 3 * 2)  # 32 px -> x3 = 96 px tiles
    back = np.asarray(Image.open(path).convert("RGB"))
    ref = viz.to_uint8_images(x)
    assert np.array_equal(back[2:5, 2:5], np.broadcast_to(ref[0, 0, 0], (3, 3, 3)))  # NEAREST: 3x3 blocks
    assert viz.save_grid(x, None, nrow=3, upscale=1).size == (3 * 32 + 8, 2 * 32 + 6)


# --------------------------------------------------------------------------------------------
# Colour maps and scales
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cmap", sorted(viz.CMAPS))
def test_colorize_endpoints(cmap):
    table = viz.CMAPS[cmap]
    first = [int(table[0][i : i + 2], 16) for i in (1, 3, 5)]
    last = [int(table[-1][i : i + 2], 16) for i in (1, 3, 5)]
    out = viz.colorize(torch.tensor([[0.0, 1.0], [-5.0, 9.0]]), vmin=0.0, vmax=1.0, cmap=cmap)
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    assert out[0, 0].tolist() == first and out[1, 0].tolist() == first  # clipped below
    assert out[0, 1].tolist() == last and out[1, 1].tolist() == last


def test_colorize_viridis_monotone_luminance_and_defaults():
    ramp = np.linspace(0, 1, 257)
    rgb = viz.colorize(ramp, 0.0, 1.0, "viridis").astype(float)
    luma = rgb @ np.array([0.299, 0.587, 0.114])
    assert np.all(np.diff(luma) >= -0.6) and luma[-1] - luma[0] > 150  # rounding only
    coarse = luma[::16]
    assert np.all(np.diff(coarse) > 0)
    # default limits = data min / max; log scale; NaN gets the NaN colour
    v = np.array([2.0, 4.0, np.nan])
    out = viz.colorize(v, cmap="magma")
    assert out[0].tolist() == [0, 0, 4] and out[1].tolist() == [252, 253, 191] and out[2].tolist() == [128, 128, 128]
    lg = viz.colorize(np.array([1e-3, 1e-2, 1e-1]), 1e-3, 1e-1, "viridis", log=True)
    assert lg[1].tolist() == viz.colorize(np.array([0.5]), 0.0, 1.0, "viridis")[0].tolist()
    assert viz.colorize(np.full((2, 2), 3.0)).reshape(-1, 3).tolist() == [viz.colorize(np.array([0.5]), 0, 1)[0].tolist()] * 4
    with pytest.raises(ValueError):
        viz.colorize(v, cmap="jet")


def test_colorbar_sizes_and_gradient():
    bar = viz.colorbar(200, 0.0, 1.0, "viridis", "time")
    assert isinstance(bar, Image.Image) and bar.width == 200 and 30 < bar.height < 80
    a = np.asarray(bar)
    # somewhere in the bar: the first and the last colour of the map are present
    flat = a.reshape(-1, 3).tolist()
    assert [0x44, 0x01, 0x54] in flat and [0xFD, 0xE7, 0x25] in flat
    vert = viz.colorbar(150, 1e-3, 10.0, "magma", "variance", orientation="vertical", log=True)
    assert vert.height == 150 and 20 < vert.width < 120
    assert viz._log_ticks(1e-3, 10.0, 8)[0] == pytest.approx([1e-3, 1e-2, 1e-1, 1.0, 10.0])
    assert viz._linear_ticks(0.0, 1.0, 5)[0] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert [viz._fmt(v, 0.25) for v in (0.0, 0.5, 0.75, 1.0)] == ["0", "0.5", "0.75", "1"]
    with pytest.raises(ValueError):
        viz.colorbar(100, 0.0, 1.0, log=True)


def test_patch_map_image_nearest_blocks():
    vals = torch.arange(6, dtype=torch.float32).view(2, 3)
    img = viz.patch_map_image(vals, (30, 20), vmin=0, vmax=5, cmap="coolwarm")
    assert img.size == (30, 20)
    a = np.asarray(img)
    ref = viz.colorize(vals, 0, 5, "coolwarm")
    for r in range(2):
        for c in range(3):
            assert (a[r * 10 : (r + 1) * 10, c * 10 : (c + 1) * 10] == ref[r, c]).all()
    assert viz.patch_map_image(np.zeros(16)).size == (96, 96)  # (N,) square, auto-enlarged


def test_text_falls_back_to_bitmap_font(monkeypatch):
    real = ImageFont.load_default

    def old_pillow(*args, **kwargs):
        if kwargs:
            raise TypeError("load_default() got an unexpected keyword argument 'size'")
        return ImageFont.load_default_imagefont() if hasattr(ImageFont, "load_default_imagefont") else real()

    viz._font.cache_clear()
    viz._text_mask.cache_clear()
    monkeypatch.setattr(ImageFont, "load_default", old_pillow)
    try:
        w_small, h_small = viz._text_size("step 3 · call 7", 11)
        w_big, h_big = viz._text_size("step 3 · call 7", 22)
        assert h_big >= 2 * h_small - 2 and w_big >= 2 * w_small - 2  # integer enlargement
        bar = viz.colorbar(120, 0.0, 1.0, "viridis", "t")
        assert bar.width == 120
    finally:
        monkeypatch.setattr(ImageFont, "load_default", real)
        viz._font.cache_clear()
        viz._text_mask.cache_clear()


# --------------------------------------------------------------------------------------------
# Trajectory pictures on real records
# --------------------------------------------------------------------------------------------


def test_trajectory_sheet_rows_and_png(look_ahead, tmp_path):
    rec = look_ahead.record
    n = len(rec)
    assert n == 7
    panels = viz._trajectory_panels(rec, 1, viz._select(n, 2), None, None, None)
    assert len(panels.rows) == _rows(n, 2) == 4 and all(len(r) == 5 for r in panels.rows)
    assert panels.tile == (128, 128)  # 16 px -> x8
    # the first look-ahead call (s = 0) has no mask: its mask tile is the grey "n/a" tile
    assert np.asarray(panels.rows[0][4])[0, 0].tolist() == list(viz._NA_FILL)
    assert np.asarray(panels.rows[1][4])[0, 0].tolist() in (list(viz._CERTAIN), list(viz._UNCERTAIN))
    assert "step 0 · call 0" in panels.labels[0] and "certain:" in panels.labels[1]

    heights = {}
    for every in (2, 3, 6):  # 4, 3 and 2 rows (no footer below 6 rows)
        path = tmp_path / f"sheet_{every}.png"
        img = viz.trajectory_sheet(look_ahead, image_index=1, every=every, path=path)
        assert path.exists() and Image.open(path).size == img.size
        heights[_rows(n, every)] = img.height
    pitch = 128 + viz._ROW_GAP
    assert heights[4] - heights[3] == pitch and heights[3] - heights[2] == pitch
    full = viz.trajectory_sheet(rec, every=1)  # 7 rows, with a repeated header at the bottom
    assert full.height > heights[4] + 3 * pitch
    with pytest.raises(IndexError):
        viz.trajectory_sheet(rec, image_index=5)
    with pytest.raises(ValueError):
        viz.trajectory_sheet(rec, patch_size=3)


def test_trajectory_sheet_without_masks(pft, tmp_path):
    res = _run(pft, "euler", steps=3, batch=2)  # a PFT with plain Euler: logvar but never a mask
    assert all(r.mask is None for r in res.record)
    panels = viz._trajectory_panels(res.record, 0, viz._select(3, 1), PATCH, None, None)
    assert all(np.asarray(r[4])[0, 0].tolist() == list(viz._NA_FILL) for r in panels.rows)
    assert all(np.asarray(r[3])[0, 0].tolist() != list(viz._NA_FILL) for r in panels.rows)
    path = tmp_path / "euler.png"
    viz.trajectory_sheet(res.record, patch_size=PATCH, path=path)
    assert Image.open(path).format == "PNG"

    pfres = _run(pft, "euler_pf", steps=3, batch=2)  # euler_pf records the difficulty mask
    img = viz.trajectory_sheet(pfres, image_index=1, path=tmp_path / "euler_pf.png")
    assert img.size[1] == viz.trajectory_sheet(res, image_index=1).size[1]


def test_trajectory_sheet_decode_sets_tile_size(look_ahead):
    def decode(z):  # a stand-in "VAE": 2x nearest upsampling
        return torch.nn.functional.interpolate(z, scale_factor=2, mode="nearest")

    panels = viz._trajectory_panels(look_ahead.record, 0, [0, 6], None, decode, None)
    assert panels.tile == (128, 128)  # 32 px decoded -> x4
    assert all(t.size == (128, 128) for row in panels.rows for t in row)


def test_trajectory_gif_frames(look_ahead, tmp_path):
    path = tmp_path / "gif" / "traj.gif"
    frames = viz.trajectory_gif(look_ahead.record, path, image_index=0, every=2, duration_ms=120)
    assert len(frames) == _rows(7, 2)
    assert len({f.size for f in frames}) == 1
    with Image.open(path) as gif:
        assert gif.n_frames == len(frames)
        assert gif.info.get("loop") == 0
        assert gif.info.get("duration") == 120
        gif.seek(1)
        back = np.asarray(gif.convert("RGB")).astype(int)
    ref = np.asarray(frames[1]).astype(int)
    assert back.shape == ref.shape
    assert back[0, 0].tolist() == [255, 255, 255]  # exact background (no web-palette greys)
    outside = np.ones(ref.shape[:2], dtype=bool)
    outside[:, 100:] = False  # the title and row label area: text on white, palette-exact
    assert np.abs(back - ref)[outside].mean() < 1.0


def test_uncertainty_time_figure_saves(look_ahead, pft, tmp_path):
    path = tmp_path / "overview.png"
    img = viz.uncertainty_time_figure(look_ahead.record, PATCH, path, num_images=2, num_steps=3, final=look_ahead.x)
    assert path.exists() and Image.open(path).size == img.size
    wide = viz.uncertainty_time_figure(look_ahead, num_images=3, num_steps=6)  # only 4 steps exist
    assert wide.width > img.width and wide.height > img.height

    def decode(z):  # a stand-in "VAE": 2x nearest upsampling
        return torch.nn.functional.interpolate(z, scale_factor=2, mode="nearest")

    big = viz.uncertainty_time_figure(look_ahead, num_images=2, num_steps=3, final=look_ahead.x, decode=decode, tile=128)
    assert big.width > img.width  # 32 px decoded finals -> 128 px tiles (maps follow)
    sit = pf.create_model("SiT-T/2", input_size=SIZE, in_channels=3, num_classes=4, depth=1, hidden_size=32, num_heads=2)
    res = _run(randomize(sit).eval(), "euler", steps=2, batch=1)  # no log-variance at all
    assert all(r.logvar is None for r in res.record)
    assert viz.uncertainty_time_figure(res, num_images=4).height > 0
    assert viz.trajectory_sheet(res).height > 0


def test_sampler_comparison(tmp_path):
    grids = {"euler": torch.zeros(4, 3, 16, 16), "look_ahead": torch.ones(4, 1, 16, 16)}
    path = tmp_path / "cmp.png"
    img = viz.sampler_comparison(grids, path, labels={"look_ahead": "look_ahead · 24 NFE"}, nrow=2)
    assert path.exists()
    grid_w = 2 * 64 + 3 * 2  # 16 px -> x4 = 64 px tiles
    assert img.width >= 2 * grid_w and img.height >= grid_w
    a = np.asarray(img)
    assert (a == 128).all(axis=-1).sum() >= 4 * 64 * 64  # the grey zeros of "euler" are there
    with pytest.raises(ValueError):
        viz.sampler_comparison({}, None)
