"""The parser (one sub-command per module) and ``main``: error reporting and exit codes.

Exit codes: 0 success, 2 a problem the user can fix (the message says what), 3 a run stopped by
non-finite numbers (loss or samples), 130 interrupted (Ctrl-C); finished work is kept.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from ..autoencoders import AutoencoderError
from ..checkpoints import CheckpointError
from ..data import DataError
from ..evaluation import EvaluationError
from ..sampling import NonFiniteSampleError
from ..training.config import ConfigError
from ..training.trainer import NonFiniteLossError, TrainingError
from ..utils import RunLockedError
from ..utils.runtime import tune_cpu_allocator
from . import analyze, classifier, demo, encode, evaluate, export, listing, sample, study, train, viz

__all__ = ["build_parser", "main"]

#: the command modules, in the order ``--help`` lists them
COMMANDS = (train, study, export, demo, evaluate, classifier, encode, sample, viz, analyze, listing)

_OVERRIDE = re.compile(r"^[A-Za-z_][\w\-]*(\.[\w\-]+)*=")

#: errors whose message is complete as it stands: printed as one line, exit status 2
USER_ERRORS = (
    ConfigError,
    DataError,
    CheckpointError,
    AutoencoderError,
    EvaluationError,
    TrainingError,
    RunLockedError,
    ValueError,
    OSError,  # missing, unwritable or full: FileNotFoundError, PermissionError, ENOSPC, ...
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="patchforcing", description="Patch Forcing: train, sample, evaluate.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.add_parser(sub)
    return p


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    return parser  # pragma: no cover


def is_override(text: str) -> bool:
    """Whether a command-line word is a ``dotted.key=value`` config override."""
    return bool(_OVERRIDE.match(text))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse a command line; ``KEY=VALUE`` overrides are accepted anywhere on the line of the
    commands that take them (``train``, ``study``, ``demo``), in the order given."""
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if not extras:
        return args
    sp = _subparser(parser, args.command)
    if not getattr(args, "accepts_overrides", False):
        sp.error(f"unrecognized arguments: {' '.join(extras)}")
    config = getattr(args, "config", None)
    plain = [e for e in extras if not is_override(e)]
    if config is not None and is_override(config) and not Path(config).exists() and len(plain) == 1:
        extras = [config] + [e for e in extras if e is not plain[0]]  # an override came before CONFIG
        args.config, plain = plain[0], []
    if plain:
        sp.error(f"unrecognized arguments: {' '.join(plain)} (config overrides are KEY=VALUE, e.g. optim.lr=3e-4)")
    args.overrides = list(args.overrides) + extras
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command line; returns the exit status (usage errors print the command's usage: 2)."""
    try:
        args = parse_args(argv)
    except SystemExit as e:  # --help, or a usage error argparse has already printed
        return e.code if isinstance(e.code, int) else 2
    tune_cpu_allocator()  # reuse large CPU buffers across steps (PATCHFORCING_NO_MALLOC_TUNING=1 turns it off)
    prefix = f"patchforcing {args.command}"
    try:
        return args.func(args)
    except (NonFiniteLossError, NonFiniteSampleError) as e:
        print(f"{prefix}: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt as e:
        print(f"{prefix}: interrupted{'; ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        print(f"{prefix}: error: {_message(e)}", file=sys.stderr)
        return 2


def _message(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror and e.filename and str(e.filename) not in str(e.strerror):
        return f"{e.strerror}: {e.filename}"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
