"""Sampling at scale: per-index determinism, sharding across ranks, resume, ADM npz output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import patchforcing as pf
from patchforcing.sampling import generate as gen
from patchforcing.sampling.generate import GenerationSpec, generate, sample_labels, sample_noise

ROOT = Path(__file__).resolve().parents[1]


def test_noise_and_labels_depend_only_on_seed_and_index():
    a = sample_noise(3, [0, 1, 2, 7], (2, 4, 4))
    b = sample_noise(3, [7, 2], (2, 4, 4))
    assert torch.equal(a[3], b[0]) and torch.equal(a[2], b[1])
    assert not torch.equal(a[0], sample_noise(4, [0], (2, 4, 4))[0])
    spec = GenerationSpec(num_samples=100, seed=3)
    la = sample_labels(spec, range(100), 10)
    assert torch.equal(la[50:], sample_labels(spec, range(50, 100), 10))
    assert len(la.unique()) == 10 and la.min() >= 0 and la.max() < 10
    assert sample_labels(GenerationSpec(num_samples=5, labels="balanced"), range(5), 3).tolist() == [0, 1, 2, 0, 1]
    assert sample_labels(GenerationSpec(num_samples=5, classes=[7, 9]), range(5), 10).tolist() == [7, 9, 7, 9, 7]
    assert sample_labels(spec, range(3), 0) is None
    with pytest.raises(ValueError, match="outside"):
        sample_labels(GenerationSpec(num_samples=5, classes=[12]), range(5), 10)


def _run(model, out, **kw):
    spec = GenerationSpec(num_samples=kw.pop("n", 11), sampler=kw.pop("sampler", "look_ahead"), steps=3, seed=5,
                          cfg_scale=kw.pop("cfg", 1.5), **kw)
    return generate(model, spec, out, progress=False)


def test_same_result_for_any_batch_size_and_world_size(tmp_path, tiny_pft):
    ref = _run(tiny_pft, tmp_path / "a.npz", batch_size=11, shard_size=11)
    other = _run(tiny_pft, tmp_path / "b.npz", batch_size=3, shard_size=4)
    # two "ranks": rank 1 first, then rank 0 merges
    spec = GenerationSpec(num_samples=11, sampler="look_ahead", steps=3, seed=5, cfg_scale=1.5, batch_size=2, shard_size=3)
    assert generate(tiny_pft, spec, tmp_path / "c.npz", rank=1, world_size=2, progress=False) is None
    two = generate(tiny_pft, spec, tmp_path / "c.npz", rank=0, world_size=2, progress=False)
    with np.load(ref) as a, np.load(other) as b, np.load(two) as c:
        assert a["arr_0"].shape == (11, 8, 8, 3) and a["arr_0"].dtype == np.uint8
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_0"], c["arr_0"])
        assert np.array_equal(a["labels"], b["labels"]) and np.array_equal(a["labels"], c["labels"])
    info = json.loads((tmp_path / "a.json").read_text())
    assert info["sampler"] == "look_ahead" and info["steps"] == 3 and info["nfe"] == 2 * 5 and info["cfg_scale"] == 1.5
    assert info["options"]["context_ratio"] == 1.4 and info["images_per_sec"] > 0


def test_matches_plain_sample_and_adm_conversion(tmp_path, tiny_pft):
    out = _run(tiny_pft, tmp_path / "s.npz", n=4, cfg=1.0, sampler="euler_pf")
    noise = sample_noise(5, range(4), (3, 8, 8))
    y = sample_labels(GenerationSpec(num_samples=4, seed=5), range(4), 5)
    x = pf.sample(tiny_pft, noise, "euler_pf", 3, y=y).x
    expected = (127.5 * x + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    with np.load(out) as z:
        assert np.array_equal(z["arr_0"], expected)
        assert z["labels"].tolist() == y.tolist()


def test_interrupted_run_resumes_without_redoing_shards(tmp_path, tiny_pft, monkeypatch):
    out = tmp_path / "r.npz"
    first = _run(tiny_pft, out, batch_size=2, shard_size=4)
    reference = np.load(first)["arr_0"].copy()
    parts = out.with_name(out.name + ".parts")
    (parts / "shard_000001.npz").unlink()  # as if the run died while making shard 1
    (parts / "shard_000002.npz").write_bytes(b"truncated")
    out.unlink()
    calls = []
    real = gen.sample
    monkeypatch.setattr(gen, "sample", lambda model, noise, *a, **k: calls.append(noise.shape[0]) or real(model, noise, *a, **k))
    again = _run(tiny_pft, out, batch_size=2, shard_size=4)
    assert sum(calls) == 4 + 3  # only shards 1 (4 samples) and 2 (3 samples) were made again
    assert np.array_equal(np.load(again)["arr_0"], reference)


def test_cli_sample_grid_and_torchrun_npz(tmp_path, tiny_pft):
    ckpt = pf.save_model(tiny_pft, tmp_path / "m.safetensors")
    r = subprocess.run([sys.executable, "-m", "patchforcing", "sample", str(ckpt), "--sampler", "dual_loop", "--nfe", "8",
                        "--num-samples", "6", "--out", str(tmp_path / "g.png")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "g.png").exists() and "2 steps, 8 NFE" in r.stdout
    single = tmp_path / "one.npz"
    r = subprocess.run([sys.executable, "-m", "patchforcing", "sample", str(ckpt), "--sampler", "look_ahead", "--steps", "3",
                        "--num-samples", "7", "--batch-size", "7", "--out", str(single)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    multi = tmp_path / "two.npz"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541",
                        "-m", "patchforcing", "sample", str(ckpt), "--sampler", "look_ahead", "--steps", "3",
                        "--num-samples", "7", "--batch-size", "2", "--shard-size", "2", "--device", "cpu",
                        "--out", str(multi)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    with np.load(single) as a, np.load(multi) as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["labels"], b["labels"])
    assert json.loads(multi.with_suffix(".json").read_text())["world_size"] == 2
    r = subprocess.run([sys.executable, "-m", "patchforcing", "sample", str(ckpt), "--sampler", "look_ahead",
                        "--steps", "3", "--out", str(tmp_path / "x.txt")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "must end in .png or .npz" in r.stderr and "Traceback" not in r.stderr
