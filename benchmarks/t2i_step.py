"""Text-to-image step benchmark: PFT-T2I vs the same-size SiT-T2I, inference and training.

Measures, in ONE run (so the ratios share the machine's state), round-robin over the repeats
(after a warm-up round) so that drifts in machine load hit all variants alike:

1. one network call (one inference step), captions of mixed lengths (key-padding masks):

   a. SiT-T2I-X/2, ``t`` ``(B,)``                                 -- the baseline
   b. PFT-T2I-X/2, ``t`` ``(B,)``                                 -- Euler step, shared conditioning
   c. PFT-T2I-X/2, ``t`` ``(B, N)`` with all-equal rows           -- same fast path after a row check
   d. PFT-T2I-X/2, look-ahead ``t``: 2 values per image           -- fast path via ``unique``
   e. as d with ``shared_conditioning = False``                  -- per-token modulation
   f. PFT-T2I-X/2, ``t`` ``(B, N)`` equal rows, per-token path

2. one training step (patch-flow loss, backward, gradient clipping, AdamW as the trainer builds it
   -- fused where ``optim.fused: auto`` fuses -- and the EMA update): PFT-T2I with LTG per-patch
   times (every token its own modulation) vs SiT-T2I with one uniform time per image; each step's
   FLOPs counted with ``torch.utils.flop_counter`` and stated as a share of the matmul peak
   (an n x n x n GEMM in the step's precision) measured in the same run.

Usage::

    python benchmarks/t2i_step.py                    # S/2, batch 8, 4x32x32 latents, 32 text tokens of width 384
    python benchmarks/t2i_step.py --size B --markdown
    python benchmarks/t2i_step.py --quick            # smoke run (T/2, few repeats)
    python benchmarks/t2i_step.py --size 1.2B --channels 32 --text-dim 2048 --text-len 256 \
        --batch-size 32 --device cuda --dtype bf16   # the paper's PFT-T2I-1.2B (a GPU)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import patchforcing as pf
from _common import matmul_peak, sync
from inference_step import Variant, autocast_ctx, lookahead_times, machine_info, randomize_, ratios
from patchforcing.conditioning import TextTokens
from patchforcing.training.ema import EMA
from patchforcing.training.speed import build_adamw, resolve_fused


def build_models(size: str, args, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    kw = dict(input_size=args.input_size, in_channels=args.channels, text_dim=args.text_dim)
    models = []
    for family in ("SiT", "PFT"):
        torch.manual_seed(args.seed)
        m = pf.create_model(model_name(family, size), **kw)
        models.append(randomize_(m, args.seed).to(device).eval())
    return models[0], models[1]


def model_name(family: str, size: str) -> str:
    """``("PFT", "S")`` -> ``"PFT-T2I-S/2"``; ``("PFT", "1.2B")`` -> ``"PFT-T2I-1.2B"``."""
    return f"{family}-T2I-{size}" if size == "1.2B" else f"{family}-T2I-{size}/2"


def make_text(B: int, L: int, dim: int, g: torch.Generator, device: torch.device) -> TextTokens:
    """Random captions of ``L / 2 .. L`` real tokens (one row always full length), mask True at real tokens."""
    lengths = torch.randint(L // 2, L + 1, (B,), generator=g)
    lengths[0] = L
    mask = torch.arange(L)[None] < lengths[:, None]
    tokens = torch.randn(B, L, dim, generator=g) * mask[..., None]
    return TextTokens(tokens.to(device), mask.to(device))


def bench_step(sit, pft, text, args, device) -> list[Variant]:
    B, N = args.batch_size, pft.num_patches
    g = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(B, args.channels, args.input_size, args.input_size, generator=g).to(device)
    t_img = (torch.rand(B, generator=g) * 0.9 + 0.05).to(device)
    t_rows = t_img[:, None].expand(B, N).contiguous()
    t_la = lookahead_times(B, N, g).to(device)
    variants = [
        Variant("a", "SiT-T2I, t (B,)", sit, t_img, True),
        Variant("b", "PFT-T2I, t (B,) [Euler, shared]", pft, t_img, True),
        Variant("c", "PFT-T2I, t (B,N) equal rows [shared]", pft, t_rows, True),
        Variant("d", "PFT-T2I, look-ahead t, 2 values/img [shared, unique]", pft, t_la, True),
        Variant("e", "PFT-T2I, look-ahead t [per-token]", pft, t_la, False),
        Variant("f", "PFT-T2I, t (B,N) equal rows [per-token]", pft, t_rows, False),
    ]

    with torch.inference_mode(), autocast_ctx(device, args.dtype):  # sanity: fast path == per-token path
        pft.shared_conditioning = True
        fast = pft(x, t_la, text)[0]
        pft.shared_conditioning = False
        slow = pft(x, t_la, text)[0]
        pft.shared_conditioning = True
    if not torch.equal(fast, slow):
        print(f"WARNING: shared vs per-token outputs differ by {(fast - slow).abs().max().item():.3g}", file=sys.stderr)

    def run(v: Variant) -> tuple[float, float]:
        v.model.shared_conditioning = v.shared
        sync(device)
        cpu0, start = time.process_time(), time.perf_counter()
        with autocast_ctx(device, args.dtype):
            out, _ = v.model(x, v.t, text)
        sync(device)
        if not torch.isfinite(out).all():
            raise RuntimeError(f"variant {v.key} produced non-finite output")
        return time.perf_counter() - start, time.process_time() - cpu0

    with torch.inference_mode():
        for r in range(args.warmup + args.repeats):
            for v in variants[r % len(variants) :] + variants[: r % len(variants)]:
                dt, cpu = run(v)
                if r >= args.warmup:
                    v.times.append(dt)
                    v.cpu.append(cpu)
            if args.verbose:
                print(f"  step round {r + 1}/{args.warmup + args.repeats}", file=sys.stderr, flush=True)
    pft.shared_conditioning = True
    return variants


def make_train_step(model, text, args, device):
    """One full training step (loss, backward, clipping, AdamW, EMA) on fixed random data."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_adamw(params, 1e-4, (0.9, 0.999), 1e-8, 0.0, fused=resolve_fused("auto", device))
    ema = EMA(model, 0.9999)
    g = torch.Generator(device=device).manual_seed(args.seed + 2)
    x1 = torch.randn(args.batch_size, args.channels, args.input_size, args.input_size, device=device, generator=g)
    sampler = "ltg" if model.per_patch_time else "uniform"
    weight = 0.01 if model.predict_uncertainty else 0.0

    def step() -> None:
        with autocast_ctx(device, args.dtype):
            terms = pf.patch_flow_loss(
                model, x1, text, timestep_sampler=sampler, uncertainty_weight=weight, generator=g
            )
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(model, 0)

    return step


def bench_train(sit, pft, text, args, device) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, int]]:
    """Wall and process-CPU seconds per training step of each model, and its FLOPs (one counted step)."""
    steps, flops = {}, {}
    for name, m in (("SiT-T2I", sit), ("PFT-T2I", pft)):
        m.train()
        steps[name] = make_train_step(m, text, args, device)
        with FlopCounterMode(display=False) as counter:
            steps[name]()
        flops[name] = counter.get_total_flops()
    times: dict[str, list[float]] = {k: [] for k in steps}
    cpu: dict[str, list[float]] = {k: [] for k in steps}
    names = list(steps)
    for r in range(args.warmup + args.train_repeats):
        for name in names[r % 2 :] + names[: r % 2]:
            sync(device)
            cpu0, start = time.process_time(), time.perf_counter()
            steps[name]()
            sync(device)
            if r >= args.warmup:
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - cpu0)
        if args.verbose:
            print(f"  train round {r + 1}/{args.warmup + args.train_repeats}", file=sys.stderr, flush=True)
    for m in (sit, pft):
        m.eval()
    return times, cpu, flops


def step_table(variants: list[Variant], markdown: bool) -> list[str]:
    base = variants[0]
    if markdown:
        lines = [
            "| variant | conditioning | median ms/step | min ms | ratio vs SiT-T2I (medians) | paired ratio | "
            "ratio of mins | CPU-time ratio |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
    else:
        lines = [
            f"{'':2} {'variant':56} {'median ms':>10} {'min':>9} {'vs SiT':>8} {'paired':>8} {'mins':>8} {'CPU':>8}"
        ]
    for v in variants:
        med, pair, best, cpu = ratios(v, base)
        ms, mn = 1e3 * statistics.median(v.times), 1e3 * min(v.times)
        if markdown:
            label, _, cond = v.label.partition(" [")
            lines.append(
                f"| ({v.key}) {label} | {cond.rstrip(']') or '-'} | {ms:.1f} | {mn:.1f} | {med:.3f}x | {pair:.3f}x | "
                f"{best:.3f}x | {cpu:.3f}x |"
            )
        else:
            lines.append(
                f"({v.key}) {v.label:56} {ms:10.1f} {mn:9.1f} {med:7.3f}x {pair:7.3f}x {best:7.3f}x {cpu:7.3f}x"
            )
    spread = max(base.times) / min(base.times)
    note = f"SiT-T2I max/min spread {spread:.2f}" + (" -- NOISY run: trust the paired ratio" if spread > 1.25 else "")
    lines.append(f"_{note}_" if markdown else note)
    return lines


def main(argv: list[str] | None = None) -> int:
    from patchforcing.utils.runtime import tune_cpu_allocator

    tune_cpu_allocator()  # same allocator settings as the CLI, for both models
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--size",
        default="S",
        choices=["T", "S", "B", "1.2B"],
        help="X in PFT-T2I-X/2 and SiT-T2I-X/2, or 1.2B (the paper's preset)",
    )
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--input-size", type=int, default=32, help="latent side (N = (side / 2)^2 tokens)")
    ap.add_argument("--channels", type=int, default=4)
    ap.add_argument("--text-dim", type=int, default=384, help="text-encoder width (MiniLM: 384)")
    ap.add_argument("--text-len", type=int, default=32, help="padded caption length L")
    ap.add_argument("--repeats", type=int, default=7, help="timed rounds over all inference variants")
    ap.add_argument("--train-repeats", type=int, default=5, help="timed training steps per model")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16 = autocast")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gemm-size", type=int, default=2048, help="n of the n x n x n peak GEMM")
    ap.add_argument("--quick", action="store_true", help="smoke run: T/2, batch 2, 2 repeats")
    ap.add_argument("--markdown", action="store_true", help="also print a Markdown section")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.batch_size, args.repeats, args.train_repeats = "T", 2, 2, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cmd = "python benchmarks/t2i_step.py " + " ".join(sys.argv[1:] if argv is None else argv)

    sit, pft = build_models(args.size, args, device)
    text = make_text(args.batch_size, args.text_len, args.text_dim, torch.Generator().manual_seed(args.seed), device)
    info = machine_info(device)
    t0 = time.perf_counter()
    variants = bench_step(sit, pft, text, args, device)
    train, train_cpu, flops = bench_train(sit, pft, text, args, device)
    peak = matmul_peak(torch.bfloat16 if args.dtype == "bf16" else torch.float32, device, args.gemm_size)
    total = time.perf_counter() - t0

    by = {v.key: v for v in variants}
    e_med, e_pair, e_min, e_cpu = ratios(by["b"], by["a"])
    t_sit, t_pft = statistics.median(train["SiT-T2I"]), statistics.median(train["PFT-T2I"])
    t_pair = statistics.median(p / s for p, s in zip(train["PFT-T2I"], train["SiT-T2I"]))
    t_min = min(train["PFT-T2I"]) / min(train["SiT-T2I"])
    t_cpu = statistics.median(train_cpu["PFT-T2I"]) / statistics.median(train_cpu["SiT-T2I"])
    n_sit, n_pft = (sum(p.numel() for p in m.parameters()) for m in (sit, pft))
    pft_name, sit_name = model_name("PFT", args.size), model_name("SiT", args.size)
    share = {k: flops[k] / statistics.median(train[k]) / peak for k in train}
    head = (
        f"{pft_name} ({n_pft:,} parameters) vs {sit_name} ({n_sit:,}), batch {args.batch_size}, "
        f"{args.channels}x{args.input_size}x{args.input_size} inputs ({pft.num_patches} tokens), captions of "
        f"{args.text_len // 2}-{args.text_len} tokens of width {args.text_dim}, {args.dtype} on {device.type}"
    )
    print(head)
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    print()
    print("\n".join(step_table(variants, markdown=False)))
    print(
        f"\nPFT-T2I Euler step / SiT-T2I step (b/a): {e_med:.3f}x medians, {e_pair:.3f}x paired, {e_min:.3f}x mins, "
        f"{e_cpu:.3f}x CPU time  [{'PASS' if e_pair <= 1.05 else 'FAIL'} (paired): bar 1.05x]"
    )
    print(
        f"training step: PFT-T2I {1e3 * t_pft:.1f} ms, SiT-T2I {1e3 * t_sit:.1f} ms: "
        f"{t_pft / t_sit:.3f}x medians, {t_pair:.3f}x paired, {t_min:.3f}x mins, {t_cpu:.3f}x CPU time"
    )
    print(
        f"FLOPs per training step (flop_counter, fwd + bwd): PFT-T2I {flops['PFT-T2I'] / 1e12:.3f} T, SiT-T2I "
        f"{flops['SiT-T2I'] / 1e12:.3f} T; {args.dtype} matmul peak ({args.gemm_size}^3 GEMM, same run) "
        f"{peak / 1e12:.2f} TFLOP/s; share of peak: PFT-T2I {share['PFT-T2I']:.1%}, SiT-T2I {share['SiT-T2I']:.1%}"
    )
    print(f"(total {total:.0f} s)")
    if args.markdown:
        md = [
            "## Text-to-image step: PFT-T2I vs SiT-T2I (issue 10)",
            "",
            f"`{cmd.strip()}`. Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()) + ".",
            "",
            head + "; random weights (init + N(0, 0.02) noise), `torch.inference_mode`, "
            f"{args.repeats} timed round-robin rounds after {args.warmup} warm-up round(s), medians.",
            "",
            *step_table(variants, markdown=True),
            "",
            f"Training step (loss, backward, clipping, AdamW, EMA; PFT-T2I with LTG per-patch times, SiT-T2I "
            f"with one uniform time per image), {args.train_repeats} interleaved steps each; TFLOP per step "
            f"counted with flop_counter; 'of peak' = achieved FLOP/s over the {args.dtype} matmul peak of this run "
            f"({peak / 1e12:.2f} TFLOP/s, {args.gemm_size}^3 GEMM):",
            "",
            "| model | median ms/step | min ms | images/s | TFLOP/step | of peak | ratio (medians) | paired | "
            "ratio of mins | CPU-time ratio |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| {sit_name} | {1e3 * t_sit:.1f} | {1e3 * min(train['SiT-T2I']):.1f} | "
            f"{args.batch_size / t_sit:.2f} | {flops['SiT-T2I'] / 1e12:.3f} | {share['SiT-T2I']:.1%} | "
            "1.000x | 1.000x | 1.000x | 1.000x |",
            f"| {pft_name} | {1e3 * t_pft:.1f} | {1e3 * min(train['PFT-T2I']):.1f} | "
            f"{args.batch_size / t_pft:.2f} | {flops['PFT-T2I'] / 1e12:.3f} | {share['PFT-T2I']:.1%} | "
            f"{t_pft / t_sit:.3f}x | {t_pair:.3f}x | {t_min:.3f}x | {t_cpu:.3f}x |",
        ]
        print("\n" + "\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
