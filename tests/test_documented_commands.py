"""Every command line shown in README.md and docs/*.md parses (documented usage cannot rot).

Concrete examples are parsed exactly as written (``parse_args``, nothing runs); synopsis lines
(with ``[...]``, ``|`` or ``...``) must name a real command and only flags that command has, and
``patchforcing COMMAND --help`` must work for every command shown.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from patchforcing.cli import build_parser
from patchforcing.cli.app import _subparser, parse_args

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_START = re.compile(r"^(?:\$ )?(?:torchrun\b.*?-m patchforcing|python -m patchforcing|patchforcing)\s+(.*)$")


def documented_commands() -> list[tuple[str, int, list[str], bool]]:
    """``(file, line, argv after 'patchforcing', is_synopsis)`` for every shell line of the docs."""
    found = []
    for path in DOCS:
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            text = lines[i].strip()
            start = i
            while text.endswith("\\") and i + 1 < len(lines):
                i += 1
                text = text[:-1].rstrip() + " " + lines[i].strip()
            i += 1
            m = _START.match(text)
            if not m:
                continue
            rest = m.group(1).split(" #")[0].strip()  # drop a trailing shell comment
            synopsis = any(s in rest for s in ("[", "|", "...", "CKPT_OR", "<"))
            argv = rest.split() if synopsis else shlex.split(rest)
            found.append((path.name, start + 1, argv, synopsis))
    return found


COMMANDS = documented_commands()


def test_the_docs_show_commands():
    names = {argv[0] for _, _, argv, _ in COMMANDS if argv}
    parser_commands = _commands(build_parser())  # every command of the CLI is documented somewhere
    assert parser_commands <= names, f"commands not shown in any doc: {sorted(parser_commands - names)}"


@pytest.mark.parametrize("where,line,argv,synopsis", COMMANDS, ids=[f"{f}:{n}" for f, n, _, _ in COMMANDS])
def test_documented_command_parses(where, line, argv, synopsis):
    parser = build_parser()
    command = argv[0]
    sp = _subparser(parser, command) if command in _commands(parser) else None
    assert sp is not None, f"{where}:{line}: unknown command {command!r}"
    with pytest.raises(SystemExit) as e:
        parse_args([command, "--help"])
    assert e.value.code == 0
    if synopsis:
        known = {s for a in sp._actions for s in a.option_strings}
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", " ".join(argv)):
            assert flag in known, f"{where}:{line}: {command} has no option {flag}"
    else:
        args = parse_args(argv)
        assert args.command == command


def _commands(parser) -> set[str]:
    for action in parser._actions:
        if hasattr(action, "choices") and isinstance(action.choices, dict):
            return set(action.choices)
    return set()


def test_overrides_anywhere_on_the_line():
    a = parse_args(["train", "configs/demo.yaml", "--out", "run", "--max-steps", "1", "optim.lr=0.001"])
    assert (a.config, a.out, a.max_steps, a.overrides) == ("configs/demo.yaml", "run", 1, ["optim.lr=0.001"])
    b = parse_args(["train", "optim.lr=0.001", "demo", "train.seed=3", "--resume", "ema.decay=0.9"])
    assert b.config == "demo" and b.resume
    assert b.overrides == ["optim.lr=0.001", "train.seed=3", "ema.decay=0.9"]  # order kept: later wins
    c = parse_args(["demo", "optim.lr=1e-3", "--out", "d", "train.max_steps=5"])
    assert c.overrides == ["optim.lr=1e-3", "train.max_steps=5"] and c.out == "d"


def test_stray_argument_is_reported_by_the_command(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["train", "demo", "--out", "x", "not-an-override"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "usage: patchforcing train" in err and "not-an-override" in err
    with pytest.raises(SystemExit):
        parse_args(["sample", "ckpt", "--out", "g.png", "optim.lr=1"])  # sample takes no overrides
    assert "usage: patchforcing sample" in capsys.readouterr().err
