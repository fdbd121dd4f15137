"""``patchforcing <command>``: argument parsing only; each command calls one library function.

One module per command (``add_parser(subparsers)`` registers it, ``run(args)`` runs it); the
argument groups several commands share live in :mod:`.common`. Errors a user can fix (a bad
config, a missing file, a checkpoint that does not fit, an unwritable output) are printed as one
clear message with exit status 2, never as a stack trace. See ``docs/cli.md``.
"""

from .app import build_parser, main

__all__ = ["main", "build_parser"]
