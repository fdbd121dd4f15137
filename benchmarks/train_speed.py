"""Training-step speed options: bf16 autocast, the attention kernel, fused AdamW, torch.compile.

One run measures, interleaved (every round runs every model x variant once, so that a busy machine
slows all alike) and as medians over the rounds, the full training step as the trainer takes it:
label dropout, ``patch_flow_loss`` (LTG per-patch times for PFT, uniform per-image times for SiT),
backward, gradient clipping at 1.0, the AdamW step and the EMA update, on fixed random data.

A variant is ``+``-joined options over the baseline ``fp32`` (fp32, SDPA, AdamW's default multi-tensor
``foreach`` kernel, eager): ``bf16`` (bf16 autocast), ``math`` (attention as explicit matmuls with the
softmax in fp32, ``patchforcing.models.attention``), ``fused`` (``AdamW(fused=True)``), ``compile``
(``torch.compile`` of the model, as ``train.compile`` does). The default list is the baseline, each option
alone (in fp32 and in bf16) and the combinations. The matmul peak (large square GEMMs, fp32 and bf16)
is measured inside every round too, and each step's FLOPs are counted once with
``torch.utils.flop_counter``, so every row states its step time as a share of this machine's peak.
A second table times the attention kernel alone (forward + backward at the model's shapes), with one
more variant for information: the softmax in bf16 (``math-lp``).

    python benchmarks/train_speed.py --markdown                       # PFT-T/4 vs SiT-T/4, 3x32x32, batch 64
    python benchmarks/train_speed.py --model PFT-B/2 --channels 4 --batch-size 8 --markdown
    python benchmarks/train_speed.py --quick                          # a tiny check (seconds, plus compile)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch.utils.flop_counter import FlopCounterMode

import patchforcing as pf
from _common import cpu_model, sync
from patchforcing.flow.loss import patch_flow_loss
from patchforcing.flow.timesteps import make_timestep_sampler
from patchforcing.models.attention import attention, set_attention_kernel
from patchforcing.training.ema import EMA
from patchforcing.training.speed import build_adamw
from patchforcing.training.trainer import apply_label_dropout, step_generator
from patchforcing.utils.compile import CPU_FALLBACK_OPTIONS, checked_compile
from patchforcing.utils.devices import cpu_has_native_bf16

DEFAULT_VARIANTS = (
    "fp32,fp32+math,fp32+fused,fp32+compile,"
    "bf16,bf16+math,bf16+fused,bf16+compile,"
    "bf16+math+fused,bf16+math+fused+compile,fp32+fused+compile"
)
QUICK_VARIANTS = "fp32,fp32+fused,bf16,bf16+math,bf16+math+fused,bf16+math+fused+compile"


# --------------------------------------------------------------------------------------------
# variants
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One setting of the training step."""

    precision: str = "fp32"  # fp32 | bf16 (autocast)
    attention: str = "sdpa"  # sdpa | math
    fused: bool = False  # AdamW(fused=True) instead of the default foreach kernel
    compile: bool = False  # torch.compile(model)

    @property
    def name(self) -> str:
        parts = [self.precision]
        if self.attention != "sdpa":
            parts.append(self.attention)
        if self.fused:
            parts.append("fused")
        if self.compile:
            parts.append("compile")
        return "+".join(parts)

    @classmethod
    def parse(cls, text: str) -> Variant:
        """``"bf16+math+fused"`` -> Variant; tokens: fp32, bf16, sdpa, math, foreach, fused, eager, compile."""
        v = cls()
        for tok in text.strip().lower().split("+"):
            if tok in ("fp32", "bf16"):
                v = replace(v, precision=tok)
            elif tok in ("sdpa", "math"):
                v = replace(v, attention=tok)
            elif tok in ("foreach", "fused"):
                v = replace(v, fused=tok == "fused")
            elif tok in ("eager", "compile"):
                v = replace(v, compile=tok == "compile")
            else:
                raise SystemExit(
                    f"variant {text!r}: unknown option {tok!r} (use fp32, bf16, sdpa, math, foreach, fused, eager, compile)"
                )
        return v


# --------------------------------------------------------------------------------------------
# the machine
# --------------------------------------------------------------------------------------------


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def machine_line(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        flags = cpu_flags()
        amx = "yes" if "amx_bf16" in flags else "no"
        avx = "yes" if "avx512_bf16" in flags else "no"
        native = "yes" if cpu_has_native_bf16() else "no (emulated)"
        name = f"{cpu_model()} (AMX-BF16: {amx}, AVX512-BF16: {avx}, native bf16: {native})"
    return f"{device.type}: {name}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


class Gemm:
    """An ``n x n x n`` matmul in ``dtype``; ``flops / time`` is this machine's matmul peak."""

    def __init__(self, dtype: torch.dtype, device: torch.device, n: int):
        self.a = torch.randn(n, n, device=device, dtype=dtype)
        self.b = torch.randn(n, n, device=device, dtype=dtype)
        self.flops = 2 * n**3
        for _ in range(2):
            self()

    def __call__(self):
        return self.a @ self.b


# --------------------------------------------------------------------------------------------
# the training step
# --------------------------------------------------------------------------------------------


class _View:
    """``forward(x, t, y)`` through the (compiled) wrapper, attributes from the raw network (as the trainer)."""

    def __init__(self, forward: Callable, raw: torch.nn.Module):
        self._forward, self._raw = forward, raw

    def __call__(self, *args, **kwargs):
        return self._forward(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._raw, name)


class Bench:
    """One network with its data, EMA, both AdamW kernels and a compiled forward; ``step(variant)``
    takes one full training step. The variants share the weights (their optimiser states are
    separate for foreach and fused): the timings do not depend on the values."""

    def __init__(self, name: str, args: argparse.Namespace, device: torch.device, overrides: dict):
        torch.manual_seed(0)
        self.name, self.device = name, device
        self.model = (
            pf.create_model(
                name, input_size=args.input_size, in_channels=args.channels, num_classes=args.num_classes, **overrides
            )
            .to(device)
            .train()
        )
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opts = {f: build_adamw(params, 1e-4, (0.9, 0.999), 1e-8, 0.0, fused=f) for f in (False, True)}
        self.ema = EMA(self.model, 0.9999)
        self.compiled = None
        g = torch.Generator(device=device).manual_seed(0)
        self.x = torch.randn(
            args.batch_size, args.channels, args.input_size, args.input_size, device=device, generator=g
        )
        self.y = torch.randint(0, args.num_classes, (args.batch_size,), device=device, generator=g)
        self.sampler = make_timestep_sampler("ltg" if self.model.per_patch_time else "uniform")
        self.k = 0

    def forward_for(self, v: Variant):
        if not v.compile:
            return _View(self.model, self.model)
        if self.compiled is None:  # as the trainer compiles: checked against eager first (utils/compile.py)

            def probe(fn):
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=v.precision == "bf16"):
                    g = torch.Generator(device=self.device).manual_seed(0)
                    terms = patch_flow_loss(
                        _View(fn, self.model), self.x, self.y, timestep_sampler=self.sampler, generator=g
                    )
                terms["loss"].backward()

            fallbacks = CPU_FALLBACK_OPTIONS if self.device.type == "cpu" else ()
            self.compiled, check = checked_compile(self.model, probe, fallbacks=fallbacks)
            print(f"{self.name}: {check.describe()}", file=sys.stderr)
        return _View(self.compiled, self.model)

    def step(self, v: Variant) -> float:
        set_attention_kernel(self.model, v.attention)
        opt = self.opts[v.fused]
        g = step_generator(0, self.k, 0, self.device)
        y = apply_label_dropout(self.y, 0.1, self.model.num_classes, g)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=v.precision == "bf16"):
            terms = patch_flow_loss(
                self.forward_for(v), self.x, y, timestep_sampler=self.sampler, uncertainty_weight=0.01, generator=g
            )
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        opt.step()
        self.ema.update(self.model, self.k)
        self.k += 1
        return float(terms["loss"])  # (the trainer checks the loss is finite: a host sync)

    def count_flops(self) -> int:
        with FlopCounterMode(display=False) as counter:
            self.step(Variant())
        return counter.get_total_flops()

    @property
    def attention_shape(self) -> tuple[int, int, int, int]:
        """``(B, heads, N, hd)`` of the self-attention of every block."""
        attn = self.model.blocks[0].attn
        d = self.model.config.hidden_size
        return (self.x.shape[0], attn.num_heads, self.model.num_patches, d // attn.num_heads)


# --------------------------------------------------------------------------------------------
# the attention kernel alone
# --------------------------------------------------------------------------------------------


def _math_lowp(q, k, v):
    """The explicit kernel with the softmax in the inputs' (autocast) dtype (for information only)."""
    s = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
    return torch.matmul(torch.softmax(s, dim=-1), v)


def attention_cases(shape, device) -> dict[tuple[str, str], Callable[[], None]]:
    """``(precision, kernel) -> fwd+bwd closure`` at ``shape`` (the model's attention inputs)."""
    g = torch.Generator(device=device).manual_seed(1)
    q, k, v = (torch.randn(*shape, device=device, generator=g).requires_grad_() for _ in range(3))
    kernels = {
        "sdpa": lambda: attention(q, k, v, kernel="sdpa"),
        "math": lambda: attention(q, k, v, kernel="math"),
        "math-lp": lambda: _math_lowp(q, k, v),
    }
    cases = {}
    for prec in ("fp32", "bf16"):
        for name, fn in kernels.items():
            if prec == "fp32" and name == "math-lp":
                continue  # the same as math in fp32

            def run(fn=fn, prec=prec):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=prec == "bf16"):
                    out = fn()
                out.float().square().sum().backward()
                q.grad = k.grad = v.grad = None

            cases[(prec, name)] = run
    return cases


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def main() -> None:
    from patchforcing.utils.runtime import tune_cpu_allocator

    tune_cpu_allocator()  # the CLI's allocator settings
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="PFT-T/4", help="PFT preset; its SiT twin runs too unless --no-sit")
    ap.add_argument("--no-sit", action="store_true", help="only the PFT model (no PFT/SiT ratio)")
    ap.add_argument("--input-size", type=int, default=32)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--num-classes", type=int, default=9)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds (medians over them)")
    ap.add_argument("--variants", default=None, help=f"comma-separated (default: {DEFAULT_VARIANTS})")
    ap.add_argument("--no-compile", action="store_true", help="drop the torch.compile variants")
    ap.add_argument("--gemm-size", type=int, default=2048, help="n of the n x n x n peak GEMM")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--quick", action="store_true", help="a tiny model (2 blocks, width 64) at 16x16, batch 8, 2 rounds"
    )
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    overrides: dict = {}
    if args.quick:
        args.input_size, args.batch_size, args.repeats, args.gemm_size = 16, 8, 2, 512
        overrides = dict(depth=2, hidden_size=64, num_heads=4)
    variants = [
        Variant.parse(s) for s in (args.variants or (QUICK_VARIANTS if args.quick else DEFAULT_VARIANTS)).split(",")
    ]
    if args.no_compile:
        variants = [v for v in variants if not v.compile]
    if Variant() not in variants:
        variants.insert(0, Variant())  # the baseline of the speed-ups
    if not args.model.upper().startswith("PFT-"):
        raise SystemExit(f"--model {args.model!r}: give a PFT preset (e.g. PFT-T/4); its SiT twin is derived")
    names = [args.model] + ([] if args.no_sit else ["SiT-" + args.model[4:]])
    benches = {n: Bench(n, args, device, overrides) for n in names}
    flops = {n: b.count_flops() for n, b in benches.items()}
    gemms = {
        p: Gemm(torch.float32 if p == "fp32" else torch.bfloat16, device, args.gemm_size) for p in ("fp32", "bf16")
    }

    # warm-up (and compilation: a variant that fails to compile is reported and dropped)
    failed: dict[str, str] = {}
    first_call: dict[tuple[str, str], float] = {}
    for v in variants:
        for n, b in benches.items():
            try:
                first_call[(n, v.name)] = _timed(lambda b=b, v=v: b.step(v), device)
                b.step(v)
            except Exception as e:  # noqa: BLE001 -- torch.compile raises many kinds (no compiler, ...)
                failed[v.name] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
                break
    variants = [v for v in variants if v.name not in failed]
    attn_cases = attention_cases(benches[args.model].attention_shape, device)
    for fn in attn_cases.values():
        fn()

    times: dict[tuple[str, str], list[float]] = {(n, v.name): [] for v in variants for n in names}
    gemm_times: dict[str, list[float]] = {p: [] for p in gemms}
    attn_times: dict[tuple[str, str], list[float]] = {k: [] for k in attn_cases}
    for _ in range(args.repeats):
        for p, gm in gemms.items():
            gemm_times[p].append(_timed(gm, device))
        for v in variants:
            for n, b in benches.items():
                times[(n, v.name)].append(_timed(lambda b=b, v=v: b.step(v), device))
        for k, fn in attn_cases.items():
            attn_times[k].append(_timed(fn, device))
    med = {k: statistics.median(t) for k, t in times.items()}
    peak = {p: gemms[p].flops / statistics.median(t) for p, t in gemm_times.items()}
    attn_med = {k: statistics.median(t) for k, t in attn_times.items()}

    # report
    machine = machine_line(device)
    size = f"{args.channels}x{args.input_size}x{args.input_size}"
    tiny = " (tiny: depth 2, width 64, 4 heads)" if args.quick else ""
    base = Variant().name
    rows = []
    for v in variants:
        for n in names:
            t = med[(n, v.name)]
            achieved = flops[n] / t
            rows.append(
                dict(
                    variant=v.name,
                    model=n,
                    ms=t * 1e3,
                    ips=args.batch_size / t,
                    speedup=med[(n, base)] / t,
                    gflops=achieved / 1e9,
                    share=achieved / peak[v.precision],
                )
            )
    pft = args.model
    best = min(variants, key=lambda v: med[(pft, v.name)])
    ratios = {v.name: med[(pft, v.name)] / med[(names[1], v.name)] for v in variants} if len(names) > 1 else {}
    B, H, N, hd = benches[pft].attention_shape

    print(f"machine: {machine}")
    print(
        f"models: {', '.join(names)}{tiny} at {size}, batch {args.batch_size}; {args.repeats} interleaved rounds "
        f"(median); GFLOP per training step (fwd + bwd, flop_counter): "
        + ", ".join(f"{n} {flops[n] / 1e9:.2f}" for n in names)
    )
    print(
        f"matmul peak ({args.gemm_size}^3 GEMM, median over the rounds): "
        + ", ".join(f"{p} {peak[p] / 1e9:.1f} GFLOP/s" for p in peak)
    )
    print("'math' attention: q@k^T*scale, softmax in fp32, @v (bf16 matmuls under autocast)")
    print(
        f"{'variant':26s} {'model':9s} {'ms/step':>9s} {'img/s':>8s} {'speed-up':>9s} {'GFLOP/s':>9s} {'of peak':>8s}"
    )
    for r in rows:
        print(
            f"{r['variant']:26s} {r['model']:9s} {r['ms']:9.1f} {r['ips']:8.1f} {r['speedup']:8.2f}x "
            f"{r['gflops']:9.1f} {r['share']:8.1%}"
        )
    print(f"fastest for {pft}: {best.name} ({med[(pft, base)] / med[(pft, best.name)]:.2f}x the {base} baseline)")
    for name, ratio in ratios.items():
        print(f"PFT/SiT step-time ratio ({name}): {ratio:.3f}")
    print(f"attention alone, forward + backward at (B, heads, N, hd) = ({B}, {H}, {N}, {hd}):")
    for (p, k), t in attn_med.items():
        print(f"  {p} {k:8s} {t * 1e3:8.2f} ms  ({attn_med[(p, 'sdpa')] / t:.2f}x SDPA)")
    for (n, vname), t in first_call.items():
        if "compile" in vname:
            print(f"first call (compilation) {vname} {n}: {t:.1f} s")
    for vname, err in failed.items():
        print(f"variant {vname} FAILED and was dropped: {err}")

    if args.markdown:
        flags = " --quick" if args.quick else ""
        cmd = (
            f"python benchmarks/train_speed.py --model {args.model} --channels {args.channels} "
            f"--input-size {args.input_size} --batch-size {args.batch_size} --repeats {args.repeats}{flags}"
        )
        print()
        print(f"Machine: {machine}. `{cmd}`")
        print()
        print(
            f"{', '.join(names)}{tiny} at {size}, batch {args.batch_size}, full training step (loss, backward, "
            f"clip, AdamW, EMA); medians of {args.repeats} interleaved rounds. Matmul peak in the same run: "
            + ", ".join(f"{p} {peak[p] / 1e9:.1f} GFLOP/s" for p in peak)
            + ". 'of peak': achieved FLOP/s over the peak of the variant's precision. 'math': softmax in fp32."
        )
        print()
        print("| variant | model | ms/step | images/s | speed-up | GFLOP/s | of matmul peak |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for r in rows:
            print(
                f"| {r['variant']} | {r['model']} | {r['ms']:.1f} | {r['ips']:.1f} | {r['speedup']:.2f}x | "
                f"{r['gflops']:.1f} | {r['share']:.1%} |"
            )
        if ratios:
            print()
            print("| | " + " | ".join(ratios) + " |")
            print("|---|" + "---:|" * len(ratios))
            print("| PFT/SiT step time | " + " | ".join(f"{r:.3f}" for r in ratios.values()) + " |")
        print()
        print(f"Attention alone (forward + backward, (B, heads, N, hd) = ({B}, {H}, {N}, {hd})):")
        print()
        print("| precision | kernel | ms | vs SDPA |")
        print("|---|---|---:|---:|")
        for (p, k), t in attn_med.items():
            print(f"| {p} | {k} | {t * 1e3:.2f} | {attn_med[(p, 'sdpa')] / t:.2f}x |")
        if failed:
            print()
            for vname, err in failed.items():
                print(f"- `{vname}` failed and was dropped: {err}")


if __name__ == "__main__":
    main()
