"""Token-caching benchmark: wall-clock of cached vs dense sampling, next to the FLOP ratio (issue 13).

For each model (default PFT-B/2 on 4x32x32 latents and PFT-T/4 on 3x32x32 pixels, random
weights, batch 8) it runs one sampler (default ``euler_pf``, 20 steps, no guidance) densely and
with ``pf.TokenCache(active=A, refresh_every=R)`` for each ``A`` in ``--active`` (default 0.5 and
0.25, refresh 4). The variants run round-robin over the repeats (after a warm-up round), so drifts
of the machine's load hit all of them alike; the table reports the median wall time of a run, the
speed-up over dense (median of per-round ratios), and the FLOP ratio ``full_flops / token_flops``
(what a perfect implementation would gain).

Where the time goes (one extra, profiled run per variant, ``torch.profiler``, self CPU time of
every op): the share in matmuls and attention kernels (``addmm``, ``mm``, ``bmm``, convolution,
SDPA), the share in the cache's bookkeeping (``gather``, ``scatter``, ``index``, ``nonzero``,
``sort``: choosing the active tokens, gathering their inputs, scattering keys, values and outputs),
and the rest (norms, activations, modulation, copies). The profiler's own overhead inflates the
small ops a little, so the shares are an upper bound on the time outside matmuls.

Usage::

    python benchmarks/token_cache.py                    # PFT-B/2 and PFT-T/4, batch 8, 5 repeats
    python benchmarks/token_cache.py --markdown          # also a Markdown section for RESULTS.md
    python benchmarks/token_cache.py --quick             # smoke run: tiny sizes, 1 repeat
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

import patchforcing as pf
from _common import markdown_header
from inference_step import machine_info, randomize_

#: ops whose self time counts as matmul / attention work
MATMUL_OPS = ("addmm", "aten::mm", "bmm", "convolution", "scaled_dot_product", "aten::linear", "baddbmm")
#: ops that are the token cache's bookkeeping
CACHE_OPS = ("gather", "scatter", "aten::index", "nonzero", "sort", "argsort", "masked_select")


@dataclass
class Variant:
    name: str
    cache: pf.TokenCache | None
    seconds: list[float] = field(default_factory=list)
    result: Any = None
    shares: dict[str, float] = field(default_factory=dict)


def parse_models(text: str) -> list[tuple[str, int]]:
    """``"PFT-B/2:4,PFT-T/4:3"`` -> ``[("PFT-B/2", 4), ("PFT-T/4", 3)]`` (name : input channels)."""
    out = []
    for item in text.split(","):
        name, _, channels = item.strip().partition(":")
        out.append((name, int(channels or 4)))
    return out


def profile_shares(fn) -> dict[str, float]:
    """Shares of self CPU time: matmuls, cache bookkeeping, the rest (summing to 1)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    total = mat = book = 0.0
    for evt in prof.key_averages():
        t = evt.self_cpu_time_total
        total += t
        if any(k in evt.key for k in MATMUL_OPS):
            mat += t
        elif any(k in evt.key for k in CACHE_OPS):
            book += t
    total = max(total, 1e-9)
    return {"matmul": mat / total, "cache": book / total, "other": (total - mat - book) / total}


def bench_model(name: str, channels: int, args: argparse.Namespace) -> tuple[list[Variant], dict[str, Any]]:
    torch.manual_seed(args.seed)
    size = args.size
    model = pf.create_model(name, input_size=size, in_channels=channels, num_classes=1000)
    randomize_(model, args.seed).eval()
    g = torch.Generator().manual_seed(args.seed + 1)
    noise = torch.randn(args.batch_size, channels, size, size, generator=g)
    y = torch.randint(0, 1000, (args.batch_size,), generator=g)
    variants = [Variant("dense", None)] + [
        Variant(f"cached {a:g}", pf.TokenCache(active=a, refresh_every=args.refresh, select=args.select))
        for a in args.active
    ]

    def run(v: Variant):
        return pf.sample(model, noise, args.sampler, steps=args.steps, y=y, cache=v.cache)

    with torch.inference_mode():
        for r in range(args.warmup + args.repeats):
            order = variants[r % len(variants) :] + variants[: r % len(variants)]
            for v in order:
                t0 = time.perf_counter()
                v.result = run(v)
                if r >= args.warmup:
                    v.seconds.append(time.perf_counter() - t0)
            if args.verbose:
                print(f"  {name}: round {r + 1}/{args.warmup + args.repeats}", file=sys.stderr, flush=True)
        if not args.no_profile:
            for v in variants:
                v.shares = profile_shares(lambda v=v: run(v))
    p = model.patch_size
    info = {"tokens": (size // p) ** 2, "params": sum(t.numel() for t in model.parameters())}
    return variants, info


def table(name: str, channels: int, variants: list[Variant], info: dict[str, Any], args, markdown: bool) -> str:
    dense = variants[0]
    head = [
        "variant",
        "active tokens",
        "calls",
        "median s/run",
        "wall speed-up",
        "FLOP speed-up",
        "token GFLOP/img",
        "matmul share",
        "cache ops share",
        "other share",
    ]
    rows = []
    for v in variants:
        res = v.result
        n = info["tokens"] if v.cache is None else v.cache.count(info["tokens"])
        speed = statistics.median(d / s for d, s in zip(dense.seconds, v.seconds))
        flop = res.full_flops / res.token_flops
        sh = v.shares
        rows.append(
            [
                v.name,
                f"{n}/{info['tokens']}",
                str(res.calls),
                f"{statistics.median(v.seconds):.3f}",
                f"{speed:.2f}x",
                f"{flop:.2f}x",
                f"{res.token_flops / args.batch_size / 1e9:.2f}",
                *(f"{100 * sh[k]:.1f} %" if sh else "-" for k in ("matmul", "cache", "other")),
            ]
        )
    title = (
        f"{name}, {channels}x{args.size}x{args.size}, batch {args.batch_size}, {args.sampler} {args.steps} steps, "
        f"refresh every {args.refresh}, select {args.select}"
    )
    if markdown:
        lines = [f"**{title}**", "", "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    return "\n".join([title, fmt.format(*head)] + [fmt.format(*r) for r in rows])


def main(argv: list[str] | None = None) -> int:
    from patchforcing.utils.runtime import tune_cpu_allocator

    tune_cpu_allocator()
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", default="PFT-B/2:4,PFT-T/4:3", help="NAME:CHANNELS, comma-separated")
    ap.add_argument("--size", type=int, default=32, help="input height = width")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--sampler", default="euler_pf")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--active", type=float, nargs="+", default=[0.5, 0.25])
    ap.add_argument("--refresh", type=int, default=4, help="refresh_every")
    ap.add_argument("--select", default="uncertainty", choices=["uncertainty", "random"])
    ap.add_argument("--repeats", type=int, default=5, help="timed round-robin rounds")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--no-profile", action="store_true", help="skip the profiled runs (time shares)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="smoke run: PFT-T/4 on 16x16, batch 2, 3 steps, 1 repeat")
    ap.add_argument("--markdown", action="store_true", help="also print a Markdown section")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.size, args.batch_size, args.steps = "PFT-T/4:3", 16, 2, 3
        args.repeats, args.warmup = 1, 0
    if args.threads:
        torch.set_num_threads(args.threads)
    cmd = "python benchmarks/token_cache.py " + " ".join(sys.argv[1:] if argv is None else argv)
    info = machine_info(torch.device("cpu"))
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    t0 = time.perf_counter()
    tables = []
    for name, channels in parse_models(args.models):
        variants, minfo = bench_model(name, channels, args)
        tables.append((name, channels, variants, minfo))
        print()
        print(table(name, channels, variants, minfo, args, markdown=False))
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")
    if args.markdown:
        md = markdown_header("Token caching: wall-clock vs FLOPs (issue 13)", cmd, info) + [
            f"Random weights, fp32, `torch.inference_mode`, {args.repeats} timed round-robin rounds after "
            f"{args.warmup} warm-up round(s); wall speed-up = median of per-round dense/cached ratios; FLOP "
            "speed-up = full_flops / token_flops; shares = self CPU time of one profiled run (matmul: addmm, mm, "
            "bmm, convolution, SDPA; cache ops: gather, scatter, index, nonzero, sort).",
            "",
        ]
        for name, channels, variants, minfo in tables:
            md += [table(name, channels, variants, minfo, args, markdown=True), ""]
        print("\n" + "\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
