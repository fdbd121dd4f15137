"""Checkpoints: released format, authors' training checkpoints, ours; safe loading; clear errors."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from safetensors.torch import save_file

import patchforcing as pf
import patchforcing.checkpoints as checkpoints_module
from conftest import randomize
from patchforcing.autoencoders import autoencoder_spec_from_checkpoint
from patchforcing.checkpoints import (
    CheckpointError,
    export_run,
    load_state_dict_strict,
    read_safetensors_metadata,
    save_released_format,
)
from patchforcing.utils.io import atomic_write


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
        "config": {
            "target": "patch_flow.models.pf_transformer.PatchForcingDiT",
            "params": {
                "in_channels": c.in_channels,
                "input_size": c.input_size,
                "depth": c.depth,
                "hidden_size": c.hidden_size,
                "patch_size": c.patch_size,
                "num_heads": c.num_heads,
                "num_classes": c.num_classes,
                "compile": True,
                "predict_uncertainty": True,
            },
        },
        "state_dict": {"_orig_mod." + k: v for k, v in tiny_pft.state_dict().items()},
    }
    torch.save(obj, tmp_path / "x.ckpt")
    _same_outputs(tiny_pft, pf.load_model(tmp_path / "x.ckpt"))


def test_authors_training_checkpoint_takes_ema(tmp_path, tiny_pft):
    ema = randomize(pf.PatchForcingTransformer.from_config(tiny_pft.config), seed=7)
    c = tiny_pft.config
    sd = {f"model.{k}": v for k, v in tiny_pft.state_dict().items()}
    sd.update({f"ema_model.{k}": v for k, v in ema.state_dict().items()})
    params = {
        k: getattr(c, k)
        for k in ["in_channels", "input_size", "depth", "hidden_size", "patch_size", "num_heads", "num_classes"]
    }
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
    obj = {
        "config": {
            "target": "a.PatchForcingDiT",
            "params": {
                "in_channels": 3,
                "input_size": 8,
                "depth": 2,
                "hidden_size": 64,
                "patch_size": 2,
                "num_heads": 4,
                "num_classes": 7,
            },
        },
        "state_dict": tiny_pft.state_dict(),
    }
    torch.save(obj, tmp_path / "bad.ckpt")
    with pytest.raises(
        CheckpointError, match="y_embedder.embedding_table.weight: checkpoint \\(6, 64\\) vs model \\(8, 64\\)"
    ):
        pf.load_model(tmp_path / "bad.ckpt")


def test_unknown_target_and_params(tmp_path, tiny_pft):
    torch.save({"config": {"target": "evil.module.Thing", "params": {}}, "state_dict": {}}, tmp_path / "a.ckpt")
    with pytest.raises(CheckpointError, match="unknown model target 'evil.module.Thing'"):
        pf.load_model(tmp_path / "a.ckpt")
    torch.save(
        {"config": {"target": "x.PatchForcingDiT", "params": {"depth": 2, "weird": 1}}, "state_dict": {}},
        tmp_path / "b.ckpt",
    )
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


# --------------------------------------------------------------------------------------------
# local paths vs hub ids, and hub failures (never the network: HF_HUB_OFFLINE / monkeypatching)
# --------------------------------------------------------------------------------------------


def _no_hub(*args, **kwargs):
    raise AssertionError("a local-looking path was looked up on the hub")


@pytest.mark.parametrize(
    "source",
    ["runs/typo/checkpoints/last.pt", "exports/pft.safetensors", "./runs/typo", "~/no/such/run", "/no/such/dir"],
)
def test_mistyped_local_path_is_never_a_hub_id(monkeypatch, source):
    monkeypatch.setattr(checkpoints_module, "_hub_download", _no_hub)
    monkeypatch.setattr(checkpoints_module, "hub_download", _no_hub, raising=False)
    with pytest.raises(CheckpointError) as err:
        pf.load_model(source)
    assert str(err.value) == f"no such checkpoint file or directory: {source}"


def test_hub_id_offline_names_repo_and_file(monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as err:
        pf.load_model("someone/pft-b-2")
    assert str(err.value) == (
        "'someone/pft-b-2' is not a local path; tried hub repo 'someone/pft-b-2' file 'model.safetensors': "
        "offline (HF_HUB_OFFLINE=1) and not in the Hugging Face cache"
    )
    with pytest.raises(CheckpointError, match="tried hub repo 'someone/repo' file 'sub/w.safetensors': offline"):
        pf.load_model("hf://someone/repo/sub/w.safetensors")


class _FakeHub:
    """Stands in for huggingface_hub: a probe that fails or not, and a cache that has a file or not."""

    def __init__(self, probe_error=None, cached=None, downloaded=None):
        self.probe_error, self.cached, self.downloaded = probe_error, cached, downloaded
        self.probes, self.downloads = [], []

    def install(self, monkeypatch):
        hub = pytest.importorskip("huggingface_hub")
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setattr(hub, "get_hf_file_metadata", self.get_hf_file_metadata)
        monkeypatch.setattr(hub, "hf_hub_download", self.hf_hub_download)

    def get_hf_file_metadata(self, url, timeout=None, **kwargs):
        self.probes.append((url, timeout))
        if self.probe_error is not None:
            raise self.probe_error
        return object()

    def hf_hub_download(self, repo_id, filename, subfolder=None, local_files_only=False, **kwargs):
        self.downloads.append((repo_id, filename, local_files_only))
        if local_files_only:
            if self.cached is None:
                raise FileNotFoundError("not in the cache")
            return str(self.cached)
        if self.probe_error is not None:
            raise AssertionError("downloaded (with its retries) although the probe failed")
        return str(self.downloaded)


def test_unreachable_hub_fails_fast_with_one_probe(monkeypatch):
    fake = _FakeHub(probe_error=ConnectionError("[Errno 101] Network is unreachable"))
    fake.install(monkeypatch)
    with pytest.raises(CheckpointError) as err:
        pf.load_model("a/b")
    assert str(err.value) == (
        "'a/b' is not a local path; tried hub repo 'a/b' file 'model.safetensors': the hub is unreachable "
        "(ConnectionError: [Errno 101] Network is unreachable); set HF_HUB_OFFLINE=1 to use the cache only"
    )
    assert len(fake.probes) == 1 and fake.probes[0][1] <= 10  # one request, a short timeout
    assert fake.downloads == [("a/b", "model.safetensors", True)]  # the cache was asked, nothing downloaded


def test_unreachable_hub_falls_back_to_the_cache(monkeypatch, tmp_path, tiny_pft):
    cached = pf.save_model(tiny_pft, tmp_path / "cache" / "model.safetensors")
    fake = _FakeHub(probe_error=ConnectionError("down"), cached=cached)
    fake.install(monkeypatch)
    _same_outputs(tiny_pft, pf.load_model("a/b"))
    assert fake.downloads == [("a/b", "model.safetensors", True)]


def test_reachable_hub_downloads(monkeypatch, tmp_path, tiny_pft):
    fetched = pf.save_model(tiny_pft, tmp_path / "dl" / "w.safetensors")
    fake = _FakeHub(downloaded=fetched)
    fake.install(monkeypatch)
    _same_outputs(tiny_pft, pf.load_model("hf://a/b/w.safetensors"))
    assert fake.downloads == [("a/b", "w.safetensors", False)]
    assert fake.probes[0][0].endswith("/a/b/resolve/main/w.safetensors")


# --------------------------------------------------------------------------------------------
# one-line errors for bad model configs
# --------------------------------------------------------------------------------------------


def _train_ckpt(path, model, **overrides):
    obj = {"format": "patchforcing-train", "model_config": model.config.to_dict(), "ema": model.state_dict()}
    obj.update(overrides)
    if obj.get("model_config") is None:
        obj.pop("model_config")
    torch.save(obj, path)
    return path


def _cfg(model, **changes):
    d = model.config.to_dict()
    d.update(changes)
    return d


@pytest.mark.parametrize(
    "make_cfg, problem",
    [
        (lambda m: None, "training checkpoint without 'model_config' (see docs/checkpoint-format.md)"),
        (lambda m: "PFT-B/2", "model_config must be a dict of model settings, got str"),
        (lambda m: _cfg(m, depht=2), "bad model_config: unknown fields ['depht'] (known: "),
        (lambda m: _cfg(m, depth="2"), "bad model_config: depth must be an integer, got '2' (str)"),
        (lambda m: _cfg(m, per_patch_time="yes"), "bad model_config: per_patch_time must be true or false, got 'yes'"),
        (lambda m: _cfg(m, input_size=[8]), "bad model_config: input_size must be an integer or a pair of integers"),
        (
            lambda m: _cfg(m, num_heads=5),
            "model_config does not describe a valid model: width 64 is not divisible by 5",
        ),
    ],
)
def test_bad_model_config_is_one_line_naming_the_file(tmp_path, tiny_pft, make_cfg, problem):
    path = _train_ckpt(tmp_path / "last.pt", tiny_pft, model_config=make_cfg(tiny_pft))
    for load in (pf.load_model, lambda p: export_run(p, tmp_path / "out.safetensors")):
        with pytest.raises(CheckpointError) as err:
            load(path)
        msg = str(err.value)
        assert msg.startswith(f"{path}: ") and problem in msg and "\n" not in msg
    assert not (tmp_path / "out.safetensors").exists()


def test_bad_model_config_in_safetensors_and_released_files(tmp_path, tiny_pft):
    sd = {k: v.contiguous() for k, v in tiny_pft.state_dict().items()}
    save_file(sd, tmp_path / "a.safetensors", metadata={"model_config": '{"depth": "2"}'})
    with pytest.raises(CheckpointError, match=r"a\.safetensors: bad model_config: depth must be an integer, got '2'"):
        pf.load_model(tmp_path / "a.safetensors")
    save_file(sd, tmp_path / "b.safetensors", metadata={"model_config": "{not json"})
    with pytest.raises(CheckpointError, match=r"b\.safetensors: the 'model_config' metadata is not valid JSON"):
        pf.load_model(tmp_path / "b.safetensors")
    params = {"in_channels": 3, "input_size": 8, "depth": "two", "hidden_size": 64, "patch_size": 2, "num_heads": 4}
    torch.save({"config": {"target": "x.PatchForcingDiT", "params": params}, "state_dict": sd}, tmp_path / "r.ckpt")
    with pytest.raises(CheckpointError) as err:
        pf.load_model(tmp_path / "r.ckpt")
    assert (
        str(err.value)
        == f"{tmp_path / 'r.ckpt'}: bad released config params: depth must be an integer, got 'two' (str)"
    )


# --------------------------------------------------------------------------------------------
# what is wrong with an unreadable file, never "retry with weights_only=False"
# --------------------------------------------------------------------------------------------


def test_random_bytes_are_not_called_pickled_objects(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(bytes((i * 37 + 11) % 256 for i in range(4096)))  # starts with neither PK nor \x80
    with pytest.raises(CheckpointError) as err:
        pf.load_model(junk)
    assert str(err.value) == f"{junk} is not a torch checkpoint (not a zip/pickle file; truncated or corrupt?)"
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.pt is not a torch checkpoint \(the file is empty"):
        pf.load_model(tmp_path / "empty.pt")
    (tmp_path / "garbled.pt").write_bytes(b"\x80\x02" + b"junkjunk" * 30)  # a pickle header, then garbage
    with pytest.raises(CheckpointError) as err:
        pf.load_model(tmp_path / "garbled.pt")
    assert "cannot read" in str(err.value) and "pickle stream" in str(err.value)
    assert "weights_only" not in str(err.value)


def test_pickled_code_message_never_suggests_weights_only_false(tmp_path):
    torch.save({"config": Payload(), "state_dict": {}}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError) as err:
        pf.load_model(tmp_path / "evil.ckpt")
    msg = str(err.value)
    assert msg.startswith(f"{tmp_path / 'evil.ckpt'} holds pickled Python objects beyond tensors")
    assert "(it references builtins.print)" in msg or "(it references print)" in msg
    assert "weights_only" not in msg and "safe_globals" not in msg and "\n" not in msg
    # and a truncated zip is "truncated or corrupt", again without torch's advice
    data = save_released_format(pf.create_model("PFT-T/2", input_size=8, depth=1), tmp_path / "m.ckpt").read_bytes()
    (tmp_path / "trunc.ckpt").write_bytes(data[:1000])
    with pytest.raises(CheckpointError) as err:
        pf.load_model(tmp_path / "trunc.ckpt")
    assert str(err.value).startswith(
        f"cannot read {tmp_path / 'trunc.ckpt'} as a torch checkpoint (truncated or corrupt?): "
    )
    assert "weights_only" not in str(err.value)


def test_unreadable_safetensors_header_names_the_file(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header!!}")
    for read in (read_safetensors_metadata, pf.load_model, autoencoder_spec_from_checkpoint):
        with pytest.raises(CheckpointError) as err:
            read(bad)
        assert f"cannot read {bad} as safetensors" in str(err.value)


# --------------------------------------------------------------------------------------------
# permissions of what is written; export's --out
# --------------------------------------------------------------------------------------------


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_saved_files_get_0644_under_umask_022(tmp_path, tiny_pft, umask_022):
    paths = [
        pf.save_model(tiny_pft, tmp_path / "m.safetensors"),
        save_released_format(tiny_pft, tmp_path / "r.ckpt"),
        export_run(_train_ckpt(tmp_path / "last.pt", tiny_pft), tmp_path / "e.safetensors"),
    ]
    assert [stat.S_IMODE(p.stat().st_mode) for p in paths] == [0o644, 0o644, 0o644]


def test_export_refuses_an_existing_directory_before_any_work(tmp_path, tiny_pft):
    run = _train_ckpt(tmp_path / "last.pt", tiny_pft)
    for out in (tmp_path / "exports", tmp_path / "model.safetensors"):
        out.mkdir()
        with pytest.raises(CheckpointError) as err:
            export_run(run, out)
        assert str(err.value).startswith(f"--out {out} is an existing directory; give the .safetensors file to write")
        # the output is checked first: a missing run is not even opened
        with pytest.raises(CheckpointError, match="is an existing directory"):
            export_run(tmp_path / "no-such-run", out)
    path = export_run(run, tmp_path / "exports" / "model.safetensors")
    _same_outputs(tiny_pft, pf.load_model(path))


def test_export_checks_the_output_folder_is_writable_first(tmp_path, tiny_pft, monkeypatch):
    run = _train_ckpt(tmp_path / "last.pt", tiny_pft)
    out = tmp_path / "ro" / "m.safetensors"
    checked = []

    def not_writable(directory, what="output directory"):
        checked.append(directory)
        raise PermissionError(f"{what} {directory} is not writable")

    def no_load(*args, **kwargs):
        raise AssertionError("the run was read before the output was checked")

    monkeypatch.setattr(checkpoints_module, "ensure_writable_dir", not_writable, raising=False)
    monkeypatch.setattr(checkpoints_module, "safe_torch_load", no_load)
    with pytest.raises(CheckpointError) as err:
        export_run(run, out)
    assert str(err.value) == f"the folder of --out {out.parent} is not writable" and checked == [out.parent]
