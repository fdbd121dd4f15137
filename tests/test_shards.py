"""WebDataset tar shards: every sample exactly once over 2 ranks x 2 DataLoader workers, the image
folders' decoding and crop, per-epoch order, bad samples, captions from txt/json."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

pytest.importorskip("webdataset")

from patchforcing.data import DataError, ImageFolderDataset, ShardDataset, build_captioned_dataset  # noqa: E402
from patchforcing.data.shards import split_shards  # noqa: E402


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _image(rng: np.random.Generator, k: int) -> np.ndarray:
    shapes = [(20, 24, 3), (24, 20, 3), (18, 18, 4), (33, 17, 3)]  # landscape, portrait, RGBA, odd
    return rng.integers(0, 256, shapes[k % len(shapes)], dtype=np.uint8)


def _shards(root: Path, sizes: list[int], folder: Path | None = None) -> list[str]:
    """Shards ``root/shard-SS.tar`` of ``sizes[s]`` samples, caption ``"caption S I"``; the same
    images also written to ``folder`` (flat) when given."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for s, n in enumerate(sizes):
        path = root / f"shard-{s:02d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(n):
                arr = _image(rng, s + i)
                key = f"{s:02d}_{i:03d}"
                _add(tar, f"{key}.png", _png(arr))
                _add(tar, f"{key}.txt", f" caption {s} {i}\n".encode())
                if folder is not None:
                    folder.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(arr).save(folder / f"{key}.png")
        paths.append(str(path))
    return paths


def _all(sizes: list[int]) -> set[str]:
    return {f"caption {s} {i}" for s, n in enumerate(sizes) for i in range(n)}


def _read(ds: ShardDataset, workers: int) -> list[str]:
    loader = DataLoader(ds, batch_size=None, num_workers=workers)
    return [caption for _, caption in loader]


@pytest.mark.parametrize("sizes", [[3, 4, 2, 5, 1], [6, 5]], ids=["shard-split", "sample-split"])
def test_two_ranks_two_workers_yield_each_sample_exactly_once(tmp_path, sizes):
    paths = _shards(tmp_path / "shards", sizes)
    for epoch in (0, 1):
        per_rank = []
        for rank in (0, 1):
            ds = ShardDataset(paths, 16, seed=3, rank=rank, world_size=2)
            ds.set_epoch(epoch)
            per_rank.append(_read(ds, workers=2))
        both = per_rank[0] + per_rank[1]
        assert Counter(both) == Counter(_all(sizes))  # every sample once: no duplicate, none missing
        assert per_rank[0] and per_rank[1]  # nobody idle


def test_split_rule():
    assert split_shards(5, 1, 4) == ([1], 1) and split_shards(5, 0, 4) == ([0, 4], 1)
    assert split_shards(2, 3, 4) == ([0, 1], 4)  # fewer shards than readers: every shard, every 4th sample
    with pytest.raises(ValueError):
        split_shards(2, 4, 4)


def test_epoch_order_is_shared_by_ranks_and_changes_between_epochs(tmp_path):
    paths = _shards(tmp_path / "shards", [1] * 8)
    a, b = ShardDataset(paths, 8, seed=5, rank=0, world_size=2), ShardDataset(paths, 8, seed=5, rank=1, world_size=2)
    assert a.shard_order() == b.shard_order()
    orders = {tuple(a.shard_order(e)) for e in range(4)}
    assert len(orders) > 1 and all(sorted(o) == sorted(paths) for o in orders)
    assert ShardDataset(paths, 8, shuffle=False).shard_order(3) == paths
    # a shuffle buffer reorders the samples, keeps the set
    plain = [c for _, c in ShardDataset(paths, 8, shuffle=False)]
    mixed = [c for _, c in ShardDataset(paths, 8, shuffle=False, shuffle_buffer=4, seed=1)]
    assert sorted(plain) == sorted(mixed) and plain != mixed


def test_images_are_decoded_and_cropped_like_image_folders(tmp_path):
    sizes = [4, 3]
    paths = _shards(tmp_path / "shards", sizes, folder=tmp_path / "folder")
    folder = ImageFolderDataset(tmp_path / "folder", 16, flip=False)
    by_key = {Path(p).stem: folder[i][0] for i, (p, _) in enumerate(folder.samples)}
    items = list(ShardDataset(paths, 16, shuffle=False))
    assert [c for _, c in items] == [f"caption {s} {i}" for s, n in enumerate(sizes) for i in range(n)]  # stripped
    for x, caption in items:
        s, i = (int(v) for v in caption.split()[1:])
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32
        assert torch.equal(x, by_key[f"{s:02d}_{i:03d}"])


def test_flips_are_fixed_per_epoch_and_key(tmp_path):
    paths = _shards(tmp_path / "shards", [6])
    plain = {c: x for x, c in ShardDataset(paths, 16, shuffle=False)}
    flipped = {c: x for x, c in ShardDataset(paths, 16, shuffle=False, flip=True, seed=2)}
    again = {c: x for x, c in ShardDataset(paths, 16, shuffle=False, flip=True, seed=2)}
    mirrored = {
        c for c in plain if torch.equal(flipped[c], plain[c].flip(-1)) and not torch.equal(flipped[c], plain[c])
    }
    assert 0 < len(mirrored) < 6
    assert all(torch.equal(flipped[c], again[c]) for c in plain)


def test_bad_samples_are_skipped_with_a_warning_or_raise(tmp_path):
    path = tmp_path / "bad.tar"
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w") as tar:
        _add(tar, "a.png", _png(_image(rng, 0)))
        _add(tar, "a.txt", b"good one")
        _add(tar, "b.png", b"this is not a png")
        _add(tar, "b.txt", b"broken image")
        _add(tar, "c.png", _png(_image(rng, 1)))  # no caption
        _add(tar, "d.jpg", _png(_image(rng, 2)))  # a png named .jpg decodes all the same
        _add(tar, "d.json", json.dumps({"caption": "from json"}).encode())
    with pytest.warns(UserWarning, match="skipping a bad shard or sample"):
        items = list(ShardDataset([str(path)], 8))
    assert [c for _, c in items] == ["good one", "from json"]
    with pytest.raises(DataError, match="bad WebDataset shard or sample"):
        list(ShardDataset([str(path)], 8, handler="raise"))
    assert list(ShardDataset([str(path)], 8).iter_captions()) == ["good one", "broken image", "from json"]


def test_paths_patterns_directories_and_errors(tmp_path):
    paths = _shards(tmp_path / "shards", [2, 2, 1])
    pattern = str(tmp_path / "shards" / "shard-{00..02}.tar")
    assert ShardDataset(pattern, 8).shards == paths
    assert ShardDataset(tmp_path / "shards", 8).shards == paths  # a directory: its .tar files
    ds = build_captioned_dataset({"kind": "shards", "path": pattern, "resolution": 8, "shuffle": False})
    assert isinstance(ds, ShardDataset) and len(list(ds)) == 5
    with pytest.raises(DataError, match="1 of 4 shards do not exist .*shard-03.tar"):
        ShardDataset(str(tmp_path / "shards" / "shard-{00..03}.tar"), 8)
    with pytest.raises(DataError, match="has no .tar files"):
        ShardDataset(tmp_path, 8)
    with pytest.raises(DataError, match="rank 2 is not in"):
        ShardDataset(paths, 8, rank=2, world_size=2)


def test_rank_comes_from_torchrun_environment(tmp_path, monkeypatch):
    paths = _shards(tmp_path / "shards", [1, 1, 1, 1])
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    got = [c for _, c in ShardDataset(paths, 8, shuffle=False)]
    assert got == ["caption 1 0", "caption 3 0"]
