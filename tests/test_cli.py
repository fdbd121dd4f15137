"""The CLI's promises on bad input: one line on stderr naming the problem, the documented exit
status (docs/cli.md), no traceback, and nothing written before the inputs were checked."""

from __future__ import annotations

import errno

import numpy as np
import pytest
import torch

import patchforcing as pf
import patchforcing.cli.sample as cli_sample
from patchforcing.cli import main


@pytest.fixture
def ckpt(tmp_path, tiny_pft):
    return str(pf.save_model(tiny_pft, tmp_path / "m.safetensors"))


def run(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--device", "bogus"], "unknown device 'bogus'"),
        (["--classes", ""], "--classes '': give comma-separated class labels"),
        (["--classes", "1,,2"], "give comma-separated class labels"),
        (["--classes", "a"], "class labels must be integers"),
        (["--guidance-interval", "0.9", "0.1"], "LO must be smaller than HI"),
        (["--cfg", "inf"], "expected a finite number"),
        (["--nfe", "0"], "expected a positive integer, got 0"),
        (["--num-samples", "0"], "expected a positive integer, got 0"),
        (["--guidance-interval", "0.1", "1.5"], "expected a number in [0, 1]"),
    ],
)
def test_sample_refuses_bad_options_before_any_work(capsys, tmp_path, ckpt, extra, message):
    out = tmp_path / "g.png"
    code, err = run(capsys, ["sample", ckpt, "--steps", "2", "--num-samples", "2", *extra, "--out", str(out)])
    assert code == 2 and message in err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_cpu_machine(capsys, tmp_path, ckpt):
    for argv in (
        ["sample", ckpt, "--device", "cuda", "--out", str(tmp_path / "g.png")],
        ["viz", ckpt, "--device", "cuda", "--out", str(tmp_path / "t.png")],
        ["analyze", ckpt, "--data", "synthetic", "--device", "cuda", "--out", str(tmp_path / "a")],
    ):
        code, err = run(capsys, argv)
        assert code == 2 and "CUDA is not available" in err, argv


def test_outputs_of_the_wrong_kind_are_refused_first(capsys, tmp_path, ckpt):
    d = tmp_path / "adir"
    d.mkdir()
    f = tmp_path / "afile"
    f.write_text("x")
    code, err = run(capsys, ["eval", "s.npz", "--ref", "r.npz", "--out", str(d)])
    assert code == 2 and f"--out {d} is a directory" in err
    code, err = run(capsys, ["analyze", ckpt, "--data", "synthetic", "--out", str(f)])
    assert code == 2 and f"--out {f} is a file" in err
    code, err = run(capsys, ["export", ckpt, "--out", str(d)])
    assert code == 2 and str(d) in err and "directory" in err
    code, err = run(capsys, ["sample", ckpt, "--steps", "1", "--out", str(f / "g.png")])  # parent is a file
    assert code == 2 and "is not a directory" in err
    code, err = run(capsys, ["viz", ckpt, "--num-images", "0", "--overview", "--out", str(tmp_path / "o.png")])
    assert code == 2 and "--num-images: expected a positive integer, got 0" in err


def test_ctrl_c_in_sample_keeps_shards_and_says_how_to_resume(capsys, tmp_path, ckpt, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_sample, "generate", interrupted)
    code, err = run(capsys, ["sample", ckpt, "--steps", "1", "--num-samples", "2", "--out", str(tmp_path / "s.npz")])
    assert code == 130
    assert "interrupted; the finished shards are kept: run the same command again to resume" in err


def test_full_disk_is_one_line(capsys, tmp_path, ckpt, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, f"no space left on the device while writing {tmp_path / 'g.png'}")

    monkeypatch.setattr(cli_sample, "save_grid", full)
    code, err = run(capsys, ["sample", ckpt, "--steps", "1", "--num-samples", "2", "--out", str(tmp_path / "g.png")])
    last = err.strip().splitlines()[-1]  # after the progress bar
    assert (
        code == 2
        and last == f"patchforcing sample: error: no space left on the device while writing {tmp_path / 'g.png'}"
    )


def test_picture_equals_the_npz_images(capsys, tmp_path, ckpt):
    """The grid and the .npz come from one sampling path: the same images for the same indices."""
    args = ["sample", ckpt, "--sampler", "look_ahead", "--steps", "3", "--num-samples", "4", "--seed", "7"]
    assert main([*args, "--out", str(tmp_path / "s.npz")]) == 0
    assert main([*args, "--out", str(tmp_path / "g.png")]) == 0
    from PIL import Image

    from patchforcing.viz import save_grid

    arr = np.load(tmp_path / "s.npz")["arr_0"]
    expected = np.asarray(save_grid(arr))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "g.png").convert("RGB")), expected)


def test_viz_of_a_token_cached_run(capsys, tmp_path, ckpt, monkeypatch):
    import patchforcing.cli.viz as cli_viz

    seen = []
    original = cli_viz.render_trajectory

    def spy(*args, **kwargs):  # the CLI must hand its --cache-* options to the renderer
        seen.append(kwargs["cache"])
        return original(*args, **kwargs)

    monkeypatch.setattr(cli_viz, "render_trajectory", spy)
    out = tmp_path / "cache.png"
    argv = ["viz", ckpt, "--sampler", "euler_pf", "--steps", "4", "--cache-active", "0.5", "--cache-refresh", "3"]
    code, err = run(capsys, argv + ["--out", str(out)])
    assert code == 0 and out.exists(), err
    assert seen and (seen[0].active, seen[0].refresh_every) == (0.5, 3)
    code, err = run(capsys, ["viz", ckpt, "--cache-refresh", "2", "--out", str(tmp_path / "x.png")])
    assert code == 2 and "--cache-active" in err
