"""``patchforcing study CONFIG --arms sit,pft --seeds 3 --steps N --nfe 10,20,40 --samplers ... --out DIR``."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..sampling import SAMPLERS, SAMPLING_PRECISIONS
from ..study import StudyError, StudySpec, parse_arms, parse_int_list, parse_name_list, run_study
from ..study.spec import CACHE_REFRESH, CACHE_SAMPLERS, parse_float_list
from ..training.config import load_config
from .common import (
    OVERRIDES_HELP,
    add_device_arg,
    add_overrides_note,
    check_output_dir,
    finite_float,
    positive_int,
    sampler_options,
)
from .train import flag_overrides

NAME = "study"

DEFAULT_SAMPLERS = "euler_pf,dual_loop,look_ahead,random_context"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        NAME,
        help="compare SiT and PFT arms and samplers on your data, with confidence intervals",
        description="Train every arm (same backbone, data order, batch, steps, optimiser, EMA) for --seeds seeds, "
        "sample every run with every sampler at every NFE budget from the same noise and labels, score the samples "
        "against held-out images and write study.md (FD per arm x sampler x NFE with 95 % intervals), study.json "
        "and figures to --out. Interrupted studies continue where they stopped. CONFIG is the base config, as for "
        "`train`. " + OVERRIDES_HELP,
        usage="%(prog)s CONFIG [--arms A,B] [--seeds N] [--steps N] [--nfe N,N] [--samplers S,S] [--num-samples N] "
        "[--features classifier|classifier:CKPT|inception] [--cache-active A,A] [--cache-select uncertainty,random] "
        "[--out DIR] [KEY=VALUE ...]",
    )
    p.add_argument("config", help="YAML file or preset name (the base config of every arm)")
    p.add_argument("--out", help="study directory (default studies/<config name>)")
    p.add_argument(
        "--arms",
        default="sit,pft",
        help="comma-separated arms: sit, pft (LTG), pft-srm, pft-truncnorm, pft-gaussian, pft-uniform, "
        "pft-<timestep sampler> (default sit,pft)",
    )
    p.add_argument("--seeds", type=positive_int, default=1, help="training seeds per arm (default 1; 3 to test arms)")
    p.add_argument("--steps", type=positive_int, help="training steps of every arm (train.max_steps)")
    p.add_argument("--nfe", default="20", help="comma-separated NFE budgets per image (default 20)")
    p.add_argument(
        "--samplers",
        default=DEFAULT_SAMPLERS,
        help=f"samplers of the PFT arms (SiT arms use euler); from {', '.join(SAMPLERS)} (default {DEFAULT_SAMPLERS})",
    )
    p.add_argument("--num-samples", type=positive_int, default=1000, help="samples per run, sampler and NFE")
    p.add_argument("--sample-seed", type=int, default=0, help="seed of the shared noise and labels")
    p.add_argument("--batch-size", type=positive_int, default=64, help="sampling batch (memory only)")
    p.add_argument(
        "--sample-precision",
        choices=SAMPLING_PRECISIONS,
        default="fp32",
        help="the network's precision when sampling: fp32 (default) or bf16 autocast (~2x faster on a CPU with "
        "AVX-512 BF16; same for every cell)",
    )
    p.add_argument(
        "--features",
        default="classifier",
        help="classifier (train one on the training split; offline), classifier:CKPT, or inception",
    )
    p.add_argument("--inception-weights", help="local Inception weights file (torch-fidelity format)")
    p.add_argument("--classifier-epochs", type=positive_int, default=10)
    p.add_argument("--bootstrap", type=positive_int, default=1000, help="bootstrap replicates per interval")
    p.add_argument("--confidence", type=finite_float, default=0.95, help="confidence level of the intervals")
    p.add_argument("--quantile", type=finite_float, help="quantile of certain patches (default 0.4)")
    p.add_argument("--n-inner", type=positive_int, help="inner steps of uncertain patches (dual_loop)")
    p.add_argument("--context-ratio", type=finite_float, help="look-ahead time ratio r (look_ahead, random_context)")
    p.add_argument("--early-t", type=finite_float, help="plain Euler while s <= this (look_ahead, random_context)")
    g = p.add_argument_group(
        "token caching",
        "add token-cached variants of PFT samplers (named <sampler>+cache<A>, <sampler>+cache<A>-random), sampled "
        "from the same noise and labels, and report FD against GFLOP per image (docs/study.md)",
    )
    g.add_argument(
        "--cache-active",
        metavar="A,A",
        help="comma-separated shares of tokens a cached call recomputes, each in (0, 1]; turns the variants on",
    )
    g.add_argument(
        "--cache-refresh",
        type=positive_int,
        metavar="N",
        help=f"a full call every N calls in every cached variant (default {CACHE_REFRESH}; 1 = dense)",
    )
    g.add_argument(
        "--cache-select",
        metavar="S,S",
        help="comma-separated selections: uncertainty (the difficulty head; default) and/or random (the control)",
    )
    g.add_argument(
        "--cache-samplers",
        metavar="S,S",
        help=f"samplers given cached variants, each among --samplers (default: those of {', '.join(CACHE_SAMPLERS)} "
        "in --samplers)",
    )
    add_device_arg(p)
    add_overrides_note(p)
    p.set_defaults(func=run)
    return p


def build_spec(args: argparse.Namespace) -> StudySpec:
    """The :class:`~patchforcing.study.StudySpec` of a command line (checked; nothing runs)."""
    samplers = parse_name_list(args.samplers, "--samplers")
    opts = sampler_options(args)
    cache_active = getattr(args, "cache_active", None)
    if cache_active is None:
        given = [f"--cache-{k}" for k in ("refresh", "select", "samplers") if getattr(args, f"cache_{k}", None)]
        if given:
            raise StudyError(
                f"{' and '.join(given)} {'needs' if len(given) == 1 else 'need'} --cache-active A[,A] (the shares of tokens recomputed)"
            )
    cache = {}
    if cache_active is not None:
        cache = {
            "cache_active": parse_float_list(cache_active, "--cache-active"),
            "cache_refresh": CACHE_REFRESH if args.cache_refresh is None else args.cache_refresh,
            "cache_select": parse_name_list(args.cache_select or "uncertainty", "--cache-select"),
            "cache_samplers": None
            if args.cache_samplers is None
            else parse_name_list(args.cache_samplers, "--cache-samplers"),
        }
    return StudySpec(
        arms=parse_arms(args.arms),
        seeds=args.seeds,
        nfe=parse_int_list(args.nfe, "--nfe"),
        samplers=samplers,
        sampler_options={s: dict(opts) for s in samplers} if opts else {},
        num_samples=args.num_samples,
        sample_seed=args.sample_seed,
        batch_size=args.batch_size,
        features=args.features,
        inception_weights=args.inception_weights,
        classifier_epochs=args.classifier_epochs,
        bootstrap=args.bootstrap,
        confidence=args.confidence,
        sample_precision=args.sample_precision,
        **cache,
    )


def run(args: argparse.Namespace) -> int:
    spec = build_spec(args)  # bad options are refused before the config is even read
    flags = [("steps", "train.max_steps")]
    overrides = flag_overrides(args, flags)
    if args.device != "auto":
        overrides.append(f"train.device={args.device}")
    base = load_config(args.config, overrides)
    out = check_output_dir(args.out or Path("studies") / base.name)
    run_study(base, spec, out, progress=base.train.progress)  # rank 0 logs "done: <study.md>"
    return 0
