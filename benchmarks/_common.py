"""Helpers shared by the benchmark scripts (run them as ``python benchmarks/NAME.py``)."""

from __future__ import annotations

import platform


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where available)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def markdown_header(title: str, cmd: str, info: dict) -> list[str]:
    """The opening lines of a benchmark's Markdown section: heading, the command, the machine."""
    return [
        f"## {title}",
        "",
        "Command:",
        "",
        "```",
        cmd.strip(),
        "```",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()) + ".",
        "",
    ]
