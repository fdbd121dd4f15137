"""``patchforcing export RUN --out model.safetensors``."""

from __future__ import annotations

import argparse

from ..checkpoints import export_run
from .common import check_output_file

NAME = "export"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help="write a run's EMA weights + config to one .safetensors file")
    p.add_argument("run", help="run directory or training checkpoint")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument("--raw", action="store_true", help="export the raw (non-EMA) weights")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    check_output_file(args.out)
    path = export_run(args.run, args.out, use_ema=not args.raw)
    print(f"wrote {path}")
    return 0
