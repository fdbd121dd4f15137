"""Checkpoints: released format, authors' training checkpoints, ours; safe loading; clear errors."""

from __future__ import annotations

import pytest
import torch

import patchforcing as pf
from patchforcing.checkpoints import (
    CheckpointError,
    atomic_write,
    load_state_dict_strict,
    read_safetensors_metadata,
    save_released_format,
)

from conftest import randomize


def _inputs(model, B=2):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, model.in_channels, *model.image_size, generator=g)
    t = torch.rand(B, model.num_patches, generator=g) if model.per_patch_time else torch.rand(B, generator=g)
    return x, t, torch.arange(B) % (model.num_classes + 1)


def _same_outputs(a, b):
    x, t, y = _inputs(a)
    va, la = a(x, t, y)
    vb, lb = b(x, t, y)
    assert torch.equal(va, vb) and (la is None and lb is None or torch.equal(la, lb))


def test_released_format_round_trip(tmp_path, tiny_pft):
    path = save_released_format(tiny_pft, tmp_path / "pft-t_ema.ckpt")
    raw = torch.load(path, weights_only=True)
    assert raw["config"]["target"].endswith("PatchForcingDiT")
    loaded = pf.load_model(path)
    assert not loaded.training
    _same_outputs(tiny_pft, loaded)


def test_released_file_with_compile_prefix_and_extra_params(tmp_path, tiny_pft):
    c = tiny_pft.config
    obj = {
        "config": {"target": "patch_flow.models.pf_transformer.PatchForcingDiT",
                   "params": {"in_channels": c.in_channels, "input_size": c.input_size, "depth": c.depth,
                              "hidden_size": c.hidden_size, "patch_size": c.patch_size, "num_heads": c.num_heads,
                              "num_classes": c.num_classes, "compile": True, "predict_uncertainty": True}},
        "state_dict": {"_orig_mod." + k: v for k, v in tiny_pft.state_dict().items()},
    }
    torch.save(obj, tmp_path / "x.ckpt")
    _same_outputs(tiny_pft, pf.load_model(tmp_path / "x.ckpt"))


def test_authors_training_checkpoint_takes_ema(tmp_path, tiny_pft):
    ema = randomize(pf.PatchForcingTransformer.from_config(tiny_pft.config), seed=7)
    c = tiny_pft.config
    sd = {f"model.{k}": v for k, v in tiny_pft.state_dict().items()}
    sd.update({f"ema_model.{k}": v for k, v in ema.state_dict().items()})
    params = {k: getattr(c, k) for k in ["in_channels", "input_size", "depth", "hidden_size", "patch_size", "num_heads", "num_classes"]}
    obj = {"state_dict": sd, "hyper_parameters": {"model": {"target": "x.PatchForcingDiT", "params": params}}}
    torch.save(obj, tmp_path / "train.ckpt")
    _same_outputs(ema, pf.load_model(tmp_path / "train.ckpt"))
    _same_outputs(tiny_pft, pf.load_model(tmp_path / "train.ckpt", use_ema=False))


def test_safetensors_export_round_trip(tmp_path, tiny_pft, tiny_sit):
    for model in (tiny_pft, tiny_sit):
        path = pf.save_model(model, tmp_path / "m.safetensors", metadata={"vae": None, "note": "hi"})
        loaded = pf.load_model(path)
        assert loaded.config == model.config
        _same_outputs(model, loaded)
        assert read_safetensors_metadata(path)["note"] == "hi"
        # a directory holding model.safetensors
        (tmp_path / "d").mkdir(exist_ok=True)
        pf.save_model(model, tmp_path / "d" / "model.safetensors")
        _same_outputs(model, pf.load_model(tmp_path / "d"))


def test_mismatched_checkpoint_lists_keys(tmp_path, tiny_pft):
    sd = dict(tiny_pft.state_dict())
    sd.pop("blocks.0.attn.qkv.bias")
    sd["blocks.9.extra.weight"] = torch.zeros(3)
    sd["final_layer.linear.weight"] = torch.zeros(5, 64)
    with pytest.raises(CheckpointError) as err:
        load_state_dict_strict(tiny_pft, sd)
    msg = str(err.value)
    assert "missing keys (1): blocks.0.attn.qkv.bias" in msg
    assert "unexpected keys (1): blocks.9.extra.weight" in msg
    assert "final_layer.linear.weight: checkpoint (5, 64) vs model (16, 64)" in msg
    # the same through load_model of a released file whose config does not fit its weights
    obj = {"config": {"target": "a.PatchForcingDiT", "params": {"in_channels": 3, "input_size": 8, "depth": 2,
                                                                "hidden_size": 64, "patch_size": 2, "num_heads": 4,
                                                                "num_classes": 7}},
           "state_dict": tiny_pft.state_dict()}
    torch.save(obj, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError, match="y_embedder.embedding_table.weight: checkpoint \\(6, 64\\) vs model \\(8, 64\\)"):
        pf.load_model(tmp_path / "bad.ckpt")


def test_unknown_target_and_params(tmp_path, tiny_pft):
    torch.save({"config": {"target": "evil.module.Thing", "params": {}}, "state_dict": {}}, tmp_path / "a.ckpt")
    with pytest.raises(CheckpointError, match="unknown model target 'evil.module.Thing'"):
        pf.load_model(tmp_path / "a.ckpt")
    torch.save({"config": {"target": "x.PatchForcingDiT", "params": {"depth": 2, "weird": 1}}, "state_dict": {}}, tmp_path / "b.ckpt")
    with pytest.raises(CheckpointError, match="weird"):
        pf.load_model(tmp_path / "b.ckpt")
    torch.save({"something": 1}, tmp_path / "c.ckpt")
    with pytest.raises(CheckpointError, match="unrecognised checkpoint layout"):
        pf.load_model(tmp_path / "c.ckpt")


class Payload:
    """Stands for arbitrary code a malicious checkpoint would make torch.load run."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_code_is_refused(tmp_path, capsys):
    torch.save({"config": Payload(), "state_dict": {}}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="refusing to unpickle code"):
        pf.load_model(tmp_path / "evil.ckpt")
    assert "must never run" not in capsys.readouterr().out


def test_corrupt_and_missing_files(tmp_path, tiny_pft):
    path = save_released_format(tiny_pft, tmp_path / "m.ckpt")
    data = path.read_bytes()
    (tmp_path / "trunc.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read"):
        pf.load_model(tmp_path / "trunc.ckpt")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="safetensors"):
        pf.load_model(tmp_path / "junk.safetensors")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        pf.load_model(tmp_path / "nope.ckpt")
    with pytest.raises(CheckpointError, match="directory without"):
        pf.load_model(tmp_path)


def test_hub_id_without_network_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="hub"):
        pf.load_model("someone/pft-b-2")


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def failing(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(target, failing)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]
