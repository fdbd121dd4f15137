"""Inference-step benchmark: PFT vs the same-size SiT, and the adaptive samplers' overhead.

Measures, in ONE run (so the ratios share the machine's state):

1. the time of one network call (one inference step) for

   a. SiT-X/2, ``t`` ``(B,)``                                  -- the baseline
   b. PFT-X/2, ``t`` ``(B,)``                                  -- Euler step, shared conditioning
   c. PFT-X/2, ``t`` ``(B, N)`` with all-equal rows            -- same fast path after a row check
   d. PFT-X/2, look-ahead ``t``: 2 values per image            -- fast path via ``unique``
      (40 % of the patches at 0.7, the rest at 0.5)
   e. as d with ``shared_conditioning = False``               -- per-token path (authors' style)
   f. PFT-X/2, ``t`` ``(B, N)`` all-equal, per-token path      -- authors'-style Euler step

   The variants run round-robin over the repeats (after a warm-up round) so that drifts in
   machine load hit all of them alike; the table reports the median ms per call and its ratio
   to the SiT median.

2. whole-sampler runs at equal NFE on the same PFT (``euler_pf``, ``dual_loop``,
   ``look_ahead``): images/s and the share of the wall time spent outside network calls, measured
   with a proxy that accumulates the time spent inside the model's forward.

Usage::

    python benchmarks/inference_step.py                      # B/2, batch 8, 7 repeats, CPU fp32
    python benchmarks/inference_step.py --model-size S --batch-size 4 --markdown
    python benchmarks/inference_step.py --device cuda --dtype bf16
    python benchmarks/inference_step.py --quick               # smoke run (T/2, few repeats)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
from typing import Any

import torch

import patchforcing as pf
from _common import cpu_model, markdown_header, sync

# --------------------------------------------------------------------------------------------
# Setup helpers
# --------------------------------------------------------------------------------------------


def machine_info(device: torch.device) -> dict[str, str]:
    info = {
        "cpu": cpu_model(),
        "cores": str(os.cpu_count()),
        "torch": torch.__version__,
        "threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
    }
    try:
        info["load avg (1 min)"] = f"{os.getloadavg()[0]:.2f}"
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def randomize_(model: torch.nn.Module, seed: int, std: float = 0.02) -> torch.nn.Module:
    """Add small normal noise to every trainable parameter (zero init gives trivial outputs).

    The adaLN and final layers are zero-initialised, which makes ``v = 0`` and ``logvar = 0`` and
    would let the samplers' masks degenerate; noise makes every path do real arithmetic.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p) * std)
    return model


def build_models(size: str, device: torch.device, seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    kw: dict[str, Any] = dict(input_size=32, in_channels=4, num_classes=1000)
    torch.manual_seed(seed)
    sit = pf.create_model(f"SiT-{size}/2", **kw)
    torch.manual_seed(seed)
    pft = pf.create_model(f"PFT-{size}/2", **kw)
    for m in (sit, pft):
        randomize_(m, seed)
        m.to(device).eval()
    return sit, pft


def autocast_ctx(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------------
# 1. One inference step
# --------------------------------------------------------------------------------------------


def lookahead_times(
    B: int, N: int, g: torch.Generator, frac: float = 0.4, hi: float = 0.7, lo: float = 0.5
) -> torch.Tensor:
    """``(B, N)`` times: a random ``frac`` of each image's patches at ``hi``, the rest at ``lo``."""
    n_hi = int(round(frac * N))
    t = torch.full((B, N), lo)
    for b in range(B):
        t[b, torch.randperm(N, generator=g)[:n_hi]] = hi
    return t


class Variant:
    def __init__(self, key: str, label: str, model: torch.nn.Module, t: torch.Tensor, shared: bool):
        self.key, self.label, self.model, self.t, self.shared = key, label, model, t, shared
        self.times: list[float] = []  # wall seconds per call
        self.cpu: list[float] = []  # process CPU seconds per call (all threads)


def bench_step(sit, pft, args, device) -> list[Variant]:
    B = args.batch_size
    N = pft.num_patches
    g = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(B, 4, 32, 32, generator=g).to(device)
    y = torch.randint(0, 1000, (B,), generator=g).to(device)
    t_img = (torch.rand(B, generator=g) * 0.9 + 0.05).to(device)
    t_rows = t_img[:, None].expand(B, N).contiguous()
    t_la = lookahead_times(B, N, g).to(device)

    variants = [
        Variant("a", "SiT, t (B,)", sit, t_img, True),
        Variant("b", "PFT, t (B,) [Euler, shared]", pft, t_img, True),
        Variant("c", "PFT, t (B,N) equal rows [shared]", pft, t_rows, True),
        Variant("d", "PFT, look-ahead t, 2 values/img [shared, unique]", pft, t_la, True),
        Variant("e", "PFT, look-ahead t [per-token]", pft, t_la, False),
        Variant("f", "PFT, t (B,N) equal rows [per-token, authors']", pft, t_rows, False),
    ]

    def run(v: Variant) -> tuple[float, float]:
        v.model.shared_conditioning = v.shared
        sync(device)
        cpu0, start = time.process_time(), time.perf_counter()
        with autocast_ctx(device, args.dtype):
            out, _ = v.model(x, v.t, y)
        sync(device)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu0
        if not torch.isfinite(out).all():
            raise RuntimeError(f"variant {v.key} produced non-finite output")
        return elapsed, cpu

    # sanity: the fast paths give the per-token numbers
    with torch.inference_mode(), autocast_ctx(device, args.dtype):
        pft.shared_conditioning = True
        v_fast, lv_fast = pft(x, t_la, y)
        pft.shared_conditioning = False
        v_slow, lv_slow = pft(x, t_la, y)
        pft.shared_conditioning = True
    tol = 1e-4 if args.dtype == "fp32" else 5e-2
    diff = max((v_fast - v_slow).abs().max().item(), (lv_fast - lv_slow).abs().max().item())
    scale = v_slow.abs().max().item()
    if diff > tol * max(1.0, scale):
        print(f"WARNING: shared vs per-token outputs differ by {diff:.3g} (scale {scale:.3g})", file=sys.stderr)

    total = args.warmup + args.repeats
    with torch.inference_mode():
        for r in range(total):
            # rotate the starting variant each round so no variant always runs first / last
            order = variants[r % len(variants) :] + variants[: r % len(variants)]
            for v in order:
                dt, cpu = run(v)
                if r >= args.warmup:
                    v.times.append(dt)
                    v.cpu.append(cpu)
            if args.verbose:
                print(f"  round {r + 1}/{total} done", file=sys.stderr, flush=True)
    pft.shared_conditioning = True
    return variants


# --------------------------------------------------------------------------------------------
# 2. Whole samplers: images/s and the time outside network calls
# --------------------------------------------------------------------------------------------


class TimedModel:
    """A callable proxy that accumulates the wall time spent inside the wrapped model's forward.

    Every attribute the samplers read (``patch_size``, ``num_patches``, ``in_channels``,
    ``image_size``, ``num_classes``, ``predict_uncertainty``, ``per_patch_time`` ...) is forwarded
    to the wrapped model.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, dtype: str):
        self.__dict__["_model"] = model
        self.__dict__["_device"] = device
        self.__dict__["_dtype"] = dtype
        self.__dict__["seconds"] = 0.0
        self.__dict__["calls"] = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_model"], name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        device = self.__dict__["_device"]
        sync(device)
        start = time.perf_counter()
        with autocast_ctx(device, self.__dict__["_dtype"]):
            out = self.__dict__["_model"](*args, **kwargs)
        sync(device)
        self.__dict__["seconds"] += time.perf_counter() - start
        self.__dict__["calls"] += 1
        return out

    def reset(self) -> None:
        self.__dict__["seconds"] = 0.0
        self.__dict__["calls"] = 0


def bench_samplers(pft, args, device) -> list[dict[str, Any]]:
    B = args.sampler_batch
    g = torch.Generator().manual_seed(args.seed + 2)
    noise = torch.randn(B, 4, 32, 32, generator=g).to(device)
    y = torch.randint(0, 1000, (B,), generator=g).to(device)
    proxy = TimedModel(pft, device, args.dtype)
    names = ["euler_pf", "dual_loop", "look_ahead"]
    results = {n: {"sampler": n, "seconds": [], "model_s": [], "overhead": []} for n in names}
    pft.shared_conditioning = True
    with torch.inference_mode():
        # warm-up: a short run of each sampler (allocator, one-time kernels)
        for n in names:
            pf.sample(proxy, noise, sampler=n, nfe=4, y=y)
        for r in range(args.sampler_repeats):
            order = names[r % len(names) :] + names[: r % len(names)]
            for n in order:
                proxy.reset()
                res = pf.sample(proxy, noise, sampler=n, nfe=args.nfe, y=y, cfg_scale=1.0)
                if proxy.calls != res.calls:
                    raise RuntimeError(f"{n}: proxy saw {proxy.calls} calls, sampler reports {res.calls}")
                d = results[n]
                d.update(calls=res.calls, nfe=res.nfe, steps=res.steps)
                d["seconds"].append(res.seconds)
                d["model_s"].append(proxy.seconds)
                d["overhead"].append((res.seconds - proxy.seconds) / res.seconds)
    rows = []
    for n in names:
        d = results[n]
        sec = statistics.median(d["seconds"])
        rows.append(
            dict(
                sampler=n,
                steps=d["steps"],
                calls=d["calls"],
                nfe=d["nfe"],
                seconds=sec,
                images_per_s=B / sec,
                ms_per_call=1e3 * statistics.median(d["model_s"]) / d["calls"],
                overhead=statistics.median(d["overhead"]),
                overhead_max=max(d["overhead"]),
                outside_ms=1e3 * statistics.median(s - m for s, m in zip(d["seconds"], d["model_s"])),
            )
        )
    return rows


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def ratios(v: Variant, base: Variant) -> tuple[float, float, float, float]:
    """``(median / median, median of per-round ratios, min / min, CPU median / median)``.

    All of ``v`` against ``base``; the last one uses process CPU time instead of wall time
    (less sensitive to being descheduled by other processes, but it counts OpenMP spin-waits).

    The per-round ratio pairs each call with the SiT call of the same round (a few seconds
    apart), which cancels slow drifts of the machine's load; the min ratio compares the least
    disturbed calls. On a quiet machine the three agree; when they do not, the run was noisy.
    """
    med = statistics.median(v.times) / statistics.median(base.times)
    paired = statistics.median(a / b for a, b in zip(v.times, base.times))
    best = min(v.times) / min(base.times)
    cpu = statistics.median(v.cpu) / statistics.median(base.cpu)
    return med, paired, best, cpu


def step_table(variants: list[Variant], markdown: bool) -> str:
    base = variants[0]
    lines = []
    if markdown:
        lines.append(
            "| variant | conditioning | median ms/step | min ms | max ms | ratio vs SiT (medians) "
            "| paired ratio (median) | ratio of mins | CPU-time ratio |"
        )
        lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    else:
        lines.append(
            f"{'':2} {'variant':52} {'median ms':>10} {'min':>9} {'max':>9} {'vs SiT':>8} "
            f"{'paired':>8} {'mins':>8} {'CPU':>8}"
        )
    for v in variants:
        med = statistics.median(v.times)
        r_med, r_pair, r_min, r_cpu = ratios(v, base)
        if markdown:
            label, _, cond = v.label.partition(" [")
            cond = cond.rstrip("]") or "-"
            lines.append(
                f"| ({v.key}) {label} | {cond} | {1e3 * med:.1f} | {1e3 * min(v.times):.1f} | "
                f"{1e3 * max(v.times):.1f} | {r_med:.3f}x | {r_pair:.3f}x | {r_min:.3f}x | {r_cpu:.3f}x |"
            )
        else:
            lines.append(
                f"({v.key}) {v.label:52} {1e3 * med:10.1f} {1e3 * min(v.times):9.1f} "
                f"{1e3 * max(v.times):9.1f} {r_med:7.3f}x {r_pair:7.3f}x {r_min:7.3f}x {r_cpu:7.3f}x"
            )
    spread = max(base.times) / min(base.times)
    note = f"SiT max/min spread {spread:.2f}" + (
        " -- NOISY run (machine busy?): trust the paired ratio and the ratio of mins" if spread > 1.25 else ""
    )
    lines.append("" if not markdown else "")
    lines.append(note if not markdown else f"_{note}_")
    return "\n".join(lines)


def sampler_table(rows: list[dict[str, Any]], B: int, markdown: bool) -> str:
    lines = []
    if markdown:
        lines.append("| sampler | steps | calls | NFE/img | wall s | images/s | ms/call | outside network |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    else:
        lines.append(
            f"{'sampler':12} {'steps':>5} {'calls':>5} {'NFE':>4} {'wall s':>8} {'img/s':>8} "
            f"{'ms/call':>8} {'outside net':>12} {'(worst)':>8}"
        )
    for r in rows:
        if markdown:
            lines.append(
                f"| {r['sampler']} | {r['steps']} | {r['calls']} | {r['nfe']} | {r['seconds']:.2f} | "
                f"{r['images_per_s']:.3f} | {r['ms_per_call']:.1f} | {100 * r['overhead']:.2f} % "
                f"({r['outside_ms']:.1f} ms) |"
            )
        else:
            lines.append(
                f"{r['sampler']:12} {r['steps']:5d} {r['calls']:5d} {r['nfe']:4d} {r['seconds']:8.2f} "
                f"{r['images_per_s']:8.3f} {r['ms_per_call']:8.1f} {100 * r['overhead']:11.2f}% "
                f"{100 * r['overhead_max']:7.2f}%"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from patchforcing.utils.runtime import tune_cpu_allocator

    tune_cpu_allocator()  # same allocator settings as the CLI, for both models
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model-size", default="B", choices=["T", "S", "B"], help="X in PFT-X/2 and SiT-X/2")
    ap.add_argument("--batch-size", type=int, default=8, help="batch of the single-step timings")
    ap.add_argument("--repeats", type=int, default=7, help="timed rounds over all step variants")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds before the timed ones")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--nfe", type=int, default=24, help="NFE budget per image of the sampler runs")
    ap.add_argument("--sampler-batch", type=int, default=2, help="batch of the sampler runs")
    ap.add_argument("--sampler-repeats", type=int, default=3, help="runs of each sampler (median)")
    ap.add_argument("--no-samplers", action="store_true", help="skip the whole-sampler part")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16 = autocast")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="smoke run: T/2, batch 2, 2 repeats, nfe 8")
    ap.add_argument("--markdown", action="store_true", help="also print a Markdown section")
    ap.add_argument("--verbose", action="store_true", help="progress on stderr")
    args = ap.parse_args(argv)

    if args.quick:
        args.model_size, args.batch_size, args.repeats, args.warmup = "T", 2, 2, 1
        args.nfe, args.sampler_batch, args.sampler_repeats = 8, 1, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available")
    if args.dtype == "bf16" and device.type == "cpu" and not torch.backends.mkldnn.is_available():
        print("note: bf16 autocast on this CPU may be slow (no oneDNN)", file=sys.stderr)
    torch.manual_seed(args.seed)

    sit, pft = build_models(args.model_size, device, args.seed)
    info = machine_info(device)
    size = args.model_size
    cmd = "python benchmarks/inference_step.py " + " ".join(sys.argv[1:] if argv is None else argv)

    t0 = time.perf_counter()
    variants = bench_step(sit, pft, args, device)
    t_step = time.perf_counter() - t0
    rows = [] if args.no_samplers else bench_samplers(pft, args, device)
    t_total = time.perf_counter() - t0

    by = {v.key: v for v in variants}
    euler_ratio, euler_paired, euler_min, euler_cpu = ratios(by["b"], by["a"])
    saving_la = ratios(by["e"], by["d"])[1]
    saving_euler = ratios(by["f"], by["b"])[1]
    worst_overhead = max((r["overhead"] for r in rows if r["sampler"] != "euler_pf"), default=float("nan"))

    print(
        f"Inference step: PFT-{size}/2 vs SiT-{size}/2, batch {args.batch_size}, 32x32x4 latents, "
        f"{args.dtype} on {device.type}, {args.repeats} timed rounds (+{args.warmup} warm-up), round-robin"
    )
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    print()
    print(step_table(variants, markdown=False))
    print()
    print(
        f"PFT Euler step / SiT step (b/a): {euler_ratio:.3f}x medians, {euler_paired:.3f}x paired, "
        f"{euler_min:.3f}x mins, {euler_cpu:.3f}x CPU time  [{'PASS' if euler_paired <= 1.05 else 'FAIL'} (paired): bar 1.05x]"
    )
    print(f"per-token / shared (paired): Euler (f/b) {saving_euler:.3f}x, look-ahead (e/d) {saving_la:.3f}x")
    if rows:
        print()
        print(f"Samplers at NFE {args.nfe}, batch {args.sampler_batch}, PFT-{size}/2 (shared conditioning):")
        print(sampler_table(rows, args.sampler_batch, markdown=False))
        print(
            f"adaptive samplers' time outside network calls: worst {100 * worst_overhead:.2f} % "
            f"[{'PASS' if worst_overhead < 0.03 else 'FAIL'}: bar 3 %]"
        )
    try:
        load_end = f", load avg (1 min) at the end {os.getloadavg()[0]:.2f}"
    except OSError:
        load_end = ""
    print(f"\n(step part {t_step:.0f} s, total {t_total:.0f} s{load_end})")

    if args.markdown:
        md = markdown_header("Inference step: PFT vs SiT (issue 2)", cmd, info) + [
            f"One forward call, PFT-{size}/2 vs SiT-{size}/2, batch {args.batch_size}, 32x32x4 inputs, "
            f"{args.dtype}, `torch.inference_mode`, random weights; {args.repeats} timed round-robin "
            f"rounds after {args.warmup} warm-up round(s), medians.",
            "",
            step_table(variants, markdown=True),
            "",
        ]
        if rows:
            md += [
                f"Whole samplers, PFT-{size}/2, NFE {args.nfe} per image, batch {args.sampler_batch} "
                f"(outside network = (wall - time inside model forward) / wall):",
                "",
                sampler_table(rows, args.sampler_batch, markdown=True),
                "",
            ]
        print("\n" + "\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
