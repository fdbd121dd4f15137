"""``patchforcing models`` and ``patchforcing presets``."""

from __future__ import annotations

import argparse

from ..models import list_models
from ..training.config import list_presets, preset_path


def add_parser(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("models", help="list model presets")
    m.set_defaults(func=run_models)
    c = sub.add_parser("presets", help="list config presets")
    c.set_defaults(func=run_presets)


def run_models(args: argparse.Namespace) -> int:
    print("\n".join(list_models()))
    return 0


def run_presets(args: argparse.Namespace) -> int:
    for name in list_presets():
        print(f"{name:24s} {preset_path(name)}")
    return 0
