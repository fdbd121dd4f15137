"""Argument types and groups shared by several commands, and the small glue they share."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import torch

from ..autoencoders import load_autoencoder_for
from ..checkpoints import load_model
from ..sampling import SAMPLERS
from ..utils import ensure_writable_dir, resolve_device

__all__ = [
    "positive_int",
    "nonnegative_int",
    "finite_float",
    "unit_float",
    "add_overrides_note",
    "add_device_arg",
    "add_sampling_args",
    "sampler_options",
    "guidance_interval",
    "parse_classes",
    "load_model_and_decoder",
    "check_output_file",
    "check_output_dir",
]


def _int_at_least(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1, "a positive integer")


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0, "an integer >= 0")


def finite_float(text: str) -> float:
    """argparse type: a finite number (``nan``/``inf`` refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def unit_float(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    value = finite_float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value}")
    return value


OVERRIDES_HELP = "KEY=VALUE arguments (anywhere on the line) override config entries, e.g. optim.lr=3e-4."


def add_overrides_note(p: argparse.ArgumentParser) -> None:
    """Mark a command as taking ``KEY=VALUE`` config overrides anywhere on its line (see app.main)."""
    p.set_defaults(overrides=[], accepts_overrides=True)


def add_device_arg(p: argparse.ArgumentParser, default: str = "auto") -> None:
    p.add_argument(
        "--device", default=default, help=f"auto (this rank's GPU, else CPU), cpu, cuda, cuda:N (default {default})"
    )


def add_sampling_args(p: argparse.ArgumentParser, default_sampler: str, steps_help: str | None = None) -> None:
    """The checkpoint, sampler and guidance options shared by ``sample`` and ``viz``."""
    p.add_argument("checkpoint", help="released .ckpt, exported .safetensors, run directory or training checkpoint")
    p.add_argument("--sampler", default=default_sampler, choices=list(SAMPLERS))
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=positive_int, help=steps_help)
    g.add_argument("--nfe", type=positive_int, help="NFE budget per image: the largest step count that fits")
    p.add_argument("--cfg", type=finite_float, default=1.0, help="classifier-free guidance scale (1 = none)")
    p.add_argument(
        "--guidance-interval",
        type=unit_float,
        nargs=2,
        metavar=("LO", "HI"),
        help="guide only while LO <= t <= HI (0 <= LO < HI <= 1)",
    )
    q = p.add_mutually_exclusive_group()
    q.add_argument(
        "--quantile", type=finite_float, help="quantile of certain patches (dual_loop, look_ahead; default 0.4)"
    )
    q.add_argument("--p", dest="p_alias", type=finite_float, help=argparse.SUPPRESS)  # deprecated name of --quantile
    p.add_argument("--n-inner", type=positive_int, help="inner steps of uncertain patches (dual_loop)")
    p.add_argument("--context-ratio", type=finite_float, help="look-ahead time ratio r (look_ahead)")
    p.add_argument("--early-t", type=finite_float, help="plain Euler while s <= this (look_ahead, default 0.05)")
    p.add_argument("--vae", help="VAE hub id or local directory (latent models; overrides the stored one)")
    add_device_arg(p)


def sampler_options(args: argparse.Namespace) -> dict[str, Any]:
    """The sampler keyword arguments given on the command line (only those that were set)."""
    opts: dict[str, Any] = {}
    quantile = getattr(args, "quantile", None)
    if quantile is None and getattr(args, "p_alias", None) is not None:
        print("note: --p is the old name of --quantile; use --quantile", file=sys.stderr)
        quantile = args.p_alias
    if quantile is not None:
        opts["quantile"] = quantile
    for name in ("n_inner", "context_ratio", "early_t"):
        value = getattr(args, name, None)
        if value is not None:
            opts[name] = value
    return opts


def guidance_interval(args: argparse.Namespace) -> tuple[float, float] | None:
    """``--guidance-interval LO HI`` as a tuple, refusing an empty or reversed interval."""
    if not args.guidance_interval:
        return None
    lo, hi = args.guidance_interval
    if not lo < hi:
        raise ValueError(f"--guidance-interval {lo} {hi}: LO must be smaller than HI")
    return (lo, hi)


def parse_classes(text: str | None, flag: str = "--classes") -> list[int] | None:
    """``"1,2,3"`` -> ``[1, 2, 3]``; ``None`` when not given; an empty or malformed list is an error."""
    if text is None:
        return None
    items = [c.strip() for c in text.split(",")]
    if not text.strip() or any(not c for c in items):
        raise ValueError(f"{flag} {text!r}: give comma-separated class labels, e.g. 1,2,3")
    try:
        classes = [int(c) for c in items]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: class labels must be integers") from None
    if any(c < 0 for c in classes):
        raise ValueError(f"{flag} {text!r}: class labels must be >= 0")
    return classes


def load_model_and_decoder(checkpoint: str, vae: str | None, device: torch.device):
    """The model (eval mode, on ``device``) and its decoder (``None`` for pixel-space models)."""
    model = load_model(checkpoint, map_location="cpu").to(device)
    ae = load_autoencoder_for(checkpoint, vae, model=model, device=device)
    decode = None if ae.spec.kind == "identity" else ae.decode
    return model, ae, decode


def check_output_file(path: str | Path, flag: str = "--out") -> Path:
    """An output *file*: refuse an existing directory, and check the folder is writable before the work."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a directory; give a file path")
    ensure_writable_dir(path.parent if str(path.parent) else Path("."), what=f"{flag} folder")
    return path


def check_output_dir(path: str | Path, flag: str = "--out") -> Path:
    """An output *directory*: refuse an existing file, create it and check it is writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file; give a directory")
    return ensure_writable_dir(path, what=f"{flag} directory")


def device_from(args: argparse.Namespace) -> torch.device:
    return resolve_device(args.device)
