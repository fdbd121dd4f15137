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
    spec = GenerationSpec(
        num_samples=kw.pop("n", 11),
        sampler=kw.pop("sampler", "look_ahead"),
        steps=3,
        seed=5,
        cfg_scale=kw.pop("cfg", 1.5),
        **kw,
    )
    return generate(model, spec, out, progress=False)


def test_same_result_for_any_batch_size_and_world_size(tmp_path, tiny_pft):
    ref = _run(tiny_pft, tmp_path / "a.npz", batch_size=11, shard_size=11)
    other = _run(tiny_pft, tmp_path / "b.npz", batch_size=3, shard_size=4)
    # two "ranks": rank 1 first, then rank 0 merges
    spec = GenerationSpec(
        num_samples=11, sampler="look_ahead", steps=3, seed=5, cfg_scale=1.5, batch_size=2, shard_size=3
    )
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
    monkeypatch.setattr(
        gen, "sample", lambda model, noise, *a, **k: calls.append(noise.shape[0]) or real(model, noise, *a, **k)
    )
    again = _run(tiny_pft, out, batch_size=2, shard_size=4)
    assert sum(calls) == 4 + 3  # only shards 1 (4 samples) and 2 (3 samples) were made again
    assert np.array_equal(np.load(again)["arr_0"], reference)


def test_cli_sample_grid_and_torchrun_npz(tmp_path, tiny_pft):
    ckpt = pf.save_model(tiny_pft, tmp_path / "m.safetensors")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "patchforcing",
            "sample",
            str(ckpt),
            "--sampler",
            "dual_loop",
            "--nfe",
            "8",
            "--num-samples",
            "6",
            "--out",
            str(tmp_path / "g.png"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "g.png").exists() and "2 steps, 8 NFE" in r.stdout
    single = tmp_path / "one.npz"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "patchforcing",
            "sample",
            str(ckpt),
            "--sampler",
            "look_ahead",
            "--steps",
            "3",
            "--num-samples",
            "7",
            "--batch-size",
            "7",
            "--out",
            str(single),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    multi = tmp_path / "two.npz"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_port=29541",
            "-m",
            "patchforcing",
            "sample",
            str(ckpt),
            "--sampler",
            "look_ahead",
            "--steps",
            "3",
            "--num-samples",
            "7",
            "--batch-size",
            "2",
            "--shard-size",
            "2",
            "--device",
            "cpu",
            "--out",
            str(multi),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    with np.load(single) as a, np.load(multi) as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["labels"], b["labels"])
    assert json.loads(multi.with_suffix(".json").read_text())["world_size"] == 2
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "patchforcing",
            "sample",
            str(ckpt),
            "--sampler",
            "look_ahead",
            "--steps",
            "3",
            "--out",
            str(tmp_path / "x.txt"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "must end in .png or .npz" in r.stderr and "Traceback" not in r.stderr


# --------------------------------------------------------------------------------------------
# resume only with the settings the shards were made with
# --------------------------------------------------------------------------------------------


def _spec(**kw):
    base = {
        "num_samples": 6,
        "sampler": "look_ahead",
        "steps": 2,
        "seed": 5,
        "cfg_scale": 1.5,
        "batch_size": 3,
        "shard_size": 3,
    }
    return GenerationSpec(**{**base, **kw})


@pytest.mark.parametrize(
    "change,named",
    [
        ({"seed": 6}, "seed: 5 -> 6"),
        ({"sampler": "dual_loop"}, "sampler"),
        ({"cfg_scale": 2.0}, "cfg_scale: 1.5 -> 2.0"),
        ({"steps": 3}, "steps: 2 -> 3"),
        ({"steps": None, "nfe": 4}, "nfe"),
        ({"options": {"quantile": 0.6}}, "options"),
        ({"guidance_interval": (0.2, 0.8)}, "guidance_interval"),
        ({"labels": "balanced"}, "labels"),
        ({"classes": [1, 2]}, "classes"),
        ({"shard_size": 2}, "shard_size"),
    ],
)
def test_resume_refuses_other_settings(tmp_path, tiny_pft, change, named):
    out = tmp_path / "s.npz"
    generate(tiny_pft, _spec(), out, progress=False)
    before = np.load(out)["arr_0"].copy()
    with pytest.raises(gen.ShardSettingsError, match=named):
        generate(tiny_pft, _spec(**change), out, progress=False)
    assert np.array_equal(np.load(out)["arr_0"], before)  # nothing was touched
    # overwrite=True re-samples: the same images as a fresh run with the new settings
    again = generate(tiny_pft, _spec(**change), out, progress=False, overwrite=True)
    fresh = generate(tiny_pft, _spec(**change), tmp_path / "fresh.npz", progress=False)
    with np.load(again) as a, np.load(fresh) as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["labels"], b["labels"])
    assert json.loads(out.with_suffix(".json").read_text())["images_generated_this_run"] == 6


def test_resume_refuses_other_weights_and_decoder_but_not_batch_size(tmp_path, tiny_pft):
    out = tmp_path / "w.npz"
    generate(tiny_pft, _spec(), out, progress=False, meta={"vae": {"kind": "identity"}})
    other = pf.create_model("PFT-T/2", input_size=8, in_channels=3, num_classes=5, depth=2, hidden_size=64, num_heads=4)
    with pytest.raises(gen.ShardSettingsError, match="model_sha256"):
        generate(other.eval(), _spec(), out, progress=False, meta={"vae": {"kind": "identity"}})
    with pytest.raises(gen.ShardSettingsError, match="decode"):
        generate(tiny_pft, _spec(), out, progress=False, meta={"vae": {"kind": "kl"}})
    with torch.no_grad():
        tiny_pft.final_layer.linear.bias[0] += 1e-3  # one changed weight is another model
    with pytest.raises(gen.ShardSettingsError, match="model_sha256"):
        generate(tiny_pft, _spec(), out, progress=False, meta={"vae": {"kind": "identity"}})
    with torch.no_grad():
        tiny_pft.final_layer.linear.bias[0] -= 1e-3
    assert (
        gen.model_sha256(tiny_pft)
        == json.loads((tmp_path / "w.npz.parts" / gen.SETTINGS_FILE).read_text())["model_sha256"]
    )
    # batch size, world size and more samples do not change the images: the shards are reused
    generate(tiny_pft, _spec(batch_size=1, num_samples=7), out, progress=False, meta={"vae": {"kind": "identity"}})
    assert json.loads(out.with_suffix(".json").read_text())["images_generated_this_run"] == 1


def test_shards_without_a_settings_record_are_refused(tmp_path, tiny_pft):
    out = tmp_path / "old.npz"
    generate(tiny_pft, _spec(), out, progress=False)
    (tmp_path / "old.npz.parts" / gen.SETTINGS_FILE).unlink()  # as an older patchforcing left them
    with pytest.raises(gen.ShardSettingsError, match="no settings.json"):
        generate(tiny_pft, _spec(), out, progress=False)
    assert generate(tiny_pft, _spec(), out, progress=False, overwrite=True) == out


def test_spec_checks_sampler_options_up_front():
    with pytest.raises(ValueError, match="cfg_scale"):
        GenerationSpec(num_samples=4, cfg_scale=float("nan"))
    with pytest.raises(ValueError, match="guidance_interval"):
        GenerationSpec(num_samples=4, guidance_interval=(0.8, 0.2))
    with pytest.raises(ValueError, match="n_inner"):
        GenerationSpec(num_samples=4, sampler="dual_loop", options={"n_inner": 0})
    with pytest.raises(ValueError, match="unknown sampler"):
        GenerationSpec(num_samples=4, sampler="heun")
    with pytest.warns(DeprecationWarning):
        assert GenerationSpec(num_samples=4, options={"p": 0.3}).options == {"quantile": 0.3}


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "patchforcing", "sample", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


def test_cli_sample_refuses_stale_shards_and_overwrites(tmp_path, tiny_pft):
    first = pf.save_model(tiny_pft, tmp_path / "a.safetensors")
    other = pf.create_model("PFT-T/2", input_size=8, in_channels=3, num_classes=5, depth=2, hidden_size=64, num_heads=4)
    second = pf.save_model(other.eval(), tmp_path / "b.safetensors")
    out = tmp_path / "x.npz"
    common = [
        "--sampler",
        "look_ahead",
        "--steps",
        "2",
        "--num-samples",
        "4",
        "--shard-size",
        "2",
        "--device",
        "cpu",
        "--out",
        out,
    ]
    r = _cli(first, "--seed", "1", *common)
    assert r.returncode == 0, r.stderr[-2000:]
    made = np.load(out)["arr_0"].copy()
    r = _cli(first, "--seed", "2", *common)
    assert r.returncode == 2 and "seed: 1 -> 2" in r.stderr and "--overwrite" in r.stderr, r.stderr[-2000:]
    r = _cli(second, "--seed", "1", *common)
    assert r.returncode == 2 and "model_sha256" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert np.array_equal(np.load(out)["arr_0"], made)
    r = _cli(second, "--seed", "1", "--overwrite", *common)
    assert r.returncode == 0, r.stderr[-2000:]
    expected = generate(
        pf.load_model(second),
        GenerationSpec(num_samples=4, sampler="look_ahead", steps=2, seed=1, shard_size=2),
        tmp_path / "api.npz",
        progress=False,
    )
    with np.load(out) as a, np.load(expected) as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and not np.array_equal(a["arr_0"], made)
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["images_generated_this_run"] == 4 and info["settings"]["model_sha256"] == gen.model_sha256(other)


def test_cli_refuses_nan_cfg_and_nan_weights(tmp_path, tiny_pft, capsys):
    from patchforcing.cli import main

    ckpt = pf.save_model(tiny_pft, tmp_path / "m.safetensors")
    args = ["sample", str(ckpt), "--steps", "2", "--num-samples", "2", "--device", "cpu"]
    assert main([*args, "--cfg", "nan", "--out", str(tmp_path / "a.npz")]) == 2
    assert "argument --cfg: expected a finite number, got 'nan'" in capsys.readouterr().err
    assert main([*args, "--quantile", "0.3", "--p", "0.3", "--out", str(tmp_path / "a.png")]) == 2
    assert "not allowed with argument --quantile" in capsys.readouterr().err
    with torch.no_grad():
        tiny_pft.final_layer.linear.weight.fill_(float("nan"))
    bad = pf.save_model(tiny_pft, tmp_path / "nan.safetensors")
    for out in ("b.npz", "b.png"):
        assert (
            main(["sample", str(bad), *args[2:], "--out", str(tmp_path / out)]) == 3
        )  # non-finite numbers: exit status 3 (docs/cli.md)
        assert "non-finite values: the network output of call 0 (step 0" in capsys.readouterr().err
    assert not (tmp_path / "b.npz").exists() and not (tmp_path / "b.png").exists()
