"""``patchforcing models`` and ``patchforcing presets``."""

from __future__ import annotations

import argparse

from ..models.registry import T2I_PAPER_PARAMETERS, count_parameters, is_text_to_image, list_models, t2i_data_defaults
from ..training.config import list_presets, preset_path


def add_parser(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("models", help="list model presets")
    m.set_defaults(func=run_models)
    c = sub.add_parser("presets", help="list config presets")
    c.set_defaults(func=run_presets)


def run_models(args: argparse.Namespace) -> int:
    """Preset names; text-to-image presets with their parameter count (counted on the meta device)."""
    for name in list_models():
        if not is_text_to_image(name):
            print(name)
            continue
        channels, text_dim = t2i_data_defaults(name)
        note = f"{channels} input channels, text width {text_dim}"
        if name.endswith("1.2B"):
            note += f"; the authors' PFT-T2I-1.2B: {T2I_PAPER_PARAMETERS:,}"
        print(f"{name:16s} {count_parameters(name):>15,} parameters ({note})")
    return 0


def run_presets(args: argparse.Namespace) -> int:
    for name in list_presets():
        print(f"{name:24s} {preset_path(name)}")
    return 0
