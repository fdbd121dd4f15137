"""Config dataclasses <-> dicts (utils.configs) and the saved dicts of the model configs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest

from patchforcing.models.t2i import T2IConfig
from patchforcing.models.transformer import ModelConfig, RepaConfig
from patchforcing.utils.configs import config_from_dict, config_to_dict


@dataclass(frozen=True)
class _Inner:
    a: int = 1


@dataclass(frozen=True)
class _Cfg:
    KIND: ClassVar[str] = "x"  # not a key
    size: int | tuple[int, int] = 4
    name: str = "n"
    inner: _Inner | None = None


def test_config_dicts_round_trip_tuples_and_nested():
    c = _Cfg(size=(2, 3), inner=_Inner(5))
    d = config_to_dict(c)
    assert d == {"size": [2, 3], "name": "n", "inner": {"a": 5}}
    back = config_from_dict(_Cfg, json.loads(json.dumps(d)), convert={"inner": lambda v: _Inner(**v)})
    assert back == c and back.size == (2, 3) and isinstance(back.inner, _Inner)
    assert config_from_dict(_Cfg, {}) == _Cfg()  # missing keys: defaults
    with pytest.raises(ValueError, match=r"unknown thing keys: \['KIND', 'zz'\]; known: \['inner', 'name', 'size'\]"):
        config_from_dict(_Cfg, {"zz": 1, "KIND": "y", "name": "m"}, what="thing")


def test_model_config_dicts_are_unchanged():
    """The dicts checkpoints store: key order, lists for tuples, the nested repa, t2i's model_type."""
    m = ModelConfig(input_size=(16, 32), depth=2, repa=RepaConfig(2, 8, 16))
    d = m.to_dict()
    assert list(d) == [
        "input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "mlp_ratio",
        "num_classes", "per_patch_time", "predict_uncertainty", "repa",
    ]  # fmt: skip
    assert d["input_size"] == [16, 32] and d["repa"] == {"encoder_depth": 2, "z_dim": 8, "projector_dim": 16}
    assert ModelConfig.from_dict(json.loads(json.dumps(d))) == m
    assert ModelConfig().to_dict()["repa"] is None and ModelConfig.from_dict(ModelConfig().to_dict()) == ModelConfig()
    with pytest.raises(ValueError, match=r"unknown model config keys: \['model_type'\]"):
        ModelConfig.from_dict({"model_type": "t2i"})
    t = T2IConfig(input_size=(8, 16), depth=1)
    td = t.to_dict()
    assert list(td)[:3] == ["model_type", "input_size", "patch_size"] and td["model_type"] == "t2i"
    assert td["input_size"] == [8, 16] and T2IConfig.from_dict(json.loads(json.dumps(td))) == t
    with pytest.raises(ValueError, match=r"unknown text-to-image model config keys: \['zz'\]"):
        T2IConfig.from_dict({**td, "zz": 0})
    with pytest.raises(ValueError, match="not a text-to-image model config: model_type 'pft'"):
        T2IConfig.from_dict({**td, "model_type": "pft"})
