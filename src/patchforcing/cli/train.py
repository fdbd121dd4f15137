"""``patchforcing train CONFIG [--out RUN] [--max-steps N] [--resume] [KEY=VALUE ...]``."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..training.config import load_config
from ..training.trainer import train
from .common import OVERRIDES_HELP, add_overrides_note, positive_int

NAME = "train"

# flags that are shorthands for config keys
FLAG_KEYS = (("max_steps", "train.max_steps"), ("ckpt_every", "train.ckpt_every"), ("seed", "train.seed"))


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        NAME,
        help="train a model from a YAML config (works under torchrun)",
        description="Train from CONFIG (a YAML file or a preset name, see `patchforcing presets`). " + OVERRIDES_HELP,
        usage="%(prog)s CONFIG [--out RUN_DIR] [--max-steps N] [--ckpt-every N] [--seed S] [--resume] [KEY=VALUE ...]",
    )
    p.add_argument("config", help="YAML file or preset name")
    p.add_argument("--out", help="run directory (default runs/<config name>)")
    p.add_argument("--max-steps", type=positive_int)
    p.add_argument("--ckpt-every", type=positive_int)
    p.add_argument("--seed", type=int)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add_overrides_note(p)
    p.set_defaults(func=run)
    return p


def flag_overrides(args: argparse.Namespace, flags=FLAG_KEYS) -> list[str]:
    """``KEY=VALUE`` overrides from the command line, then those of the shorthand flags that were given."""
    overrides = list(args.overrides)
    for flag, key in flags:
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{key}={value}")
    return overrides


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, flag_overrides(args))
    out = Path(args.out) if args.out else Path("runs") / cfg.name
    result = train(cfg, out, resume=args.resume)
    if result.last_checkpoint is not None:
        state = "interrupted" if result.interrupted else "finished"
        print(f"{state} at step {result.step}; checkpoint: {result.last_checkpoint}")
    return 0
