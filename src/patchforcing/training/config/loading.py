"""OmegaConf merging of config layers (inheritance via ``base``, dotted overrides), files and presets,
dicts and comparing. See :mod:`patchforcing.training.config` for the file format."""

from __future__ import annotations

import dataclasses
import difflib
import io
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from .schema import (
    _BASE_KEY,
    _FREEFORM,
    _SECTIONS,
    RESUME_SAFE_KEYS,
    ConfigError,
    ExperimentConfig,
    _accepts_str,
    _schema_lookup,
    _type_name,
)
from .validation import _validate

# --------------------------------------------------------------------------------------------
# OmegaConf errors -> ConfigError
# --------------------------------------------------------------------------------------------


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _config_error(err: OmegaConfBaseException, prefix: str = "") -> ConfigError:
    """A one-line :class:`ConfigError` from an OmegaConf error, naming the dotted key; an unknown
    key gets the closest valid key ("did you mean ...") and the list of valid keys."""
    key = err.full_key or ""
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)) and key:
        parts = re.sub(r"\[(\d+)\]", r".\1", key).split(".")
        kind, valid = _schema_lookup(parts)
        if kind == "unknown":
            parent = ".".join(parts[:-1])
            close = difflib.get_close_matches(parts[-1], valid, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            where = f"{parent!r}" if parent else "the top level"
            return ConfigError(f"{prefix}unknown key {key!r}{hint} (valid keys of {where}: {', '.join(valid)})")
    reason = _one_line((err.msg or type(err).__name__).splitlines()[0])  # the rest: OmegaConf's context
    if not key:
        return ConfigError(f"{prefix}{reason}")
    kind, tp = _schema_lookup(key.split("[", 1)[0].split("."))
    typed = isinstance(err, ValidationError) and kind in ("field", "freeform")
    expected = f"expected {_type_name(tp)}; " if typed else ""
    return ConfigError(f"{prefix}{key}: {expected}{reason}")


# --------------------------------------------------------------------------------------------
# merging layers into the schema
# --------------------------------------------------------------------------------------------


def _schema() -> DictConfig:
    """A fresh structured config with every default."""
    return OmegaConf.structured(ExperimentConfig)


def _prepare_layer(raw: Any, where: str) -> dict[str, Any]:
    """Check the shape of a (partial) config mapping before OmegaConf merges it: a mapping, each
    section a mapping (an empty section, ``null``, means its defaults). Returns a shallow copy."""
    if raw is None:
        return {}
    if OmegaConf.is_config(raw):
        raw = OmegaConf.to_container(raw, resolve=False)
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping of sections, got {raw!r} ({type(raw).__name__})")
    layer = dict(raw)
    for key, value in raw.items():
        if key in _SECTIONS:
            if value is None:
                del layer[key]
            elif not isinstance(value, Mapping):
                raise ConfigError(f"{key}: expected a mapping of keys, got {value!r} ({type(value).__name__})")
    return layer


def _merge(cfg: DictConfig, layer: Mapping[str, Any]) -> DictConfig:
    """``cfg`` with ``layer`` merged over it (OmegaConf checks keys and types); a free-form mapping
    that ``layer`` gives replaces the one in ``cfg``."""
    merged = OmegaConf.merge(cfg, layer)
    for section, key in _FREEFORM:
        sub = layer.get(section)
        if isinstance(sub, Mapping) and key in sub:
            OmegaConf.update(merged, f"{section}.{key}", sub[key], merge=False)
    return merged


def _to_config(cfg: DictConfig) -> ExperimentConfig:
    """The validated dataclass instance of a merged structured config."""
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise _config_error(err) from None
    _validate(obj)
    return obj


# --------------------------------------------------------------------------------------------
# dicts
# --------------------------------------------------------------------------------------------


def config_from_dict(d: Mapping[str, Any] | None) -> ExperimentConfig:
    """Build and validate an :class:`ExperimentConfig` from a (possibly partial) nested mapping,
    e.g. the output of :func:`config_to_dict` (the ``config`` of a training checkpoint) or a
    parsed YAML file without ``base``. ``None`` = all defaults."""
    layer = _prepare_layer(d, "config")
    try:
        cfg = _merge(_schema(), layer)
    except OmegaConfBaseException as err:
        raise _config_error(err) from None
    return _to_config(cfg)


def config_to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """The config as a plain nested ``dict`` (YAML/JSON-serialisable), keys in schema order."""
    if not isinstance(cfg, ExperimentConfig):
        raise TypeError(f"expected an ExperimentConfig, got {type(cfg).__name__}")
    return dataclasses.asdict(cfg)


# --------------------------------------------------------------------------------------------
# overrides
# --------------------------------------------------------------------------------------------

_KEY_PART = re.compile(r"[A-Za-z_][\w-]*")


def _parse_override(item: str) -> tuple[str, list[str], Any]:
    """``"optim.lr=3e-4"`` -> ("optim.lr", ["optim", "lr"], 0.0003): the value parsed by OmegaConf
    (YAML; mappings and lists as plain containers), or the raw text for a text field."""
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form dotted.key=value (e.g. optim.lr=3e-4)")
    key, text = item.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not all(_KEY_PART.fullmatch(p) for p in parts):
        raise ConfigError(f"override {item!r}: invalid key {key!r}")
    try:
        value = OmegaConf.to_container(OmegaConf.from_dotlist([f"{key}={text}"]), resolve=False)
    except (yaml.YAMLError, OmegaConfBaseException) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(
            f"override {item!r}: cannot parse the value as YAML ({reason}); quote text, e.g. key='a: b'"
        ) from None
    for p in parts:
        value = value[p]
    kind, tp = _schema_lookup(parts)
    if kind == "field" and _accepts_str(tp) and isinstance(value, (bool, int, float)):
        value = text.strip()  # e.g. name=2024 or name=1e3: keep the text
    elif kind == "field" and tp is str and not text.strip():
        value = ""  # name= : the empty text (refused by the checks), not a null
    return key, parts, value


def _apply_override(cfg: DictConfig, item: str) -> DictConfig:
    """``cfg`` with one ``dotted.key=value`` override applied (OmegaConf checks key and type)."""
    key, parts, value = _parse_override(item)
    kind, info = _schema_lookup(parts)
    if kind == "below":
        _, tp = _schema_lookup(info.split("."))
        raise ConfigError(f"override {item!r}: {info} is a {_type_name(tp)} field, not a section")
    try:
        if kind == "section":
            if not isinstance(value, Mapping):
                raise ConfigError(
                    f"override {item!r}: {key} is a section; give a mapping, "
                    f"e.g. {key}={{key: value}}, or set {key}.KEY=value"
                )
            layer: Any = value
            for p in reversed(parts):
                layer = {p: layer}
            return _merge(cfg, _prepare_layer(layer, f"override {item!r}"))
        OmegaConf.update(cfg, key, value, merge=False)
        return cfg
    except OmegaConfBaseException as err:
        raise _config_error(err, f"override {item!r}: ") from None


def _apply_all(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    if isinstance(overrides, str):
        raise TypeError("overrides must be a sequence of 'key=value' strings, not one string")
    for item in overrides:
        cfg = _apply_override(cfg, item)
    return cfg


def apply_overrides(cfg: ExperimentConfig, overrides: Sequence[str]) -> ExperimentConfig:
    """A new, validated config: ``cfg`` with the ``dotted.key=value`` overrides applied in order."""
    if not isinstance(cfg, ExperimentConfig):
        raise TypeError(f"expected an ExperimentConfig, got {type(cfg).__name__}")
    return _to_config(_apply_all(OmegaConf.structured(cfg), overrides))


# --------------------------------------------------------------------------------------------
# files and presets
# --------------------------------------------------------------------------------------------


def _presets_dir() -> Path:
    """The presets: the repository's top-level ``configs/``, reached through the package's
    ``configs`` link (a source checkout) or the copy that a built wheel carries."""
    return Path(__file__).resolve().parents[2] / "configs"


def list_presets() -> list[str]:
    """Names of the runnable presets (``configs/*.yaml`` without the suffix), sorted; partial
    configs that presets inherit from (names starting with ``_``) are left out."""
    directory = _presets_dir()
    if not directory.is_dir():
        return []
    return sorted(p.stem for p in directory.glob("*.yaml") if p.is_file() and not p.stem.startswith("_"))


def preset_path(name: str) -> Path:
    """Path of the preset ``name`` (e.g. ``"demo"``, ``"emoji32-pft"``); a trailing ``.yaml`` is
    allowed. Raises :class:`ConfigError` listing the available presets when there is none."""
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    available = list_presets()
    if stem in available:
        return _presets_dir() / f"{stem}.yaml"
    close = difflib.get_close_matches(stem, available, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    listing = ", ".join(available) if available else f"none found in {_presets_dir()}"
    raise ConfigError(f"no preset named {name!r}{hint} (available presets: {listing})")


def _is_bare_name(s: str) -> bool:
    return "/" not in s and os.sep not in s and not s.endswith((".yaml", ".yml"))


def _read_yaml(path: Path) -> dict[str, Any]:
    """The mapping in a YAML file, parsed by OmegaConf (not merged, not validated yet)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read config file {str(path)!r}: {err}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)  # the document's shape
        raw = OmegaConf.load(io.StringIO(text)) if isinstance(node, yaml.MappingNode) else None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {_one_line(err)}") from None
    if node is None or (isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"):
        raise ConfigError(
            f"config file {str(path)!r} is empty (no keys, only comments or null): give at "
            f"least a name, or start from a preset with '{_BASE_KEY}: demo'"
        )
    if raw is None:
        raise ConfigError(f"config file {str(path)!r} must contain a mapping of sections, got {node.id}")
    return OmegaConf.to_container(raw, resolve=False)


def _resolve_base(value: Any, child: Path) -> Path:
    """The file that ``base: value`` in the file ``child`` names."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{child}: {_BASE_KEY} must be a preset name or a path, got {value!r}")
    if _is_bare_name(value):
        path = _presets_dir() / f"{value}.yaml"
        if not path.is_file():
            names = sorted(p.stem for p in _presets_dir().glob("*.yaml"))
            raise ConfigError(f"{child}: {_BASE_KEY} {value!r}: no such preset (available: {', '.join(names)})")
        return path
    path = (child.parent / Path(value).expanduser()).resolve()
    if not path.is_file():
        raise ConfigError(f"{child}: {_BASE_KEY} {value!r}: no such file {str(path)!r}")
    return path


def _load_file(path: Path, chain: tuple[Path, ...] = ()) -> DictConfig:
    """The structured config of a file: its ``base`` chain resolved (parent first), then its keys."""
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain[chain.index(path) :], path))
        raise ConfigError(f"cycle in {_BASE_KEY}: {cycle}")
    raw = _read_yaml(path)
    cfg = _schema()
    if _BASE_KEY in raw:
        cfg = _load_file(_resolve_base(raw.pop(_BASE_KEY), path), (*chain, path))
    try:
        return _merge(cfg, _prepare_layer(raw, str(path)))
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    except OmegaConfBaseException as err:
        raise _config_error(err, f"{path}: ") from None


def load_config(path_or_name: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read a config file or preset (with its ``base`` chain), apply ``dotted.key=value``
    overrides in order, validate, return it.

    ``path_or_name``: a bare name (no ``/``, no ``.yaml``) is a preset from :func:`list_presets`;
    anything else is a path to a YAML file. Raises :class:`ConfigError` for a missing or empty file
    or preset, invalid YAML, a ``base`` cycle, an unknown key, a wrong type or an invalid value."""
    if isinstance(overrides, str):
        raise TypeError("overrides must be a sequence of 'key=value' strings, not one string")
    s = os.fspath(path_or_name)
    if _is_bare_name(s):
        path = preset_path(s)
    else:
        path = Path(s).expanduser()
        if not path.is_file():
            stem = path.name.rsplit(".", 1)[0]
            hint = f"; the preset {stem!r} is loaded by its bare name: {stem}" if stem in list_presets() else ""
            raise ConfigError(
                f"no such config file or preset: {s!r}{hint} (presets: {', '.join(list_presets()) or 'none'})"
            )
    return _to_config(_apply_all(_load_file(path), overrides))


def save_config(cfg: ExperimentConfig, path: str | Path) -> Path:
    """Write ``cfg`` as YAML (every key, in schema order, fully resolved: no ``base``); returns
    the path. Reading it back with :func:`load_config` gives an equal config."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None, width=100)
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# comparing
# --------------------------------------------------------------------------------------------


def _flatten(cfg: ExperimentConfig) -> dict[str, Any]:
    """Dotted field key -> value (free-form mappings are one value)."""
    out: dict[str, Any] = {}
    for k, v in config_to_dict(cfg).items():
        if k in _SECTIONS:
            out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            out[k] = v
    return out


def diff_configs(a: ExperimentConfig, b: ExperimentConfig, ignore: Iterable[str] = ()) -> list[tuple[str, Any, Any]]:
    """The fields whose values differ: ``[(dotted_key, value_in_a, value_in_b), ...]`` in schema
    order, leaving out the keys in ``ignore`` (e.g. :data:`RESUME_SAFE_KEYS`; a section name
    ignores the whole section). An unknown key in ``ignore`` is a :class:`ConfigError`."""
    fa, fb = _flatten(a), _flatten(b)
    ignore = tuple(ignore)
    for key in ignore:
        if key not in fa and key not in _SECTIONS:
            close = difflib.get_close_matches(key, [*fa, *_SECTIONS], n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"diff_configs: unknown key {key!r} in ignore{hint} (valid: a section "
                f"name or a dotted field key such as {', '.join(RESUME_SAFE_KEYS[:2])})"
            )
    return [(k, fa[k], fb[k]) for k in fa if k not in ignore and k.split(".", 1)[0] not in ignore and fa[k] != fb[k]]
