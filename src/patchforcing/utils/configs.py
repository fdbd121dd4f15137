"""Config dataclasses <-> JSON-ready dicts (what checkpoints store next to the weights).

:func:`config_to_dict` is :func:`dataclasses.asdict` with tuple fields written as lists (JSON has no
tuples); :func:`config_from_dict` undoes it: unknown keys are a ValueError that names them and the
known ones, list values become tuples again (frozen configs hold tuples, e.g. ``input_size``), and
per-field ``convert`` callables rebuild nested configs. ``config_from_dict(C, config_to_dict(c)) ==
c`` for every config ``c`` of ``C`` whose fields are numbers, strings, bools, ``None``, tuples or
nested configs with a ``convert``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, fields
from typing import Any, TypeVar

__all__ = ["config_to_dict", "config_from_dict"]

C = TypeVar("C")


def config_to_dict(config: Any) -> dict[str, Any]:
    """``asdict(config)`` (nested dataclasses become dicts), its top-level tuples as lists."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}


def config_from_dict(
    cls: type[C],
    d: Mapping[str, Any],
    *,
    what: str = "config",
    convert: Mapping[str, Callable[[Any], Any]] | None = None,
) -> C:
    """``cls(**d)`` of a dict written by :func:`config_to_dict` (or by hand).

    Args:
        cls: a dataclass (its ``ClassVar`` attributes are not keys).
        d: field name -> value; missing fields keep their defaults.
        what: the name the error uses (``"unknown {what} keys: [...]; known: [...]"``).
        convert: field name -> callable applied to that value when ``d`` has it (after lists
            became tuples), e.g. a nested config's dict -> the nested config.

    Raises:
        ValueError: keys that are not fields of ``cls``.
    """
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(map(str, set(d) - known))
    if unknown:
        raise ValueError(f"unknown {what} keys: {unknown}; known: {sorted(known)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    for name, fn in (convert or {}).items():
        if name in kwargs:
            kwargs[name] = fn(kwargs[name])
    return cls(**kwargs)
