"""``patchforcing <command>``: argument parsing only; each command calls one library function.

Errors a user can fix (a bad config, a missing file, a checkpoint that does not fit) are
printed as one clear message with exit status 2, never as a stack trace.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["main", "build_parser"]


def _cmd_train(args: argparse.Namespace) -> int:
    from .training.config import load_config
    from .training.trainer import train

    overrides = list(args.overrides)
    for flag, key in (("max_steps", "train.max_steps"), ("ckpt_every", "train.ckpt_every"), ("seed", "train.seed")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    cfg = load_config(args.config, overrides)
    out = Path(args.out) if args.out else Path("runs") / cfg.name
    result = train(cfg, out, resume=args.resume)
    if result.last_checkpoint is not None:
        state = "interrupted" if result.interrupted else "finished"
        print(f"{state} at step {result.step}; checkpoint: {result.last_checkpoint}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .checkpoints import export_run

    path = export_run(args.run, args.out, use_ema=not args.raw)
    print(f"wrote {path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    run_demo(args.out, overrides, nfe=args.nfe, num_eval=args.num_eval)
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from .models import list_models

    print("\n".join(list_models()))
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    from .training.config import list_presets, preset_path

    for name in list_presets():
        print(f"{name:24s} {preset_path(name)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="patchforcing", description="Patch Forcing: train, sample, evaluate.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a model from a YAML config (works under torchrun)",
                       description="Train from CONFIG (a YAML file or a preset name, see `patchforcing presets`). "
                                   "Extra KEY=VALUE arguments override config entries, e.g. optim.lr=3e-4.")
    t.add_argument("config")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    t.add_argument("--out", help="run directory (default runs/<config name>)")
    t.add_argument("--max-steps", type=int)
    t.add_argument("--ckpt-every", type=int)
    t.add_argument("--seed", type=int)
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("export", help="write a run's EMA weights + config to one .safetensors file")
    e.add_argument("run", help="run directory or training checkpoint")
    e.add_argument("--out", required=True)
    e.add_argument("--raw", action="store_true", help="export the raw (non-EMA) weights")
    e.set_defaults(func=_cmd_export)

    d = sub.add_parser("demo", help="train a small PFT on built-in data (CPU, ~10 min) and compare samplers")
    d.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    d.add_argument("--out", default="demo-out")
    d.add_argument("--max-steps", type=int)
    d.add_argument("--nfe", type=int, default=24, help="NFE budget per image for every sampler")
    d.add_argument("--num-eval", type=int, default=512, help="samples per sampler for the quality figure")
    d.set_defaults(func=_cmd_demo)

    m = sub.add_parser("models", help="list model presets")
    m.set_defaults(func=_cmd_models)
    c = sub.add_parser("presets", help="list config presets")
    c.set_defaults(func=_cmd_presets)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from .checkpoints import CheckpointError
    from .data import DataError
    from .training.config import ConfigError
    from .training.trainer import NonFiniteLossError, TrainingError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"patchforcing {args.command}: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"patchforcing {args.command}: {e}", file=sys.stderr)
        return 3
    except TrainingError as e:
        print(f"patchforcing {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
