"""The findings analysis (``analyze``) and the trajectory pictures (``viz`` / ``analyze`` commands)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

import patchforcing as pf
from conftest import randomize
from patchforcing import analysis
from patchforcing.analysis import analyze, context_mask, context_time, pearson_r, spearman_r
from patchforcing.cli import main
from patchforcing.flow.path import interpolate, patch_to_pixel
from patchforcing.utils.seeding import indexed_randn, item_hash
from patchforcing.viz import render_trajectory

T_VALUES = [0.2, 0.5, 0.8]


class OracleModel(nn.Module):
    """A stub with a known error: the data are all zero, so the true velocity is
    ``u = x1 - x0 = -x_t / (1 - t)``; the stub returns ``v = u + sqrt(s) * sign`` with a fixed
    +-1 pattern, where ``s = scale_i * (1 - mean(t))`` per patch ``i`` (more clean context, smaller
    error), and ``logvar = log(s)``. Hence each patch's squared error equals its predicted
    variance exactly (R = 1), and the effect of context is known in closed form."""

    def __init__(self, size: int = 8, channels: int = 2, patch: int = 2):
        super().__init__()
        self.patch_size, self.image_size, self.in_channels = patch, (size, size), channels
        self.num_classes, self.num_patches = 0, (size // patch) ** 2
        self.predict_uncertainty = self.per_patch_time = True
        g = torch.Generator().manual_seed(0)
        self.register_buffer("scale", torch.rand(1, self.num_patches, generator=g) * 3 + 0.1)
        self.register_buffer("sign", torch.randint(0, 2, (1, channels, size, size), generator=g).float() * 2 - 1)
        self.calls: list[Tensor] = []

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None):
        self.calls.append(t.clone())
        H, W = self.image_size
        s = self.scale * (1 - t.mean(dim=1, keepdim=True))  # (B, N)
        s_pix = patch_to_pixel(s, self.patch_size, H, W)
        u = -x / (1 - patch_to_pixel(t, self.patch_size, H, W))
        return u + s_pix.sqrt() * self.sign, s_pix.log()


def _numpy_patch_mean(a: np.ndarray, p: int) -> np.ndarray:
    B, _, H, W = a.shape
    return a.reshape(B, -1, H // p, p, W // p, p).mean(axis=(1, 3, 5)).reshape(B, -1)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    m = pf.create_model("PFT-T/2", input_size=16, in_channels=3, num_classes=4, depth=2, hidden_size=64, num_heads=4)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    pf.save_model(randomize(m, std=0.05, seed=1).eval(), path)
    return path


# ------------------------------------------------------------------------------ statistics


def test_pearson_and_spearman_match_numpy():
    rng = np.random.default_rng(0)
    a = rng.lognormal(size=500)
    b = a * rng.lognormal(size=500)
    assert pearson_r(a, b) == pytest.approx(np.corrcoef(a, b)[0, 1], abs=1e-12)
    # ties: ranks averaged
    x = np.array([1.0, 2.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    y = np.array([0.5, 0.1, 0.9, 2.0, 3.0, 1.0, 4.0])
    rx = np.array([1, 2.5, 2.5, 4, 6, 6, 6])
    ry = np.array([2, 1, 3, 5, 6, 4, 7])
    assert spearman_r(x, y) == pytest.approx(np.corrcoef(rx, ry)[0, 1], abs=1e-12)
    assert np.isnan(pearson_r(np.ones(5), np.arange(5.0)))


def test_context_mask_and_time_rule():
    m = context_mask(range(6), 16, 0.5, seed=3)
    assert m.shape == (6, 16) and m.dtype == torch.bool and (m.sum(1) == 8).all()
    assert torch.equal(context_mask([3, 4], 16, 0.5, seed=3), m[3:5])  # per (seed, item), not per batch
    assert not torch.equal(context_mask(range(6), 16, 0.5, seed=4), m)
    assert (context_mask(range(3), 16, 0.01).sum(1) == 1).all()  # at least one context patch
    assert context_time(0.2) == pytest.approx(0.6) and context_time(0.6, move=0.25) == pytest.approx(0.7)
    assert context_time(0.2, fixed=0.9) == 0.9 and context_time(0.95, fixed=0.9) == 0.95
    with pytest.raises(ValueError):
        context_mask(range(2), 16, 1.0)


def test_noise_and_context_are_bit_identical_to_the_item_hash_seeding():
    """The analysis' noise of item i is randn from Generator().manual_seed(item_hash(salt, seed, i))."""
    salt = analysis.measure._NOISE_SALT
    old = torch.stack(
        [torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(item_hash(salt, 5, i))) for i in (0, 3, 7)]
    )
    assert torch.equal(indexed_randn(salt, 5, [0, 3, 7], (3, 4, 4)), old)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(item_hash(analysis.measure._MASK_SALT, 5, 3)))
    expected = torch.zeros(16, dtype=torch.bool)
    expected[perm[:8]] = True
    assert torch.equal(context_mask([3], 16, 0.5, seed=5)[0], expected)


def test_public_names_and_format_table(tmp_path):
    for name in analysis.__all__:
        assert hasattr(analysis, name)
    res = analyze(
        OracleModel(), torch.zeros(2, 2, 8, 8), None, num_images=2, t_values=[0.5], batch_size=2, progress=False
    )
    table = analysis.format_table(res).splitlines()
    assert table[1].split()[:3] == ["0.50", "1.000", f"{res['correlation']['spearman_r'][0]:.3f}"]
    assert "R = 0.11 at t = 0.2, R = 0.52 at t = 0.6" in table[-1]


# ------------------------------------------------------------------------------ analyze


def test_oracle_model_exact_numbers_and_t_maps(tmp_path):
    model = OracleModel()
    n, N = 5, model.num_patches
    data = torch.zeros(n, 2, 8, 8)
    res = analyze(model, data, tmp_path / "out", num_images=n, t_values=T_VALUES, batch_size=n, seed=7, progress=False)
    c = res["correlation"]
    assert c["pearson_r"] == pytest.approx([1.0] * 3, abs=1e-6)
    assert min(c["spearman_r"]) > 0.995  # (ties: every image has the same variances; the errors differ by rounding)
    assert c["error_over_uncertainty"] == pytest.approx([1.0] * 3, rel=1e-4)

    # the t maps: a plain pass with every patch at t, then only the chosen patches at t_ctx
    mask = context_mask(range(n), N, 0.5, seed=7)
    assert len(model.calls) == 2 * len(T_VALUES)
    for j, t in enumerate(T_VALUES):
        plain, ctx = model.calls[2 * j], model.calls[2 * j + 1]
        tc = context_time(t)
        assert torch.equal(plain, torch.full((n, N), t))
        assert torch.equal(ctx[mask], torch.full((int(mask.sum()),), tc))
        assert torch.equal(ctx[~mask], torch.full((int((~mask).sum()),), t))
        # closed form: error and variance scale with 1 - mean(t)
        tbar = (8 * tc + 8 * t) / 16
        x = res["context"]
        assert x["loss_with"][j] / x["loss_without"][j] == pytest.approx((1 - tbar) / (1 - t), rel=1e-4)
        assert x["uncertainty_with"][j] / x["uncertainty_without"][j] == pytest.approx((1 - tbar) / (1 - t), rel=1e-4)
        free = ~mask
        expected = float((model.scale.expand(n, N)[free]).mean()) * (1 - t)
        assert x["loss_without"][j] == pytest.approx(expected, rel=1e-4)
    assert res["summary"]["context_lowers_loss"] and res["summary"]["context_lowers_uncertainty"]
    assert res["settings"]["context_rule"] == "t_ctx = t + 0.5 * (1 - t)"
    assert res["settings"]["context_patches_per_image"] == 8

    # histogram: with context the uncertainties are smaller; counts cover every non-context patch
    h = res["histogram"]
    assert sum(h["without"]) == sum(h["with"]) == 3 * n * 8
    assert h["median_with"] < h["median_without"]
    assert len(h["edges"]) == len(h["without"]) + 1 and len(h["per_t"]) == 3

    out = tmp_path / "out"
    saved = json.loads((out / "analysis.json").read_text())
    for key in ("settings", "reference", "correlation", "context", "histogram", "summary", "files"):
        assert key in saved
    assert saved["reference"]["pearson_r"] == {"0.2": 0.11, "0.6": 0.52}
    for name in ("correlation.png", "context.png", "uncertainty_hist.png", "scatter_t0.20.png", "scatter_t0.80.png"):
        with Image.open(out / name) as im:
            assert im.width > 300 and im.height > 300


def test_tiny_pft_correlation_matches_numpy_and_is_batch_invariant(tiny_pft):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, 8, 8, generator=g).clamp(-1, 1)
    y = torch.arange(6) % 5
    res = analyze(tiny_pft, (x, y), None, num_images=6, t_values=[0.3, 0.6], batch_size=6, seed=2, progress=False)
    x0 = indexed_randn(analysis.measure._NOISE_SALT, 2, range(6), (3, 8, 8))
    for j, t in enumerate([0.3, 0.6]):
        tt = torch.full((6, 16), t)
        with torch.no_grad():
            v, lv = tiny_pft(interpolate(x0, x, tt, 2), tt, y)
        unc = _numpy_patch_mean(np.exp(lv.double().numpy()), 2)
        err = _numpy_patch_mean(((v - (x - x0)) ** 2).double().numpy(), 2)
        assert res["correlation"]["pearson_r"][j] == pytest.approx(
            np.corrcoef(unc.ravel(), err.ravel())[0, 1], abs=1e-5
        )
        assert res["correlation"]["mean_squared_error"][j] == pytest.approx(err.mean(), rel=1e-5)
    other = analyze(tiny_pft, (x, y), None, num_images=6, t_values=[0.3, 0.6], batch_size=4, seed=2, progress=False)
    for key in ("pearson_r", "mean_uncertainty"):
        assert other["correlation"][key] == pytest.approx(res["correlation"][key], abs=1e-6)
    assert other["context"]["loss_with"] == pytest.approx(res["context"]["loss_with"], rel=1e-6)


def test_analyze_refuses_models_without_a_head_and_bad_labels(tiny_sit, tiny_pft):
    x = torch.zeros(2, 3, 8, 8)
    with pytest.raises(ValueError, match="uncertainty head"):
        analyze(tiny_sit, x, None, progress=False)
    with pytest.raises(ValueError, match="outside the model"):
        analyze(tiny_pft, (x, torch.tensor([0, 7])), None, progress=False)
    with pytest.raises(ValueError, match="shape"):
        analyze(tiny_pft, torch.zeros(2, 3, 16, 16), None, progress=False)


def test_latent_model_takes_latents_and_viz_decodes(tmp_path):
    m = randomize(
        pf.create_model("PFT-T/2", input_size=8, in_channels=4, num_classes=3, depth=1, hidden_size=32, num_heads=2),
        seed=2,
    ).eval()
    z = torch.randn(3, 4, 8, 8)
    res = analyze(
        m,
        z,
        None,
        num_images=3,
        t_values=[0.5],
        scatter_t=[0.5],
        progress=False,
        autoencoder=lambda: pytest.fail("latent data need no autoencoder"),
    )
    assert res["settings"]["space"].startswith("latents") and res["correlation"]["num_pairs"] == 3 * 16

    def decode(lat):  # a stand-in VAE: 4 latent channels at 8x8 -> RGB at 32x32
        return torch.nn.functional.interpolate(lat[:, :3].tanh(), scale_factor=4)

    out = render_trajectory(m, tmp_path / "lat.png", sampler="look_ahead", steps=3, decode=decode)
    with Image.open(out.path) as im:
        assert im.width > 500
    assert out.kind == "sheet" and out.calls == 5  # 1 early Euler call + 2 steps x 2


# ------------------------------------------------------------------------------ commands


def test_cli_viz_png_gif_overview(ckpt, tmp_path, capsys):
    gif = tmp_path / "x.gif"
    assert (
        main(
            [
                "viz",
                str(ckpt),
                "--sampler",
                "look_ahead",
                "--steps",
                "4",
                "--index",
                "2",
                "--out",
                str(gif),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    with Image.open(gif) as im:
        assert im.n_frames == 7  # 1 early call + 3 steps x 2 calls
    png = tmp_path / "x.png"
    assert (
        main(
            [
                "viz",
                str(ckpt),
                "--sampler",
                "dual_loop",
                "--steps",
                "2",
                "--n-inner",
                "3",
                "--class",
                "1",
                "--every",
                "2",
                "--out",
                str(png),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    with Image.open(png) as im:
        assert im.height > 4 * 128  # 4 rows of >= 128 px tiles (calls 0, 2, 4, 5)
    ov = tmp_path / "ov.png"
    assert (
        main(["viz", str(ckpt), "--steps", "4", "--overview", "--num-images", "2", "--out", str(ov), "--device", "cpu"])
        == 0
    )
    assert ov.is_file()
    text = capsys.readouterr().out
    assert "sample 2" in text and "7 frames" in text and "4 rows" in text
    # the picture's sample is `patchforcing sample`'s sample: same noise and label
    assert main(["viz", str(ckpt), "--out", str(tmp_path / "x.jpg")]) == 2
    assert "must end in .png or .gif" in capsys.readouterr().err


def test_viz_sample_matches_generated_sample(ckpt):
    from patchforcing.sampling.generate import GenerationSpec, sample_labels, sample_noise

    model = pf.load_model(ckpt)
    spec = GenerationSpec(num_samples=3, seed=5, sampler="euler_pf", steps=3)
    noise = sample_noise(5, [0, 1, 2], (3, 16, 16))
    ref = pf.sample(model, noise, "euler_pf", 3, y=sample_labels(spec, [0, 1, 2], 4))
    shown = pf.sample(
        model, sample_noise(5, [2], (3, 16, 16)), "euler_pf", 3, y=sample_labels(spec, [2], 4), record=True
    )
    assert torch.allclose(shown.x[0], ref.x[2], atol=1e-5)


def test_cli_analyze_subprocess(ckpt, tmp_path):
    out = tmp_path / "analysis"
    cmd = [
        sys.executable,
        "-m",
        "patchforcing",
        "analyze",
        str(ckpt),
        "--data",
        "synthetic",
        "--out",
        str(out),
        "--num-images",
        "6",
        "--t-bins",
        "0.2,0.6",
        "--batch-size",
        "4",
        "--quiet",
        "--device",
        "cpu",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "0.60" in proc.stdout and "paper" in proc.stdout
    res = json.loads((out / "analysis.json").read_text())
    assert res["settings"]["num_images"] == 6 and res["correlation"]["t"] == [0.2, 0.6]
    assert res["settings"]["data"]["kind"] == "synthetic" and "held_out" in res["settings"]["data"]
    assert "pearson_r_at_t0.6" in res["summary"]
    for name in res["files"].values():
        assert (out / name).is_file()


def test_cli_analyze_bad_data_is_a_clear_error(ckpt, tmp_path, capsys):
    assert main(["analyze", str(ckpt), "--data", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "is not 'synthetic'" in capsys.readouterr().err


def test_latent_model_on_a_latent_store_and_on_images_through_its_vae(tmp_path, capsys):
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKL

    from patchforcing.latents import encode_source

    torch.manual_seed(0)  # a random 3-level SD-VAE-like KL autoencoder: 32x32 images -> 4x8x8 latents
    AutoencoderKL(
        block_out_channels=(8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=4,
        sample_size=32,
    ).save_pretrained(tmp_path / "vae")
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "images.npz", images=rng.integers(0, 255, (6, 32, 32, 3), dtype=np.uint8), labels=np.arange(6) % 3
    )
    encode_source(
        tmp_path / "images.npz",
        tmp_path / "store",
        str(tmp_path / "vae"),
        resolution=32,
        batch_size=6,
        shard_size=6,
        device="cpu",
        progress=False,
    )
    m = pf.create_model("PFT-T/2", input_size=8, in_channels=4, num_classes=3, depth=1, hidden_size=32, num_heads=2)
    ckpt = tmp_path / "latent.safetensors"
    pf.save_model(
        randomize(m, seed=4).eval(),
        ckpt,
        metadata={
            "autoencoder": {"kind": "kl", "source": str(tmp_path / "vae"), "scale_factor": 0.18215, "shift_factor": 0.0}
        },
    )
    for data in ("store", "images.npz"):  # latents directly; images encoded by the checkpoint's VAE
        out = tmp_path / f"an_{data}"
        assert (
            main(
                [
                    "analyze",
                    str(ckpt),
                    "--data",
                    str(tmp_path / data),
                    "--out",
                    str(out),
                    "--num-images",
                    "4",
                    "--t-bins",
                    "0.5",
                    "--quiet",
                    "--device",
                    "cpu",
                ]
            )
            == 0
        )
        res = json.loads((out / "analysis.json").read_text())
        assert res["settings"]["space"].startswith("latents") and res["correlation"]["num_pairs"] == 4 * 16
        assert res["settings"]["labels"] == "the items' labels"
    assert main(["viz", str(ckpt), "--steps", "2", "--out", str(tmp_path / "v.png"), "--device", "cpu"]) == 0
    with Image.open(tmp_path / "v.png") as im:  # decoded 32x32 images, 4x4 latent patch maps
        assert im.width > 500
    capsys.readouterr()


def test_cli_analyze_uses_a_configs_held_out_split(ckpt, tmp_path, capsys):
    out = tmp_path / "cfg"
    assert (
        main(
            [
                "analyze",
                str(ckpt),
                "--data",
                "tiny-test",
                "--out",
                str(out),
                "--num-images",
                "4",
                "--t-bins",
                "0.5",
                "--context-t",
                "0.9",
                "--quiet",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    res = json.loads((out / "analysis.json").read_text())
    assert "val_size = 8" in res["settings"]["data"]["held_out"] and res["settings"]["num_images"] == 4
    assert res["settings"]["context_rule"] == "t_ctx = max(t, 0.9)" and res["context"]["t_context"] == [0.9]
    capsys.readouterr()
