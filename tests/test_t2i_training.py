"""Text-to-image training end to end: captioned npz and WebDataset shards, the MiniLM encoder and
its embedding cache, caption dropout, exact resume (with RoPE jitter), prompt grids, the checkpoint's
recorded encoder, `patchforcing sample --prompt/--prompts` and the config checks (docs/t2i.md)."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")

from patchforcing.checkpoints import export_run, load_model  # noqa: E402
from patchforcing.cli import main  # noqa: E402
from patchforcing.conditioning import TextEmbeddings  # noqa: E402
from patchforcing.encoders.text import (  # noqa: E402
    TextEncoderError,
    load_text_encoder_for,
    minilm_path,
    text_encoder_info_from_checkpoint,
)
from patchforcing.training import ConfigError, Trainer, load_config, train  # noqa: E402
from patchforcing.training.text import caption_dropout  # noqa: E402
from patchforcing.training.trainer import apply_label_dropout  # noqa: E402

try:
    minilm_path()
except TextEncoderError as err:  # pragma: no cover - the Makefile installs it
    pytest.skip(f"MiniLM not available: {err}", allow_module_level=True)

CAPTIONS = ["red circle", "blue square", "green triangle", "yellow star"]


@pytest.fixture(scope="module")
def captioned_npz(tmp_path_factory):
    """48 16x16 RGB images in 4 categories, one caption per image."""
    rng = np.random.default_rng(0)
    labels = np.arange(48) % 4
    images = (rng.random((48, 16, 16, 3)) * 60).astype(np.uint8)
    for i, c in enumerate(labels):  # a colour per category, so the caption is informative
        images[i, 4:12, 4:12, c % 3] = 230
    caps = np.array([f"{CAPTIONS[c]} number {i % 3}" for i, c in enumerate(labels)])
    path = tmp_path_factory.mktemp("t2i") / "tiny.npz"
    np.savez(path, images=images, labels=labels, captions=caps, classes=np.array(["r", "b", "g", "y"]))
    return path


def _cfg(data, cache, *overrides):
    return load_config(
        "tiny-test",
        [
            "train.device=cpu",
            "model.name=PFT-T2I-T/4",
            "text.encoder=minilm",
            f"text.cache_dir={cache}",
            "data.kind=npz",
            f"data.path={data}",
            "data.resolution=16",
            "data.flip=false",
            "optim.batch_size=8",
            "text.per_prompt=2",
            "sample.num=4",
            "sample.steps=2",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, captioned_npz):
    root = tmp_path_factory.mktemp("t2irun")
    cfg = _cfg(captioned_npz, root / "cache", "train.max_steps=4", "model.rope_jitter=0.3")
    res = train(cfg, root / "run")
    return root, res


def test_t2i_run_writes_prompt_grids_validation_and_records_the_encoder(trained_run):
    root, res = trained_run
    assert res.step == 4
    run = root / "run"
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == ["step_0000003.png", "step_0000004.png"]
    info = text_encoder_info_from_checkpoint(run)
    assert info["spec"] == "minilm" and info["dim"] == 384 and len(info["fingerprint"]) == 64
    rows = (run / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    last = dict(zip(header, rows[-1].split(",")))
    assert np.isfinite(float(last["val_loss"])) and np.isfinite(float(last["loss"]))
    model = load_model(run)
    assert model.condition_kind == "text" and model.rope_jitter == pytest.approx(0.3)


def test_t2i_resume_is_exact_with_rope_jitter(tmp_path, trained_run, captioned_npz):
    root, _ = trained_run
    cfg = _cfg(captioned_npz, root / "cache", "train.max_steps=2", "model.rope_jitter=0.3")
    train(cfg, tmp_path / "split")
    cfg4 = _cfg(captioned_npz, root / "cache", "train.max_steps=4", "model.rope_jitter=0.3")
    train(cfg4, tmp_path / "split", resume=True)
    a = torch.load(root / "run" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "checkpoints" / "last.pt", weights_only=True)
    for key in ("model", "ema"):
        for name, t in a[key].items():
            assert torch.equal(t, b[key][name]), (key, name)


def test_compile_check_on_a_text_model_is_deterministic_and_leaves_the_run_alone(
    tmp_path, trained_run, captioned_npz, monkeypatch
):
    """``train.compile=true`` for a text-to-image model: the check's probe (captions, RoPE jitter) sees the same
    inputs on every call, so a compilation equal to eager agrees exactly, and the run is the eager run."""
    root, _ = trained_run
    monkeypatch.setattr(torch, "compile", lambda module, options=None: module)
    cfg = _cfg(captioned_npz, root / "cache", "train.max_steps=4", "model.rope_jitter=0.3", "train.compile=true")
    trainer = Trainer(cfg, tmp_path / "c")
    assert trainer.compile_check.tried == [({}, 0.0)] and trainer.compile_check.compiled
    trainer.fit()
    trainer.close()
    a = torch.load(root / "run" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "c" / "checkpoints" / "last.pt", weights_only=True)
    for key in ("model", "ema"):
        for name, t in a[key].items():
            assert torch.equal(t, b[key][name]), (key, name)


def test_caption_dropout_replaces_rows_by_the_empty_caption_with_the_label_dropout_draw():
    B, L, D = 64, 5, 3
    tokens = torch.randn(B, L, D)
    emb = TextEmbeddings(
        tokens, torch.ones(B, L, dtype=torch.bool), torch.full((2, D), 7.0), torch.ones(2, dtype=torch.bool)
    )
    out = caption_dropout(emb, 0.3, torch.Generator().manual_seed(5))
    labels = apply_label_dropout(torch.zeros(B, dtype=torch.long), 0.3, 10, torch.Generator().manual_seed(5))
    dropped = labels == 10  # the same draw decides which rows are dropped
    assert 0 < int(dropped.sum()) < B
    assert torch.equal(out.tokens[dropped, :2], torch.full((int(dropped.sum()), 2, D), 7.0))
    assert not out.mask[dropped, 2:].any()  # the empty caption is 2 tokens; the rest is padding
    assert torch.equal(out.tokens[~dropped], tokens[~dropped]) and out.mask[~dropped].all()
    assert caption_dropout(emb, 0.0, None) is emb


def test_sample_cli_with_prompts_grid_and_resumable_npz(tmp_path, trained_run, capsys):
    root, _ = trained_run
    run = root / "run"
    assert main(["sample", str(run), "--prompt", "red circle", "--prompt", "blue square", "--per-prompt", "3",
                 "--steps", "2", "--cfg", "2", "--out", str(tmp_path / "grid.png")]) == 0  # fmt: skip
    assert Image.open(tmp_path / "grid.png").size[0] > 3 * 16
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("red circle\n\nyellow star\ngreen triangle\n")
    args = ["sample", str(run), "--prompts", str(prompts), "--num-samples", "6", "--batch-size", "4",
            "--sampler", "look_ahead", "--steps", "2", "--shard-size", "4", "--out", str(tmp_path / "s.npz")]  # fmt: skip
    assert main(args) == 0
    with np.load(tmp_path / "s.npz") as f:
        assert f["arr_0"].shape == (6, 16, 16, 3)
        assert list(f["captions"]) == ["red circle", "yellow star", "green triangle"] * 2
    first = np.load(tmp_path / "s.npz")["arr_0"]
    assert main(args) == 0  # a rerun finds the finished shards
    assert np.array_equal(np.load(tmp_path / "s.npz")["arr_0"], first)
    prompts.write_text("something else\n")
    assert main(args) != 0  # other prompts: refused, not mixed into the existing shards
    assert "prompt" in capsys.readouterr().err.lower()


def test_sample_cli_refuses_prompts_for_class_models_and_no_prompts_for_text_models(tmp_path, trained_run, capsys):
    root, _ = trained_run
    assert main(["sample", str(root / "run"), "--steps", "2", "--out", str(tmp_path / "g.png")]) != 0
    assert "--prompt" in capsys.readouterr().err


def test_exported_t2i_model_keeps_its_encoder(tmp_path, trained_run):
    root, _ = trained_run
    out = export_run(root / "run", tmp_path / "m.safetensors")
    model = load_model(out)
    enc = load_text_encoder_for(out, model=model, device="cpu")
    assert enc.fingerprint == text_encoder_info_from_checkpoint(root / "run")["fingerprint"]


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["model.name=PFT-T/4", "text.encoder=minilm", "data.kind=npz", "data.path=x.npz"], "not a text-to-image"),
        (["model.name=PFT-T2I-T/4"], "set text.encoder"),
        (["model.name=PFT-T2I-T/4", "text.encoder=minilm"], "captioned data"),
        (["model.rope_jitter=0.5"], "text-to-image presets"),
        (["data.kind=shards", "data.path=x.tar"], "captioned images"),
    ],
)
def test_config_checks_name_the_problem(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config("tiny-test", overrides)


def _tar_shards(root, n_shards=2, per=12):
    rng = np.random.default_rng(1)
    paths = []
    for s in range(n_shards):
        path = root / f"shard-{s:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(per):
                buf = io.BytesIO()
                Image.fromarray((rng.random((20, 20, 3)) * 255).astype(np.uint8)).save(buf, format="PNG")
                for ext, data in ((".png", buf.getvalue()), (".txt", CAPTIONS[i % 4].encode())):
                    info = tarfile.TarInfo(f"s{s}_{i:04d}{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def test_t2i_training_streams_webdataset_shards(tmp_path, trained_run):
    pytest.importorskip("webdataset")
    root, _ = trained_run
    _tar_shards(tmp_path)
    cfg = load_config(
        "tiny-test",
        [
            "train.device=cpu",
            "model.name=PFT-T2I-T/4",
            "text.encoder=minilm",
            f"text.cache_dir={root / 'cache'}",
            "data.kind=shards",
            f"data.path={tmp_path}/shard-{{000000..000001}}.tar",
            "data.resolution=16",
            "data.val_size=0",
            "optim.batch_size=8",
            "train.max_steps=4",  # 32 items from 24: the stream rolls over into its next epoch
            "text.per_prompt=1",
            "sample.steps=2",
            "sample.num=2",
        ],
    )
    res = train(cfg, tmp_path / "run")
    assert res.step == 4 and np.isfinite(res.metrics["loss"])
