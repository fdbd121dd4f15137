"""Training throughput: images/s, PFT/SiT step-time ratio (fp32, bf16) and achieved FLOP/s.

Everything is measured in one run, interleaved (PFT, SiT, PFT, SiT, ...) so that a busy
machine slows both alike; medians over repeats. The matmul peak of this machine is measured in
the same run (large square GEMMs, fp32 and bf16), and a training step's FLOPs are counted with
``torch.utils.flop_counter`` (forward + backward; matmuls, convolutions, attention).

    python benchmarks/train_throughput.py                     # PFT-B/2 vs SiT-B/2, 32x32x4, batch 8
    python benchmarks/train_throughput.py --size S --batch-size 32 --markdown
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import patchforcing as pf
from _common import cpu_model, matmul_peak, sync


def make_step(model, batch: int, precision: str, device: torch.device):
    """A closure doing one full training step (loss, backward, AdamW) on fixed random data."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator(device=device).manual_seed(0)
    x1 = torch.randn(batch, model.in_channels, *model.image_size, device=device, generator=g)
    y = torch.randint(0, model.num_classes, (batch,), device=device, generator=g)
    sampler = "ltg" if model.per_patch_time else "uniform"
    weight = 0.01 if model.predict_uncertainty else 0.0

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            terms = pf.patch_flow_loss(model, x1, y, timestep_sampler=sampler, uncertainty_weight=weight, generator=g)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return step


def count_flops(step) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def main() -> None:
    from patchforcing.utils.runtime import tune_cpu_allocator

    tune_cpu_allocator()  # same allocator settings as the CLI, for both models
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="B", help="model size letter (T, S, B, L, XL)")
    ap.add_argument("--patch", type=int, default=2)
    ap.add_argument("--input-size", type=int, default=32)
    ap.add_argument("--channels", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    names = [f"PFT-{args.size}/{args.patch}", f"SiT-{args.size}/{args.patch}"]
    models = {
        n: pf.create_model(n, input_size=args.input_size, in_channels=args.channels, num_classes=1000)
        .to(device)
        .train()
        for n in names
    }
    precisions = args.precisions.split(",")
    if not precisions or any(p not in ("fp32", "bf16") for p in precisions):
        raise SystemExit(f"--precisions {args.precisions!r}: give fp32, bf16 or both, comma-separated")
    peaks = {p: matmul_peak(torch.float32 if p == "fp32" else torch.bfloat16, device) for p in precisions}
    steps = {(n, p): make_step(models[n], args.batch_size, p, device) for n in names for p in precisions}
    flops = {n: count_flops(steps[(n, precisions[0])]) for n in names}  # the same FLOPs in every precision
    for s in steps.values():  # warm-up
        s()
    times: dict[tuple[str, str], list[float]] = {k: [] for k in steps}
    for _ in range(args.repeats):
        for k, s in steps.items():
            sync(device)
            t0 = time.perf_counter()
            s()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}

    cpu = cpu_model()
    machine = (
        f"{device.type}: {torch.cuda.get_device_name(device) if device.type == 'cuda' else cpu}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(f"machine: {machine}")
    print(
        f"model {names[0]} vs {names[1]}, input {args.channels}x{args.input_size}x{args.input_size}, batch {args.batch_size}, "
        f"{args.repeats} interleaved repeats (median)"
    )
    rows = []
    for p in precisions:
        print(f"matmul peak {p}: {peaks[p] / 1e9:.1f} GFLOP/s")
        for n in names:
            t = med[(n, p)]
            achieved = flops[n] / t
            rows.append((p, n, t * 1e3, args.batch_size / t, flops[n] / 1e9, achieved / 1e9, achieved / peaks[p]))
    print(
        f"{'prec':5s} {'model':10s} {'ms/step':>9s} {'img/s':>8s} {'GFLOP/step':>11s} {'GFLOP/s':>9s} {'of peak':>8s}"
    )
    for p, n, ms, ips, gf, gfs, frac in rows:
        print(f"{p:5s} {n:10s} {ms:9.1f} {ips:8.2f} {gf:11.2f} {gfs:9.1f} {frac:8.1%}")
    for p in precisions:
        print(f"PFT/SiT step-time ratio ({p}): {med[(names[0], p)] / med[(names[1], p)]:.3f}")
    if len(precisions) > 1:
        for n in names:
            print(f"{n} fp32/bf16 speed-up: {med[(n, 'fp32')] / med[(n, 'bf16')]:.2f}x")
    print(f"FLOPs PFT/SiT per step: {flops[names[0]] / flops[names[1]]:.3f} (per-token adaLN during training)")
    if args.markdown:
        print()
        print(
            f"Machine: {machine}. `python benchmarks/train_throughput.py --size {args.size} --batch-size {args.batch_size}`"
        )
        print()
        print("| precision | model | ms/step | images/s | GFLOP/step | GFLOP/s | of matmul peak |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for p, n, ms, ips, gf, gfs, frac in rows:
            print(f"| {p} | {n} | {ms:.1f} | {ips:.2f} | {gf:.2f} | {gfs:.1f} | {frac:.0%} |")
        print()
        print("| | " + " | ".join(precisions) + " |")
        print("|---|" + "---:|" * len(precisions))
        print(
            "| PFT/SiT step time | "
            + " | ".join(f"{med[(names[0], p)] / med[(names[1], p)]:.3f}" for p in precisions)
            + " |"
        )
        print("| matmul peak GFLOP/s | " + " | ".join(f"{peaks[p] / 1e9:.1f}" for p in precisions) + " |")


if __name__ == "__main__":
    main()
