"""``patchforcing demo [--out demo-out] [KEY=VALUE ...]``."""

from __future__ import annotations

import argparse

from ..demo import check_demo_options, run_demo
from .common import OVERRIDES_HELP, add_overrides_note, check_output_dir, positive_int
from .train import flag_overrides

NAME = "demo"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        NAME,
        help="train a small PFT on built-in data (CPU, ~10 min) and compare samplers",
        description="Train the `demo` preset, train a small classifier on its images (FD_classifier against "
        "held-out images, next to the real-vs-real floor), sample it with every sampler at one NFE budget and "
        "write pictures and a summary to --out. " + OVERRIDES_HELP,
    )
    p.add_argument("--out", default="demo-out")
    p.add_argument("--max-steps", type=positive_int)
    p.add_argument("--nfe", type=positive_int, default=24, help="NFE budget per image for every sampler")
    p.add_argument("--num-eval", type=positive_int, default=512, help="samples per sampler for the quality figure")
    p.add_argument(
        "--classifier-steps",
        type=positive_int,
        default=150,
        help="training steps (batch 128) of the feature classifier behind FD_classifier (default 150, about a minute)",
    )
    add_overrides_note(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    check_demo_options(args.nfe, args.num_eval)  # before anything is written
    check_output_dir(args.out)
    run_demo(
        args.out,
        flag_overrides(args, (("max_steps", "train.max_steps"),)),
        nfe=args.nfe,
        num_eval=args.num_eval,
        classifier_steps=args.classifier_steps,
    )
    return 0
