"""Does bf16 autocast pay on this CPU? GEMM and demo-preset training step, fp32 vs bf16, one run.

CPUs with bf16 units (Intel AMX, AVX-512 BF16) run bf16 matmuls several times faster than fp32;
others emulate them, several times slower. ``train.precision: auto`` picks bf16 only on the first
kind (:func:`patchforcing.utils.devices.cpu_has_native_bf16`). Usage: ``python benchmarks/cpu_precision.py``.
"""

from __future__ import annotations

import tempfile
import time

import torch

from _common import cpu_model
from patchforcing.training.config import load_config
from patchforcing.training.trainer import Trainer
from patchforcing.utils.devices import auto_precision, cpu_has_native_bf16


def gemm_seconds(dtype: torch.dtype, n: int = 1024, reps: int = 5) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return (time.perf_counter() - t) / reps


def step_seconds(precision: str, steps: int = 3) -> float:
    cfg = load_config("demo", [f"train.precision={precision}", "train.progress=false", "name=bench"])
    with tempfile.TemporaryDirectory() as d:
        trainer = Trainer(cfg, f"{d}/run")
        it = iter(trainer._loader())
        trainer._train_step([next(it)])  # warm-up
        t = time.perf_counter()
        for _ in range(steps):
            trainer._train_step([next(it)])
        seconds = (time.perf_counter() - t) / steps
        trainer.close()
    return seconds


def main() -> None:
    torch.manual_seed(0)
    print(
        f"CPU: {cpu_model()}; native bf16 units: {cpu_has_native_bf16()}; "
        f"auto precision: {auto_precision(torch.device('cpu'))}; threads: {torch.get_num_threads()}"
    )
    g32, g16 = gemm_seconds(torch.float32), gemm_seconds(torch.bfloat16)
    s32, s16 = step_seconds("fp32"), step_seconds("bf16")
    print(
        f"1024^3 GEMM: fp32 {2 * 1024**3 / g32 / 1e9:.1f} GFLOP/s, bf16 {2 * 1024**3 / g16 / 1e9:.1f} GFLOP/s "
        f"(bf16/fp32 time {g16 / g32:.2f}x)"
    )
    print(
        f"demo training step (PFT-T/4, batch 64): fp32 {s32:.2f} s, bf16 {s16:.2f} s (bf16/fp32 time {s16 / s32:.2f}x)"
    )


if __name__ == "__main__":
    main()
