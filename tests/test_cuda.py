"""The paths a GPU takes, checked against the CPU (skipped on a machine without CUDA).

What a CUDA device changes: the kernels (cuBLAS, cuDNN's patch-embedding convolution, SDPA's
flash / memory-efficient attention, fused AdamW), the CUDA random-number state the checkpoints
carry, bf16 autocast on the device, ``torch.compile`` through Triton, and the device plumbing of
the trainer and the CLI (``train.device=auto`` / ``cuda``, pinned-memory loaders, loading a GPU
checkpoint on the CPU). Each test names the bug it is there to catch.

``PATCHFORCING_TEST_DEVICE=cpu`` runs the same checks with the CPU standing in for the GPU (a dry
run of the tests themselves on a machine without one).

fp32 comparisons turn TF32 off (cuDNN allows it by default for convolutions), so CPU and GPU
differ only by summation order: ``1e-4`` absolute on outputs of order 1.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import patchforcing as pf
from conftest import T2I_TINY, randomize
from patchforcing.checkpoints import safe_torch_load
from patchforcing.cli import main
from patchforcing.conditioning import TextTokens
from patchforcing.flow.loss import patch_flow_loss
from patchforcing.sampling.generate import sample_noise
from patchforcing.training import load_config, train

CUDA = torch.device(os.environ.get("PATCHFORCING_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(CUDA.type == "cuda" and not torch.cuda.is_available(), reason="CUDA not available")

ROOT = Path(__file__).resolve().parents[1]
SAMPLERS = ["euler", "euler_pf", "dual_loop", "look_ahead", "random_context"]


@pytest.fixture(autouse=True)
def _no_tf32():
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
            yield
    finally:
        torch.set_float32_matmul_precision(precision)


def _cfg(*overrides: str):
    return load_config("tiny-test", [f"train.device={CUDA.type}", *overrides])


def _state(run: Path) -> dict:
    return safe_torch_load(run / "checkpoints" / "last.pt")


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# --------------------------------------------------------------------------------------------
# the network and the loss
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["PFT", "SiT"])
def test_forward_and_loss_match_the_cpu(family):
    """Bugs: a device-dependent branch in the network (an attention kernel that drops the scale,
    a mask built on the wrong device), the loss drawing on the wrong device's generator."""
    m = pf.create_model(
        f"{family}-T/2", input_size=8, in_channels=3, num_classes=5, depth=2, hidden_size=64, num_heads=4
    )
    cpu = randomize(m).eval()
    gpu = copy.deepcopy(cpu).to(CUDA)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, 8, 8, generator=g), torch.tensor([0, 1, 4, 5])  # 5 = the null class
    t = torch.rand(4, 16, generator=g) if family == "PFT" else torch.rand(4, generator=g)
    with torch.no_grad():
        v_cpu, lv_cpu = cpu(x, t, y)
        v_gpu, lv_gpu = gpu(x.to(CUDA), t.to(CUDA), y.to(CUDA))
    assert v_gpu.device.type == CUDA.type
    torch.testing.assert_close(v_gpu.cpu(), v_cpu, atol=1e-4, rtol=1e-4)
    if lv_cpu is not None:
        torch.testing.assert_close(lv_gpu.cpu(), lv_cpu, atol=1e-4, rtol=1e-4)
    # the loss with explicit noise and times: the same terms on both devices, gradients too
    x0 = torch.randn(4, 3, 8, 8, generator=g)
    terms = {}
    for name, net, dev in (("cpu", cpu.train(), "cpu"), ("gpu", gpu.train(), CUDA)):
        net.zero_grad()
        out = patch_flow_loss(net, x.to(dev), y.to(dev), x0=x0.to(dev), t=t.to(dev), uncertainty_weight=0.01)
        out["loss"].backward()
        terms[name] = (out, {k: p.grad.cpu() for k, p in net.named_parameters() if p.grad is not None})
    for key in ("loss", "fm", "nll"):
        torch.testing.assert_close(terms["gpu"][0][key].cpu(), terms["cpu"][0][key], atol=1e-5, rtol=1e-4)
    for k, grad in terms["cpu"][1].items():
        torch.testing.assert_close(terms["gpu"][1][k], grad, atol=1e-5, rtol=1e-3, msg=k)


def test_bf16_autocast_and_flash_attention_stay_close_to_fp32():
    """Bugs: the attention kernel choice for bf16 on CUDA (SDPA) computing something else than
    the explicit softmax; autocast leaking bf16 into the uncertainty head's log-variance."""
    m = randomize(pf.create_model("PFT-S/2", input_size=16, in_channels=4, num_classes=10, depth=3)).eval().to(CUDA)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(8, 4, 16, 16, generator=g).to(CUDA), torch.rand(8, 64, generator=g).to(CUDA)
    y = torch.arange(8, device=CUDA)
    with torch.no_grad():
        v32, lv32 = m(x, t, y)
        with torch.autocast(CUDA.type, dtype=torch.bfloat16):
            v16, lv16 = m(x, t, y)
    rel = (v16.float() - v32).norm() / v32.norm()
    assert rel < 2e-2, f"bf16 output differs from fp32 by {rel:.3g} (relative)"
    assert (lv16.float() - lv32).abs().max() < 0.1


def test_text_to_image_forward_matches_the_cpu_with_empty_captions():
    """Bug: SDPA on CUDA returns NaN for a query whose keys are all masked (the empty caption of
    caption dropout), where the CPU path gives the documented zero cross-attention."""
    cpu = randomize(pf.create_model("PFT-T2I-T/2", **T2I_TINY)).eval()
    gpu = copy.deepcopy(cpu).to(CUDA)
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(3, 3, 16, 16, generator=g), torch.rand(3, 64, generator=g)
    tokens = torch.randn(3, 7, T2I_TINY["text_dim"], generator=g)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2] = False  # no tokens at all
    with torch.no_grad():
        v_cpu, lv_cpu = cpu(x, t, TextTokens(tokens, mask))
        v_gpu, lv_gpu = gpu(x.to(CUDA), t.to(CUDA), TextTokens(tokens.to(CUDA), mask.to(CUDA)))
    assert torch.isfinite(v_gpu).all() and torch.isfinite(lv_gpu).all()
    torch.testing.assert_close(v_gpu.cpu(), v_cpu, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lv_gpu.cpu(), lv_cpu, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# samplers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_samplers_match_the_cpu(tiny_pft, sampler):
    """Bugs: a sampler building its masks, quantiles or random context on the CPU (device
    mismatch) or from a device-dependent generator (random_context must pick the same patches
    on every device); guidance breaking on CUDA."""
    gpu = copy.deepcopy(tiny_pft).to(CUDA)
    noise = sample_noise(0, range(6), (3, 8, 8))
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    a = pf.sample(tiny_pft, noise, sampler, nfe=12, y=y, cfg_scale=1.5)
    b = pf.sample(gpu, noise.to(CUDA), sampler, nfe=12, y=y.to(CUDA), cfg_scale=1.5)
    assert b.x.device.type == CUDA.type
    assert (b.nfe, b.steps, b.calls) == (a.nfe, a.steps, a.calls)
    torch.testing.assert_close(b.x.cpu(), a.x, atol=2e-4, rtol=2e-4)


def test_bf16_sampling_on_cuda_is_close_to_fp32(tiny_pft):
    """Bug: ``precision="bf16"`` integrating the state in bf16 (it must stay float32)."""
    gpu = tiny_pft.to(CUDA)
    noise = sample_noise(0, range(4), (3, 8, 8)).to(CUDA)
    y = torch.tensor([0, 1, 2, 3], device=CUDA)
    a = pf.sample(gpu, noise, "look_ahead", nfe=12, y=y)
    b = pf.sample(gpu, noise, "look_ahead", nfe=12, y=y, precision="bf16")
    assert b.x.dtype == torch.float32
    assert (b.x - a.x).norm() / a.x.norm() < 5e-2


def test_sample_cli_on_cuda_equals_the_cpu(tmp_path, tiny_pft, capsys):
    """Bug: the CLI's ``--device cuda`` drawing noise or labels on the device (samples must depend
    only on the sample index, whatever the device)."""
    ckpt = str(pf.save_model(tiny_pft, tmp_path / "m.safetensors"))
    outs = [(dev, tmp_path / f"{i}-{dev}.npz") for i, dev in enumerate(("cpu", CUDA.type))]
    for dev, out in outs:
        argv = [
            "sample",
            ckpt,
            "--steps",
            "6",
            "--num-samples",
            "8",
            "--device",
            dev,
            "--out",
            str(out),
        ]
        assert main(argv) == 0, capsys.readouterr().err
    a, b = (np.load(out)["arr_0"].astype(int) for _, out in outs)
    assert a.shape == b.shape == (8, 8, 8, 3)
    assert np.abs(a - b).max() <= 1  # uint8 images: at most one rounding step apart


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------


def test_training_on_cuda_resumes_exactly_and_loads_on_the_cpu(tmp_path):
    """Bugs: the CUDA random state not saved or not restored (the resumed run draws other noise
    and times), a GPU checkpoint that cannot be loaded on a CPU-only machine."""
    cfg = ("train.max_steps=4", "train.ckpt_every=2", "train.attention=math")
    train(_cfg(*cfg), tmp_path / "full")
    train(_cfg(*cfg[1:], "train.max_steps=2"), tmp_path / "split")
    train(_cfg(*cfg), tmp_path / "split", resume=True)
    a, b = _state(tmp_path / "full"), _state(tmp_path / "split")
    assert a["step"] == b["step"] == 4
    if CUDA.type == "cuda":
        assert "cuda" in a["rng"] and "cuda" in b["rng"]
    assert _max_diff(a["model"], b["model"]) <= 1e-6
    assert _max_diff(a["ema"], b["ema"]) <= 1e-6
    # the checkpoint holds CPU tensors: it loads on a machine without CUDA
    assert all(v.device.type == "cpu" for v in a["model"].values())
    model = pf.load_model(tmp_path / "full")
    assert next(model.parameters()).device.type == "cpu"


def test_compiled_bf16_training_on_cuda(tmp_path):
    """Bugs: ``train.compile`` failing under Triton, or compiling a different step (loss off
    from the eager bf16 run's by more than bf16 noise)."""
    res_c = train(_cfg("train.max_steps=3", "train.precision=bf16", "train.compile=true"), tmp_path / "c")
    res_e = train(_cfg("train.max_steps=3", "train.precision=bf16"), tmp_path / "e")
    assert res_c.step == res_e.step == 3
    lc, le = res_c.metrics["loss"], res_e.metrics["loss"]
    assert np.isfinite(lc) and abs(lc - le) <= 0.05 * abs(le) + 1e-3, (lc, le)


def test_torchrun_on_one_gpu(tmp_path):
    """Bug: ``patchforcing train`` under torchrun on a GPU machine (the device from LOCAL_RANK,
    ``train.device=auto`` choosing CUDA, pinned loaders, bf16 autocast) failing or writing a
    checkpoint that does not load. (One process takes the single-process path: NCCL needs two GPUs.)"""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_port=29541"]
    cmd += ["-m", "patchforcing", "train", "tiny-test", "train.device=auto", "train.max_steps=2"]
    cmd += ["train.precision=bf16", "--out", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    state = _state(out)
    assert state["step"] == 2
    if CUDA.type == "cuda":
        assert "cuda" in state["rng"]  # it trained on the GPU
    assert pf.load_model(out).num_classes == 4
