"""Tests of patchforcing.data: synthetic shapes, image folders, npz arrays, conversions, specs."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from patchforcing.data import (
    DataError,
    ImageFolderDataset,
    NpzImageDataset,
    SyntheticShapes,
    build_dataset,
    center_crop_adm,
    class_examples,
    composite_on_white,
    save_image_grid,
    scan_image_files,
    to_float,
    to_uint8,
)
from patchforcing.data.augment import hflip_flag
from patchforcing.evaluation import open_images


def _emoji_path() -> Path | None:
    env = os.environ.get("PATCHFORCING_EMOJI_NPZ")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[1].parent / "shared/datasets/emoji-google-64.npz")
    return next((p for p in candidates if p.is_file()), None)


def _patch_variances(x: torch.Tensor, p: int = 4) -> torch.Tensor:
    """(3, H, W) -> (H/p * W/p,) spatial variance inside each p x p patch, averaged over channels."""
    c, h, w = x.shape
    patches = x.reshape(c, h // p, p, w // p, p).permute(1, 3, 0, 2, 4).reshape(-1, c, p * p)
    return patches.var(dim=2).mean(dim=1)


# --------------------------------------------------------------------------- conversions
def test_uint8_float_roundtrip_exact():
    u = torch.arange(256, dtype=torch.uint8)
    x = to_float(u)
    assert x.dtype == torch.float32 and x.min() == -1.0 and x.max() == 1.0
    assert torch.equal(to_uint8(x), u)
    assert np.array_equal(to_uint8(to_float(u.numpy())), u.numpy())
    assert to_uint8(torch.tensor([-5.0, 5.0])).tolist() == [0, 255]


def test_composite_on_white():
    rgba = np.array([[[10, 20, 30, 0], [10, 20, 30, 255], [0, 0, 0, 128]]], dtype=np.uint8)
    out = composite_on_white(rgba)
    assert out.tolist() == [[[255, 255, 255], [10, 20, 30], [127, 127, 127]]]


def test_save_image_grid(tmp_path):
    x = torch.rand(5, 3, 8, 8) * 2 - 1
    grid = save_image_grid(x, tmp_path / "g" / "grid.png", nrow=3, padding=1)
    assert grid.shape == (2 * 9 + 1, 3 * 9 + 1, 3)
    img = np.asarray(Image.open(tmp_path / "g" / "grid.png"))
    assert np.array_equal(img, grid)
    assert np.array_equal(grid[1:9, 1:9], to_uint8(x[0]).permute(1, 2, 0).numpy())


# --------------------------------------------------------------------------- synthetic
def test_synthetic_basics_and_determinism():
    a = SyntheticShapes(size=32, num_classes=8, length=100, seed=0)
    b = SyntheticShapes(size=32, num_classes=8, length=100, seed=0)
    c = SyntheticShapes(size=32, num_classes=8, length=100, seed=1)
    assert (a.num_classes, a.resolution, a.channels, len(a)) == (8, 32, 3, 100)
    x, y = a[13]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int) and y == 13 % 8
    assert x.min() >= -1.0 and x.max() <= 1.0
    for i in (0, 13, 99):
        assert torch.equal(a[i][0], b[i][0])  # same (seed, index) -> same image
    # item i depends only on (seed, i), not on the length or what was read before
    longer = SyntheticShapes(size=32, num_classes=8, length=5000, seed=0)
    assert torch.equal(longer[13][0], a[13][0])
    assert torch.equal(a[-1][0], a[99][0])
    assert sum(not torch.equal(a[i][0], c[i][0]) for i in range(16)) == 16
    assert not torch.equal(a[0][0], a[8][0])  # same class, different item
    xb, yb = a.batch([3, 4, 13])
    assert torch.equal(xb[2], x) and yb.tolist() == [3, 4, 5]
    with pytest.raises(IndexError):
        a[100]


def test_synthetic_value_range_and_classes():
    ds = SyntheticShapes(size=32, num_classes=8, length=8 * 40, seed=3)
    x, y = ds.batch(range(len(ds)))
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert torch.bincount(y).tolist() == [40] * 8
    means = torch.stack([x[y == c].mean(0) for c in range(8)])  # (8, 3, 32, 32)
    dist = torch.cdist(means.flatten(1), means.flatten(1))
    off = dist[~torch.eye(8, dtype=torch.bool)]
    # class means are far apart compared with the spread inside a class
    within = torch.stack([(x[y == c] - means[c]).flatten(1).norm(dim=1).mean() for c in range(8)])
    assert off.min() > 10.0 and off.min() > 0.5 * within.mean()


def test_synthetic_heterogeneity():
    ds = SyntheticShapes(size=32, num_classes=10, length=200, seed=0)
    x, _ = ds.batch(range(200))
    for img in x:
        v = _patch_variances(img)
        assert (v < 1e-6).float().mean() >= 0.4  # large exactly-flat regions
        assert (v > 0.05).sum() >= 3  # and some high-variance detail patches
        assert v.max() > 0.15


def test_synthetic_other_sizes():
    ds = SyntheticShapes(size=64, num_classes=10, length=10)
    assert ds[9][0].shape == (3, 64, 64) and ds[9][1] == 9
    with pytest.raises(DataError):
        SyntheticShapes(num_classes=11)
    with pytest.raises(DataError):
        SyntheticShapes(size=8)


# --------------------------------------------------------------------------- image folder
def _save(path: Path, img: Image.Image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "train"
    # class "b_cats" (label 1): a 96x48 RGB PNG, red left half, blue right half
    halves = np.zeros((48, 96, 3), np.uint8)
    halves[:, :48] = (255, 0, 0)
    halves[:, 48:] = (0, 0, 255)
    _save(root / "b_cats" / "halves.png", Image.fromarray(halves))
    # a grayscale JPEG with an upper-case extension, in a nested folder
    _save(root / "b_cats" / "nested" / "gray.JPG", Image.fromarray(np.full((40, 30), 90, np.uint8), "L"))
    # class "a_dogs" (label 0): RGBA, left transparent, right opaque green; and a palette image
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[:, 10:] = (0, 255, 0, 255)
    _save(root / "a_dogs" / "alpha.png", Image.fromarray(rgba, "RGBA"))
    _save(root / "a_dogs" / "pal.gif", Image.fromarray(np.full((16, 24, 3), 200, np.uint8)).convert("P"))
    (root / "a_dogs" / "notes.txt").write_text("not an image")
    return root


def test_folder_layout_shapes_labels(folder: Path):
    ds = ImageFolderDataset(folder, resolution=16, flip=False)
    assert ds.class_names == ["a_dogs", "b_cats"] and ds.num_classes == 2
    assert (ds.resolution, ds.channels, len(ds)) == (16, 3, 4)
    names = [(Path(p).name, lab) for p, lab in ds.samples]
    assert names == [("alpha.png", 0), ("pal.gif", 0), ("halves.png", 1), ("gray.JPG", 1)]
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == ds.samples[i][1]
        assert x.min() >= -1.0 and x.max() <= 1.0
    alpha = ds[0][0]
    assert torch.allclose(alpha[:, :, :6], torch.ones(3, 16, 6))  # transparent -> white
    assert torch.allclose(alpha[:, :, 10:], torch.tensor([-1.0, 1.0, -1.0])[:, None, None].expand(3, 16, 6))
    gray = ds[3][0]
    assert torch.allclose(gray, torch.full_like(gray, 90 / 127.5 - 1), atol=2 / 127.5)


def test_folder_center_crop(folder: Path):
    ds = ImageFolderDataset(folder, resolution=16, flip=False)
    x = ds[2][0]  # 96x48 red|blue -> 32x16 (box halving stops: 16 < 2*16), crop the middle 16 columns
    assert torch.allclose(x[:, :, :7], torch.tensor([1.0, -1.0, -1.0])[:, None, None].expand(3, 16, 7), atol=0.02)
    assert torch.allclose(x[:, :, 9:], torch.tensor([-1.0, -1.0, 1.0])[:, None, None].expand(3, 16, 7), atol=0.02)
    # direct: a wide image keeps its centre, a small one is upsampled
    arr = np.zeros((10, 40, 3), np.uint8)
    arr[:, 15:25] = 255
    out = center_crop_adm(Image.fromarray(arr), 10)
    assert out.shape == (10, 10, 3) and out.min() == 255
    assert center_crop_adm(Image.fromarray(arr), 20).shape == (20, 20, 3)
    assert center_crop_adm(Image.fromarray(np.zeros((300, 200, 3), np.uint8)), 32).shape == (32, 32, 3)


def test_folder_flip_determinism(folder: Path):
    a = ImageFolderDataset(folder, resolution=16, flip=True, seed=5)
    b = ImageFolderDataset(folder, resolution=16, flip=True, seed=5)
    plain = ImageFolderDataset(folder, resolution=16, flip=False)
    for epoch in range(4):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        for i in range(len(a)):
            xa, xb = a[i][0], b[i][0]
            assert torch.equal(xa, xb)
            expect = plain[i][0].flip(-1) if hflip_flag(5, epoch, i) else plain[i][0]
            assert torch.equal(xa, expect)
    flags = [hflip_flag(0, e, i) for e in range(20) for i in range(50)]
    assert 0.4 < sum(flags) / len(flags) < 0.6
    # the halves image is flipped in some epoch and not in another
    seen = {hflip_flag(5, e, 2) for e in range(10)}
    assert seen == {True, False}


def test_folder_corrupt_file_skipped(folder: Path):
    (folder / "b_cats" / "broken.png").write_bytes(np.random.default_rng(0).bytes(300))
    ds = ImageFolderDataset(folder, resolution=16, flip=False)
    bad = next(i for i, (p, _) in enumerate(ds.samples) if p.endswith("broken.png"))
    with pytest.warns(UserWarning, match="broken.png"):
        x, y = ds[bad]
    assert x.shape == (3, 16, 16) and ds.bad_files == [ds.samples[bad][0]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per file: no second warning
        x2, y2 = ds[bad]
        others = [ds[i] for i in range(len(ds)) if i != bad]
    assert torch.equal(x, x2) and y == y2
    assert any(torch.equal(x, o[0]) and y == o[1] for o in others)  # substituted by a real item
    ds2 = ImageFolderDataset(folder, resolution=16, flip=False)
    with pytest.warns(UserWarning):
        assert torch.equal(ds2[bad][0], x)  # deterministic substitute


def test_folder_mostly_corrupt_raises(tmp_path: Path):
    root = tmp_path / "junk"
    rng = np.random.default_rng(1)
    (root / "cls").mkdir(parents=True)
    for i in range(30):  # 6 good files, 24 random-byte ones
        if i % 5 == 0:
            _save(root / "cls" / f"im{i:02d}.png", Image.new("RGB", (4, 4)))
        else:
            (root / "cls" / f"im{i:02d}.png").write_bytes(rng.bytes(200))
    ds = ImageFolderDataset(root, resolution=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match="junk"):
            for i in range(len(ds)):
                ds[i]


def test_folder_empty_and_flat(tmp_path: Path):
    with pytest.raises(DataError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nope", 8)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="empty.*class name"):
        ImageFolderDataset(empty, 8)
    (empty / "cls").mkdir()
    (empty / "cls" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no image files"):
        ImageFolderDataset(empty, 8)
    flat = tmp_path / "flat"
    for i in range(3):
        _save(flat / f"im{i}.PNG", Image.new("RGB", (12, 10), (i * 50, 0, 0)))
    ds = ImageFolderDataset(flat, 8)
    assert len(ds) == 3 and ds.num_classes == 1 and {ds[i][1] for i in range(3)} == {0}
    with pytest.raises(DataError, match="allow_flat"):
        ImageFolderDataset(flat, 8, allow_flat=False)


# --------------------------------------------------------------------------- npz
def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def test_npz_rgba_labels_and_classes(tmp_path: Path):
    imgs = np.zeros((5, 8, 8, 4), np.uint8)
    imgs[..., :3] = 30
    imgs[:, :, 4:, 3] = 255  # right half opaque, left half fully transparent
    labels = np.array([0, 2, 1, 2, 0])
    p = _npz(tmp_path / "a.npz", images=imgs, labels=labels, classes=np.array(["x", "y", "z"]))
    ds = NpzImageDataset(p, flip=False)
    assert (len(ds), ds.num_classes, ds.resolution, ds.channels) == (5, 3, 8, 3)
    assert ds.class_names == ["x", "y", "z"]
    x, y = ds[1]
    assert x.shape == (3, 8, 8) and y == 2 and x.dtype == torch.float32
    assert torch.all(x[:, :, :4] == 1.0)  # transparent -> white
    assert torch.allclose(x[:, :, 4:], torch.full((3, 8, 4), 30 / 127.5 - 1))
    assert [ds[i][1] for i in range(5)] == labels.tolist()


def test_npz_no_labels_resize_gray_and_flip(tmp_path: Path):
    imgs = np.zeros((3, 16, 16, 3), np.uint8)
    imgs[:, :, :8] = 255  # white left half
    ds = NpzImageDataset(_npz(tmp_path / "b.npz", images=imgs), resolution=8, flip=False)
    assert ds.num_classes == 1 and ds.class_names is None and [ds[i][1] for i in range(3)] == [0, 0, 0]
    x = ds[0][0]
    assert x.shape == (3, 8, 8) and torch.all(x[:, :, :4] == 1) and torch.all(x[:, :, 4:] == -1)
    up = NpzImageDataset(tmp_path / "b.npz", resolution=24, flip=False)
    assert up[0][0].shape == (3, 24, 24)
    odd = NpzImageDataset(tmp_path / "b.npz", resolution=6, flip=False)  # non-integer factor (PIL box)
    assert odd[0][0].shape == (3, 6, 6) and torch.all(odd[0][0][:, :, :2] == 1)
    gray = NpzImageDataset(_npz(tmp_path / "g.npz", images=np.full((2, 4, 4, 1), 255, np.uint8)))
    assert gray[0][0].shape == (3, 4, 4) and torch.all(gray[0][0] == 1)
    fl = NpzImageDataset(tmp_path / "b.npz", flip=True, seed=0)
    for e in range(3):
        fl.set_epoch(e)
        for i in range(3):
            left_white = bool(torch.all(fl[i][0][:, :, 0] == 1))
            assert left_white != hflip_flag(0, e, i)


def test_npz_adm_layout_arr_0_images_arr_1_labels(tmp_path: Path):
    imgs = np.random.default_rng(0).integers(0, 256, size=(4, 8, 8, 3), dtype=np.uint8)
    adm = NpzImageDataset(_npz(tmp_path / "adm.npz", arr_0=imgs, arr_1=np.array([2, 0, 1, 2])), flip=False)
    assert adm.labels.tolist() == [2, 0, 1, 2] and adm.num_classes == 3 and np.array_equal(adm.images, imgs)
    bare = NpzImageDataset(_npz(tmp_path / "bare.npz", arr_0=imgs), flip=False)  # images only: one class
    assert bare.labels.tolist() == [0, 0, 0, 0] and np.array_equal(bare.images, imgs)
    # named arrays win over the ADM fallback; an explicit key is never replaced
    both = _npz(tmp_path / "both.npz", images=imgs[:2], labels=np.array([1, 1]), arr_0=imgs, arr_1=np.zeros(4, int))
    assert NpzImageDataset(both, flip=False).labels.tolist() == [1, 1]
    with pytest.raises(DataError, match="no array 'pixels'"):
        NpzImageDataset(tmp_path / "adm.npz", key="pixels")


def test_npz_errors(tmp_path: Path):
    p = _npz(tmp_path / "obj.npz", images=np.zeros((2, 4, 4, 3), np.uint8), labels=np.array([1, "a"], dtype=object))
    with pytest.raises(DataError, match="pickle"):
        NpzImageDataset(p)
    with pytest.raises(DataError, match="no array 'pixels'"):
        NpzImageDataset(_npz(tmp_path / "k.npz", images=np.zeros((1, 4, 4, 3), np.uint8)), key="pixels")
    with pytest.raises(DataError, match="uint8"):
        NpzImageDataset(_npz(tmp_path / "f.npz", images=np.zeros((1, 4, 4, 3), np.float32)))
    with pytest.raises(DataError, match="NHWC"):
        NpzImageDataset(_npz(tmp_path / "c.npz", images=np.zeros((1, 4, 4, 2), np.uint8)))
    with pytest.raises(DataError, match="does not exist"):
        NpzImageDataset(tmp_path / "missing.npz")
    (tmp_path / "garbage.npz").write_bytes(b"not a zip at all")
    with pytest.raises(DataError, match="garbage"):
        NpzImageDataset(tmp_path / "garbage.npz")


@pytest.mark.skipif(_emoji_path() is None, reason="emoji-google-64.npz not available")
def test_emoji_npz():
    ds = NpzImageDataset(_emoji_path(), resolution=32, flip=True)
    assert len(ds) == 3781 and ds.num_classes == 9 and len(ds.class_names) == 9
    assert ds.class_names[6] == "Smileys & Emotion"
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and x.min() >= -1 and x.max() <= 1 and 0 <= y < 9
    assert ds.images.shape == (3781, 32, 32, 3) and ds.images.dtype == np.uint8
    corners = torch.from_numpy(ds.images[:, 0, 0].astype(np.float32))
    assert (corners == 255).all(dim=1).float().mean() > 0.8  # transparent background -> white
    assert np.bincount(ds.labels).tolist()[5] == 2261


# --------------------------------------------------------------------------- build_dataset / preview
def test_build_dataset(tmp_path: Path, folder: Path):
    ds = build_dataset({"kind": "synthetic", "resolution": 32, "num_classes": 4, "length": 20, "seed": 2, "flip": True})
    assert isinstance(ds, SyntheticShapes) and (ds.num_classes, ds.resolution, len(ds)) == (4, 32, 20)
    fd = build_dataset({"kind": "folder", "path": str(folder), "resolution": 8, "flip": False})
    assert isinstance(fd, ImageFolderDataset) and fd.num_classes == 2 and fd[0][0].shape == (3, 8, 8)
    p = _npz(tmp_path / "n.npz", images=np.zeros((2, 8, 8, 3), np.uint8), labels=np.array([0, 1]))
    nd = build_dataset({"kind": "npz", "path": p, "resolution": 4, "num_classes": 5})
    assert isinstance(nd, NpzImageDataset) and nd.num_classes == 2 and nd.resolution == 4
    for bad, msg in [
        ({"kind": "lmdb", "path": "x"}, "unknown dataset kind"),
        ({"path": "x"}, "no 'kind'"),
        ({"kind": "npz"}, "needs a 'path'"),
        ({"kind": "folder", "path": str(folder)}, "resolution"),
        ({"kind": "synthetic", "lenght": 3}, "unknown key"),
        ({"kind": "synthetic", "path": "/data"}, "no path"),
        ({"kind": "npz", "path": p, "num_classes": 1}, "2 classes"),
    ]:
        with pytest.raises(DataError, match=msg):
            build_dataset(bad)


def test_class_examples():
    ds = SyntheticShapes(num_classes=3, length=30)
    x, y = class_examples(ds, per_class=4)
    assert x.shape == (12, 3, 32, 32) and y.tolist() == [0] * 4 + [1] * 4 + [2] * 4


def test_scan_image_files_is_the_one_scanner_of_datasets_and_evaluation(tmp_path: Path):
    img = Image.new("RGB", (4, 4), (10, 20, 30))
    for rel in ["b/2.PNG", "b/1.jpg", "a/x/deep.jpeg", "a/top.png", "a/.hidden.png", ".cache/c.png", "a/notes.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".txt"):
            (tmp_path / rel).write_text("not an image")
        else:
            img.save(tmp_path / rel, format="PNG" if rel.lower().endswith("png") else "JPEG")
    want = [str(tmp_path / r) for r in ["a/top.png", "a/x/deep.jpeg", "b/1.jpg", "b/2.PNG"]]
    assert scan_image_files(tmp_path) == want
    assert scan_image_files(tmp_path / "a", recursive=False) == [str(tmp_path / "a/top.png")]
    assert scan_image_files(tmp_path, exts=(".jpg",)) == [str(tmp_path / "b/1.jpg")]
    # the same files, in the same order, for training (per class) and for evaluation (the whole folder)
    ds = ImageFolderDataset(tmp_path, 4, flip=False)
    assert [p for p, _ in ds.samples] == want and ds.class_names == ["a", "b"]
    assert open_images(tmp_path)._files == want


def test_data_argument_kind(tmp_path):
    from patchforcing.data import data_argument_kind

    store = tmp_path / "store"
    store.mkdir()
    (store / "index.json").write_text("{}")
    folder = tmp_path / "imgs"
    folder.mkdir()
    cases = {
        "synthetic": "synthetic",
        "Shapes": "synthetic",
        str(store): "latents",
        str(folder): "folder",
        "x.npz": "npz",
        "x.NPY": "npz",
        "emoji32-pft": "config",
        "cfg/run.yaml": "config",
        "some/dir": "unknown",
    }
    assert {k: data_argument_kind(k) for k in cases} == cases
