"""Pictures: grid arithmetic, conversions, colour maps, the trajectory figures on real records, charts."""

from __future__ import annotations

import dataclasses

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image

import patchforcing as pf
from conftest import randomize
from patchforcing import viz
from patchforcing.viz import maps as vmaps
from patchforcing.viz import prompts as vprompts
from patchforcing.viz import trajectory as vt
from patchforcing.viz.style import DEFAULT_STYLE, render
from patchforcing.viz.trajectory import ROW_GAP

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
    assert np.array_equal(viz.to_uint8_images(torch.from_numpy(u8)), u8)  # a uint8 tensor reads as uint8
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


def _count(img: Image.Image, color) -> int:
    """Pixels of exactly ``color`` (a hex string or an RGB triple)."""
    rgb = [int(color[i : i + 2], 16) for i in (1, 3, 5)] if isinstance(color, str) else list(color)
    return int((np.asarray(img.convert("RGB")) == rgb).all(axis=-1).sum())


@pytest.mark.parametrize("cmap", sorted(viz.CMAPS))
def test_colorize_is_what_matplotlib_draws(cmap):
    cm = matplotlib.colormaps[cmap]
    first, last = cm(0.0, bytes=True)[:3], cm(1.0, bytes=True)[:3]
    out = viz.colorize(torch.tensor([[0.0, 1.0], [-5.0, 9.0]]), vmin=0.0, vmax=1.0, cmap=cmap)
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    assert out[0, 0].tolist() == list(first) and out[1, 0].tolist() == list(first)  # clipped below
    assert out[0, 1].tolist() == list(last) and out[1, 1].tolist() == list(last)
    ramp = np.linspace(0.0, 1.0, 11)
    assert np.array_equal(viz.colorize(ramp, 0.0, 1.0, cmap), cm(ramp, bytes=True)[:, :3])


def test_colorize_defaults_log_nan_and_constant():
    v = np.array([2.0, 4.0, np.nan])
    out = viz.colorize(v, cmap="magma")  # default limits = data min / max
    assert out[0].tolist() == [0, 0, 3] and out[1].tolist() == [251, 252, 191] and out[2].tolist() == [128, 128, 128]
    lg = viz.colorize(np.array([1e-3, 1e-2, 1e-1, -1.0]), 1e-3, 1e-1, "viridis", log=True)
    assert lg[1].tolist() == viz.colorize(np.array([0.5]), 0.0, 1.0, "viridis")[0].tolist()
    assert lg[3].tolist() == [128, 128, 128]  # non-positive on a log scale: missing
    mid = viz.colorize(np.array([0.5]), 0, 1)[0].tolist()
    assert viz.colorize(np.full((2, 2), 3.0)).reshape(-1, 3).tolist() == [mid] * 4
    with pytest.raises(ValueError, match="unknown colormap"):
        viz.colorize(v, cmap="nosuchmap")
    with pytest.raises(ValueError, match="log scale"):
        viz.colorize(v, 0.0, 1.0, log=True)


def test_colorbar_sizes_and_gradient():
    bar = viz.colorbar(200, 0.0, 1.0, "viridis", "time")
    assert isinstance(bar, Image.Image) and bar.width == 200 and 30 < bar.height < 80
    cm = matplotlib.colormaps["viridis"]
    a = np.asarray(bar).reshape(-1, 3).astype(int)
    for end in (0.0, 1.0):  # both ends of the map are drawn (to within rounding of the bar's cells)
        assert (np.abs(a - np.array(cm(end, bytes=True)[:3], int)).max(axis=1) <= 4).sum() >= 10
    vert = viz.colorbar(150, 1e-3, 10.0, "magma", "variance", orientation="vertical", log=True)
    assert vert.height == 150 and 20 < vert.width < 120
    with pytest.raises(ValueError):
        viz.colorbar(100, 0.0, 1.0, log=True)
    with pytest.raises(ValueError):
        viz.colorbar(10, 0.0, 1.0)


def test_log_axis_ticks():
    from matplotlib.figure import Figure

    from patchforcing.viz.style import log_axis

    ax = Figure().add_subplot()
    ax.set_xscale("log")
    log_axis(ax.xaxis, 0.6, 1.05)  # under a decade: round values, equal decimals
    assert ax.xaxis.get_major_locator().tick_values(0.6, 1.05).tolist() == pytest.approx([0.6, 0.7, 0.8, 0.9, 1.0])
    assert ax.xaxis.get_major_formatter()(0.7, 0) == "0.7" and ax.xaxis.get_major_formatter()(1.0, 0) == "1.0"
    log_axis(ax.xaxis, 1e-3, 10.0)
    assert [ax.xaxis.get_major_formatter()(v, 0) for v in (1e-3, 1.0, 10.0)] == ["0.001", "1", "10"]


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


def test_style_is_explicit_and_restored():
    rc_before = dict(matplotlib.rcParams)
    s = viz.Style(uncertain="#ff0000", rc={"font.size": 14})
    mask = np.array([[True, False], [False, True]])
    run = vt._Run(
        ["a"],
        np.zeros((1, 16, 16, 3), np.uint8),
        np.zeros((1, 16, 16, 3), np.uint8),
        [np.zeros((2, 2))],
        [None],
        [mask],
        None,
        (64, 64),
    )
    with s.context():
        img = render(vt.sheet_figure(run, [0], s, title=None, subtitle=None))
    assert _count(img, "#ff0000") >= 2 * 28 * 28  # two uncertain cells (>= 32x32 px) of the mask tile
    assert _count(render(vt.sheet_figure(run, [0], viz.DEFAULT_STYLE, title=None, subtitle=None)), "#ff0000") == 0
    assert dict(matplotlib.rcParams) == rc_before  # no global state changed
    with pytest.raises(dataclasses.FrozenInstanceError):
        viz.DEFAULT_STYLE.dpi = 50  # frozen


# --------------------------------------------------------------------------------------------
# Trajectory pictures on real records
# --------------------------------------------------------------------------------------------


def test_trajectory_sheet_rows_and_png(look_ahead, tmp_path):
    rec = look_ahead.record
    n = len(rec)
    assert n == 7
    run = vt._run(rec, 1, vt.select(n, 2), None, None, None)
    assert len(run.labels) == len(run.masks) == _rows(n, 2) == 4
    assert run.tile == (128, 128)  # 16 px -> x8
    assert run.masks[0] is None and run.masks[1].shape == (8, 8)  # the first look-ahead call (s = 0) has no mask
    assert "step 0 · call 0" in run.labels[0] and "certain:" in run.labels[1]
    assert np.array_equal(run.states[2], viz.to_uint8_images(rec[4].x[1])[0])
    assert np.array_equal(run.times[1], rec[2].t[1].double().view(8, 8).numpy())

    st = viz.DEFAULT_STYLE
    heights = {}
    for every in (2, 3, 6):  # 4, 3 and 2 rows (no footer below 6 rows)
        path = tmp_path / f"sheet_{every}.png"
        img = viz.trajectory_sheet(look_ahead, image_index=1, every=every, path=path)
        with Image.open(path) as back:
            assert back.size == img.size and np.array_equal(np.asarray(back.convert("RGB")), np.asarray(img))
        heights[_rows(n, every)] = img.height
    pitch = 128 + ROW_GAP
    assert heights[4] - heights[3] == pitch and heights[3] - heights[2] == pitch
    fig = vt.sheet_figure(run, list(range(4)), st, title="T", subtitle="S")
    titles = [ax.get_title().split("\n")[0] for ax in fig.axes if ax.get_title()]
    assert titles == list(vt.HEADERS)  # every column header, once (no footer below 6 rows)
    bars = [ax for ax in fig.axes if hasattr(ax, "_colorbar")]
    assert [ax.get_title().split("\n")[1] for ax in bars] == ["0 = noise, 1 = data", "variance (log scale)"]
    assert bars[1]._colorbar.norm.vmin == run.limits[0] and bars[1]._colorbar.norm.vmax == run.limits[1]
    assert [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()] == [
        "certain", "uncertain", "n/a: no mask"
    ]  # fmt: skip
    tiles = [ax for ax in fig.axes if ax.get_images() or any(t.get_text() == "n/a" for t in ax.texts)]
    assert len(tiles) == 4 * 5
    assert np.array_equal(tiles[2 * 5].get_images()[0].get_array(), run.states[2])  # row 2: state, then clean
    assert np.array_equal(tiles[1 * 5 + 2].get_images()[0].get_array(), run.times[1])
    assert not tiles[4].get_images() and tiles[9].get_images()  # call 0 has no mask: an n/a tile
    assert [t.get_text() for ax in fig.axes for t in ax.texts if t.get_text().startswith("step")] == run.labels
    img = viz.trajectory_sheet(look_ahead, image_index=1, every=2)
    # one "n/a" mask tile (call 0, plus the legend swatch), masks on the other three rows
    assert 126 * 126 - 2000 < _count(img, st.na_fill) < 150 * 150
    masks = run.masks[1:]
    cells = sum(int(m.sum()) for m in masks), sum(int((~m).sum()) for m in masks)
    assert _count(img, st.certain) >= cells[0] * 14 * 14 and _count(img, st.uncertain) >= cells[1] * 14 * 14
    full = viz.trajectory_sheet(rec, every=1)  # 7 rows, with a repeated header at the bottom
    assert full.height > heights[4] + 3 * pitch + 40
    with pytest.raises(IndexError):
        viz.trajectory_sheet(rec, image_index=5)
    with pytest.raises(ValueError):
        viz.trajectory_sheet(rec, patch_size=3)


def test_trajectory_sheet_without_masks(pft, tmp_path):
    res = _run(pft, "euler", steps=3, batch=2)  # a PFT with plain Euler: logvar but never a mask
    assert all(r.mask is None for r in res.record)
    run = vt._run(res.record, 0, vt.select(3, 1), PATCH, None, None)
    assert all(m is None for m in run.masks) and all(v is not None for v in run.variances)
    img = viz.trajectory_sheet(res.record, patch_size=PATCH, path=tmp_path / "euler.png")
    assert Image.open(tmp_path / "euler.png").format == "PNG"
    assert _count(img, viz.DEFAULT_STYLE.na_fill) > 3 * (126 * 126 - 2000)  # three n/a mask tiles

    pfres = _run(pft, "euler_pf", steps=3, batch=2)  # euler_pf records the difficulty mask
    img = viz.trajectory_sheet(pfres, image_index=1, path=tmp_path / "euler_pf.png")
    assert img.size[1] == viz.trajectory_sheet(res, image_index=1).size[1]


def test_trajectory_sheet_of_a_token_cached_run(pft, tmp_path):
    """A cached run's last column shows the tokens each call kept (True) / recomputed (False): full
    calls recompute all, partial calls exactly the n = ceil(active * N) most uncertain ones."""
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 3, SIZE, SIZE, generator=g)
    cache = pf.TokenCache(active=0.25, refresh_every=3)
    res = pf.sample(pft, noise, "euler_pf", steps=5, y=torch.arange(2), record=True, cache=cache)
    n_tokens = (SIZE // PATCH) ** 2
    n_active = -(-n_tokens // 4)
    run = vt._run(res.record, 1, vt.select(5, 1), PATCH, None, None)
    assert run.cached
    for k, (r, m, label) in enumerate(zip(res.record, run.masks, run.labels)):
        if k % 3 == 0:  # full calls: calls 0 and 3
            assert r.active is None and not m.any() and "full call" in label
        else:
            assert int((~m).sum()) == n_active and "recomputed: 25%" in label
            assert np.array_equal(~m.reshape(-1), r.active[1].numpy())
    viz.trajectory_sheet(res, image_index=1, path=tmp_path / "cached.png")
    assert Image.open(tmp_path / "cached.png").format == "PNG"
    dense = _run(pft, "euler_pf", steps=3, batch=2)
    assert not vt._run(dense.record, 0, vt.select(3, 1), PATCH, None, None).cached


def test_trajectory_sheet_decode_sets_tile_size(look_ahead):
    def decode(z):  # a stand-in "VAE": 2x nearest upsampling
        return torch.nn.functional.interpolate(z, scale_factor=2, mode="nearest")

    run = vt._run(look_ahead.record, 0, [0, 6], None, decode, None)
    assert run.tile == (128, 128)  # 32 px decoded -> x4
    assert run.states.shape == (2, 32, 32, 3) and run.times[0].shape == (8, 8)  # maps stay on the patch grid


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
    assert back[0, 0].tolist() == [255, 255, 255]  # exact background
    assert np.abs(back - ref)[:, :100].mean() < 1.0  # title and row labels: text on white, palette-exact
    assert np.abs(back - ref).mean() < 4.0  # one shared palette for all frames


def test_uncertainty_time_figure_saves(look_ahead, tmp_path):
    path = tmp_path / "overview.png"
    img = viz.uncertainty_time_figure(look_ahead.record, PATCH, path, num_images=2, num_steps=3, final=look_ahead.x)
    assert path.exists() and Image.open(path).size == img.size
    fig = vmaps.overview_figure(look_ahead.record, PATCH, 2, 3, final=look_ahead.x, row_labels=["a", "b"])
    titles = [ax.get_title() for ax in fig.axes if ax.get_title().strip()]
    assert titles[:3] == ["step 0 · s = 0.00", "uncertainty", "time t"] and titles[-1] == "final sample"
    assert sum(t.startswith("step") for t in titles) == 3 and titles.count("uncertainty") == 3
    finals = [
        ax.get_images()[0].get_array()
        for ax in fig.axes
        if ax.get_images() and ax.get_images()[0].get_array().ndim == 3
    ]
    assert len(finals) == 2 and np.array_equal(finals[1], viz.to_uint8_images(look_ahead.x[1:2])[0])
    labels = sorted(ax._colorbar.ax.get_xlabel() for ax in fig.axes if hasattr(ax, "_colorbar"))
    assert labels == ["per-patch time t (0 = noise, 1 = data)", "uncertainty: variance per patch (log scale)"]
    assert [t.get_text() for ax in fig.axes for t in ax.texts] == ["a", "b"]
    wide = viz.uncertainty_time_figure(look_ahead, num_images=3, num_steps=6)  # only 4 steps exist
    assert wide.width > img.width and wide.height > img.height

    def decode(z):  # a stand-in "VAE": 2x nearest upsampling
        return torch.nn.functional.interpolate(z, scale_factor=2, mode="nearest")

    big = viz.uncertainty_time_figure(
        look_ahead, num_images=2, num_steps=3, final=look_ahead.x, decode=decode, tile=128
    )
    assert big.width > img.width  # 32 px decoded finals -> 128 px tiles (maps follow)
    sit = pf.create_model(
        "SiT-T/2", input_size=SIZE, in_channels=3, num_classes=4, depth=1, hidden_size=32, num_heads=2
    )
    res = _run(randomize(sit).eval(), "euler", steps=2, batch=1)  # no log-variance at all: n/a tiles
    assert all(r.logvar is None for r in res.record)
    ov = viz.uncertainty_time_figure(res, num_images=4)
    assert _count(ov, viz.DEFAULT_STYLE.na_fill) > 2 * (94 * 94 - 2000)
    assert _count(viz.trajectory_sheet(res), viz.DEFAULT_STYLE.na_fill) > 2 * 2 * (126 * 126 - 2000)


def test_sampler_comparison(tmp_path):
    grids = {"euler": torch.zeros(4, 3, 16, 16), "look_ahead": torch.ones(4, 1, 16, 16)}
    path = tmp_path / "cmp.png"
    img = viz.sampler_comparison(grids, path, labels={"look_ahead": "look_ahead · 24 NFE"}, nrow=2)
    assert path.exists()
    grid_w = 2 * 64 + 3 * 2  # 16 px -> x4 = 64 px tiles
    assert img.width >= 2 * grid_w and img.height >= grid_w
    assert 0.8 * 4 * 64 * 64 <= _count(img, (128, 128, 128)) < 1.5 * 4 * 64 * 64  # the grey zeros of "euler"
    with pytest.raises(ValueError):
        viz.sampler_comparison({}, None)


@pytest.mark.parametrize("cols", [1, 2])
def test_prompt_grid_texts_stay_inside_narrow_figures(cols):
    """A title and subtitle much wider than a 1- or 2-column grid (and a long caption) are drawn
    inside the figure (widened to TITLE_WIDTH, then wrapped), with every word kept."""
    title = "Prompt grid of t2i-tiny: euler_pf sampler, 32 steps, guidance 4.0, seed 0, checkpoint 4000"
    subtitle = "run_2026_with_a_long_unbreakable_name_that_cannot_wrap_at_spaces_xxxxxxxxxxxxxxxxxxxx"
    prompts = ["a red apple on a wooden table in the soft morning light", "cat"]
    images = torch.linspace(-1, 1, 2 * cols * 3 * 8 * 8).view(2 * cols, 3, 8, 8)
    with DEFAULT_STYLE.context():
        fig = vprompts._prompt_figure(images, prompts, title, subtitle, None, 64, None, DEFAULT_STYLE)
        FigureCanvasAgg(fig).draw()  # as render() draws it; fig.canvas is now that canvas
        renderer = fig.canvas.get_renderer()
        frame = fig.bbox
        heads = [t for f in (fig, *fig.subfigs) for t in f.texts]
        assert [" ".join(t.get_text().split()) for t in heads[:1]] == [title]  # wrapped at spaces only
        assert heads[1].get_text().replace("\n", "") == subtitle  # the long word broken, nothing lost
        labels = [ax.xaxis.label for ax in fig.get_axes()]
        for t in heads + labels:
            box = t.get_window_extent(renderer)
            assert frame.x0 <= box.x0 and box.x1 <= frame.x1, (t.get_text(), box, frame)
            if t in heads:
                assert frame.y0 <= box.y0 and box.y1 <= frame.y1, (t.get_text(), box, frame)
        assert "\n" in heads[0].get_text() and frame.width == vprompts.TITLE_WIDTH  # widened, then wrapped
        assert labels[0].get_text().count("\n") == 1 and labels[1].get_text() == "cat"
    img = viz.prompt_grid(images, prompts, title=title, subtitle=subtitle)
    assert img.size == (vprompts.TITLE_WIDTH, round(frame.height))


def test_prompt_grid_short_title_keeps_the_grid_width():
    images = torch.zeros(4, 3, 8, 8)
    img = viz.prompt_grid(images, ["a", "b"], title="t")  # 2 columns of 64 px tiles: 2 * 64 + 3 * 2 + 20
    assert img.size[0] == 154
    wide = np.asarray(viz.prompt_grid(images, ["a", "b"], title="a title wider than the grid of two tiles"))
    assert wide.shape[1] == vprompts.TITLE_WIDTH  # widened to fit the title
    grey = (wide == 128).all(-1)  # the zero tiles
    cols = np.flatnonzero(grey[grey.sum(1).argmax()])
    # the rows padded with white, not stretched: two 64 px tiles drawn 1:1, centred
    assert len(cols) == 128 and abs((cols[0] + cols[-1] + 1) / 2 - wide.shape[1] / 2) <= 1


# --------------------------------------------------------------------------------------------
# Charts
# --------------------------------------------------------------------------------------------


def test_charts_sizes_colours_and_errors(tmp_path):
    s = [
        viz.Series([0, 1, 2], [1.0, float("nan"), 3.0], "a", viz.COLORS[0]),
        viz.Series([0, 1, 2], [2.0, 2.5, 2.0], "b", "#ff0000", "x", None),
    ]
    img = viz.line_chart(s, title="T", xlabel="x", ylabel="y", size=(500, 360), path=tmp_path / "l.png")
    assert img.size == (500, 360) and Image.open(tmp_path / "l.png").size == (500, 360)
    assert _count(img, "#ff0000") > 20  # the red x markers are drawn
    with pytest.raises(ValueError, match="marker"):
        viz.line_chart([viz.Series([0], [0], "a", marker="*")], title="T", xlabel="x", ylabel="y")
    with pytest.raises(ValueError, match="no series"):
        viz.line_chart([], title="T", xlabel="x", ylabel="y")
    sc = viz.scatter_density(
        np.exp(np.arange(50) / 10),
        np.exp(np.arange(50) / 12),
        title="S",
        xlabel="x",
        ylabel="y",
        diagonal="y = x",
        notes=["R = 1"],
        size=(400, 400),
    )
    assert sc.size == (400, 400)
    with pytest.raises(ValueError, match="differ"):
        viz.scatter_density([1, 2], [1], title="S", xlabel="x", ylabel="y")
    h = viz.histogram_chart(
        np.logspace(-2, 0, 5),
        {"a": [1, 2, 3, 4]},
        title="H",
        xlabel="x",
        ylabel="y",
        colors=[(0, 200, 0)],
        vlines=[(0.1, "median")],
        size=(420, 300),
    )
    assert h.size == (420, 300) and _count(h, (0, 200, 0)) > 100  # the outline of the steps
    with pytest.raises(ValueError, match="bins"):
        viz.histogram_chart([1, 2, 3], {"a": [1]}, title="H", xlabel="x", ylabel="y")
    both = viz.hstack([img, h], gap=10)
    assert both.size == (500 + 10 + 420, 360) and np.array_equal(np.asarray(both)[:300, 510:], np.asarray(h))
