"""REPA: the projector (authors' layout), the alignment loss, frozen encoders, training with REPA
(exact resume, logging), cached features (encode --repa-encoder) and REPA checkpoints for sampling."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import patchforcing as pf
from patchforcing.checkpoints import load_state_dict_strict, safe_torch_load, save_released_format
from patchforcing.data.augment import hflip_flag
from patchforcing.encoders import (
    ClassifierEncoder,
    Dinov2Encoder,
    FrozenEncoder,
    ModuleEncoder,
    VisionEncoderError,
    load_vision_encoder,
)
from patchforcing.flow.loss import RepaTarget, repa_alignment, resample_tokens, segment_losses, segment_terms
from patchforcing.latents import LatentDataset, LatentStoreError, encode_source, open_image_source, verify_latent_store
from patchforcing.training import ConfigError, Trainer, TrainingError, load_config, train

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
EMOJI = Path(os.environ.get("PATCHFORCING_EMOJI_NPZ", ROOT.parent / "shared/datasets/emoji-google-64.npz"))
REPA_XL = dict(encoder_depth=8, z_dim=768, projector_dim=2048)


def _tiny(repa=None, family="PFT", **kw) -> pf.PatchForcingTransformer:
    args = dict(input_size=8, in_channels=3, num_classes=5, depth=3, hidden_size=64, num_heads=4)
    args.update(kw)
    return pf.create_model(f"{family}-T/2", repa=repa, **args)


def _randomize(model: nn.Module, seed: int = 0, std: float = 0.05) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory) -> Path:
    """A random-weight DINOv2 in its real architecture (2 layers, width 32, patch 14), with
    dropout, saved like a downloaded model."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        hidden_dropout_prob=0.2,
        attention_probs_dropout_prob=0.2,
    )
    path = tmp_path_factory.mktemp("dino") / "dinov2-tiny"
    Dinov2Model(cfg).save_pretrained(path)
    return path


# --------------------------------------------------------------------------------------- model


def test_projector_keys_and_shapes_equal_the_authors_xl2_layout():
    with torch.device("meta"):
        repa = pf.create_model("PFT-XL/2", repa=REPA_XL)
        plain = pf.create_model("PFT-XL/2")
        sit = pf.create_model("SiT-XL/2", repa=REPA_XL)
    shapes = {k: tuple(v.shape) for k, v in repa.state_dict().items()}
    projector = {k: s for k, s in shapes.items() if k.startswith("projector.")}
    # the authors' REPAPatchForcingDiT: projector = Linear(1152, 2048), SiLU, Linear(2048, 2048), SiLU, Linear(2048, 768)
    assert projector == {
        "projector.0.weight": (2048, 1152),
        "projector.0.bias": (2048,),
        "projector.2.weight": (2048, 2048),
        "projector.2.bias": (2048,),
        "projector.4.weight": (768, 2048),
        "projector.4.bias": (768,),
    }
    assert [type(m).__name__ for m in repa.projector] == ["Linear", "SiLU", "Linear", "SiLU", "Linear"]
    rest = {k: s for k, s in shapes.items() if not k.startswith("projector.")}
    assert rest == {k: tuple(v.shape) for k, v in plain.state_dict().items()}  # the backbone is unchanged
    assert {k: tuple(v.shape) for k, v in sit.state_dict().items() if k.startswith("projector.")} == projector
    assert repa.config.repa == pf.models.transformer.RepaConfig(8, 768, 2048)
    assert plain.config.repa is None and plain.projector is None
    assert pf.PatchForcingTransformer.condition_kind == "class" == repa.condition_kind


def test_projector_reads_the_tokens_after_block_encoder_depth_and_leaves_v_unchanged():
    model = _randomize(_tiny(dict(encoder_depth=2, z_dim=12, projector_dim=16))).eval()
    x, t, y = torch.randn(2, 3, 8, 8), torch.rand(2, 16), torch.tensor([1, 5])
    seen = {}
    model.blocks[1].register_forward_hook(lambda m, i, out: seen.setdefault("h", out))
    v, lv, z = model.forward_with_projection(x, t, y)
    assert z.shape == (2, 16, 12)
    assert torch.equal(z, model.projector(seen["h"]))  # block 2 is blocks[1] (1-based, REPA's count)
    v0, lv0 = model(x, t, y)
    assert torch.equal(v, v0) and torch.equal(lv, lv0)
    with pytest.raises(ValueError, match="no REPA projector"):
        _tiny().forward_with_projection(x, t, y)
    with pytest.raises(ValueError, match="exceeds the model depth"):
        _tiny(dict(encoder_depth=4, z_dim=8, projector_dim=8))
    with pytest.raises(ValueError, match="unknown repa keys"):
        _tiny(dict(depth=2))


def test_backbone_init_does_not_depend_on_the_projector():
    torch.manual_seed(3)
    plain = _tiny()
    torch.manual_seed(3)
    repa = _tiny(dict(encoder_depth=1, z_dim=8, projector_dim=8))
    sd = repa.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in plain.state_dict().items())
    # the projector gets REPA's (xavier, zero-bias) init, not the zero init of the output layers
    assert repa.projector[4].weight.abs().sum() > 0 and repa.projector[4].bias.abs().sum() == 0


def test_sampling_never_runs_the_projector():
    model = _randomize(_tiny(dict(encoder_depth=1, z_dim=8, projector_dim=8))).eval()
    calls = []
    model.projector.register_forward_hook(lambda *a: calls.append(1))
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for sampler in ("euler_pf", "look_ahead", "dual_loop"):
        pf.sample(model, noise, sampler, 4, y=torch.tensor([0, 1]), cfg_scale=2.0)
    assert calls == []


# ---------------------------------------------------------------------------------------- loss


def _block_means(f: torch.Tensor, src: int, dst: int) -> torch.Tensor:
    """(B, src*src, D) -> (B, dst*dst, D): mean of each k x k block, by explicit loops."""
    B, _, D = f.shape
    k = src // dst
    grid = f.view(B, src, src, D)
    out = torch.zeros(B, dst, dst, D, dtype=torch.float64)
    for i in range(dst):
        for j in range(dst):
            out[:, i, j] = grid[:, i * k : (i + 1) * k, j * k : (j + 1) * k].double().mean(dim=(1, 2))
    return out.view(B, dst * dst, D)


@pytest.mark.parametrize("encoder_side", [4, 8])  # same grid as the model (4x4 tokens), and a finer one
def test_loss_equals_an_independent_computation(encoder_side):
    torch.manual_seed(0)
    model = _randomize(_tiny(dict(encoder_depth=2, z_dim=6, projector_dim=16)), seed=1).eval()
    B, p = 3, 2
    x1, x0 = torch.randn(B, 3, 8, 8), torch.randn(B, 3, 8, 8)
    t = torch.rand(B, 16)  # per-patch times
    y = torch.tensor([0, 2, 5])
    feats = torch.randn(B, encoder_side**2, 6)
    terms = pf.patch_flow_loss(
        model, x1, y, x0=x0, t=t, uncertainty_weight=0.01, repa=RepaTarget(features=feats, weight=0.5)
    )

    # independent: per-pixel times by repeat_interleave, the model's hidden tokens by a hook
    tp = t.view(B, 1, 4, 4).repeat_interleave(p, 2).repeat_interleave(p, 3)
    xt = tp * x1 + (1 - tp) * x0
    u = (x1 - x0).double()
    hidden = {}
    model.blocks[1].register_forward_hook(lambda m, i, out: hidden.setdefault("h", out))
    v, lv = model(xt, t, y)
    z = model.projector(hidden["h"]).double()
    v, lv = v.double(), lv.double()
    fm = ((v - u) ** 2).mean()
    nll = (0.5 * (math.log(2 * math.pi) + lv + (u - v) ** 2 / lv.exp())).mean()
    target = feats.double() if encoder_side == 4 else _block_means(feats, encoder_side, 4)
    cos = (z * target).sum(-1) / (z.norm(dim=-1) * target.norm(dim=-1))
    repa = -cos.mean()
    for name, want in [("fm", fm), ("nll", nll), ("repa", repa), ("loss", fm + 0.01 * nll + 0.5 * repa)]:
        assert torch.allclose(terms[name].double(), want, rtol=1e-5, atol=1e-6), name
    assert -1 <= float(terms["repa"].detach()) <= 1
    # weight 0 leaves the Patch Forcing loss exactly; no REPA -> no "repa" term
    plain = pf.patch_flow_loss(model, x1, y, x0=x0, t=t)
    zero = pf.patch_flow_loss(model, x1, y, x0=x0, t=t, repa=RepaTarget(features=feats, weight=0.0))
    assert "repa" not in plain and torch.equal(zero["loss"], plain["loss"])


def test_resample_tokens_block_mean_bilinear_and_identity():
    f = torch.arange(2 * 16 * 3, dtype=torch.float32).view(2, 16, 3) ** 1.5
    assert torch.allclose(resample_tokens(f, (2, 2)).double(), _block_means(f, 4, 2))
    assert resample_tokens(f, (4, 4)) is f
    # up-sampling 2x2 -> 4x4 is bilinear with cell centres: along a row [a, .75a+.25b, .25a+.75b, b]
    a, b, c, d = 1.0, 3.0, 5.0, 11.0
    small = torch.tensor([[a, b], [c, d]]).view(1, 4, 1)
    up = resample_tokens(small, (4, 4)).view(4, 4)
    w = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])
    assert torch.allclose(up, w @ torch.tensor([[a, b], [c, d]]) @ w.T)
    # a non-square source needs its grid; a 2x8 grid to 2x4 averages pairs along the width
    wide = torch.randn(1, 16, 2)
    out = resample_tokens(wide, (2, 4), source_grid=(2, 8))
    assert torch.allclose(out, wide.view(1, 2, 4, 2, 2).mean(3).view(1, 8, 2))
    with pytest.raises(ValueError, match="square grid"):
        resample_tokens(torch.randn(1, 12, 2), (2, 2))
    with pytest.raises(ValueError, match="z_dim must be the encoder's width"):
        repa_alignment(torch.randn(1, 4, 3), torch.randn(1, 4, 5))


def test_gradients_reach_projector_and_transformer_never_the_encoder(dino_dir):
    model = _randomize(_tiny(dict(encoder_depth=2, z_dim=32, projector_dim=16))).train()
    enc = load_vision_encoder(str(dino_dir))
    user = nn.Conv2d(3, 32, 2, stride=2)  # a user's module with trainable weights, passed as is
    wrapped = ModuleEncoder(nn.Conv2d(3, 32, 2, stride=2))  # (wrapping freezes it)
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    assert user.weight.requires_grad and not wrapped.net.weight.requires_grad
    for encoder in (enc, wrapped, user):
        model.zero_grad(set_to_none=True)
        terms = pf.patch_flow_loss(
            model, images, torch.tensor([0, 1]), repa=RepaTarget(encoder, images), generator=torch.Generator()
        )
        terms["repa"].backward()  # the alignment term alone
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.projector.parameters())
        assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0  # blocks up to encoder_depth
        assert model.blocks[2].attn.qkv.weight.grad is None  # blocks after it do not feed z
        assert model.final_layer.linear.weight.grad is None
        terms = pf.patch_flow_loss(model, images, None, repa=RepaTarget(encoder, images))
        terms["loss"].backward()
        assert model.final_layer.linear.weight.grad is not None
    assert all(p.grad is None for p in enc.parameters()) and not any(p.requires_grad for p in enc.parameters())
    assert user.weight.grad is None and wrapped.net.weight.grad is None  # no_grad: even trainable weights


def test_encoder_stays_in_eval_mode_and_is_deterministic(dino_dir):
    enc = load_vision_encoder(str(dino_dir))
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    first = enc(images)
    for mode in (True, False, True):
        enc.train(mode)
        assert not enc.training and not any(m.training for m in enc.modules())
    holder = nn.Module()
    holder.enc = enc
    holder.train()  # a parent's .train() does not reach into the encoder either
    assert not any(m.training for m in enc.modules())
    assert torch.equal(enc(images), first)  # dropout is off (the config has p = 0.2)


def test_dinov2_preprocessing_follows_repa(dino_dir):
    from transformers import Dinov2Model

    enc = load_vision_encoder(str(dino_dir))
    assert isinstance(enc, Dinov2Encoder) and enc.dim == 32 and enc.grid(256, 256) == (16, 16)
    assert enc.grid(512, 512) == (32, 32) and enc.grid(32, 32) == (16, 16)  # 224 * max(1, H // 256)
    net = Dinov2Model.from_pretrained(dino_dir).eval()
    images = torch.rand(2, 3, 256, 256) * 2 - 1
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = F.interpolate(((images + 1) / 2 - mean) / std, size=224, mode="bicubic")
    with torch.no_grad():
        want = net(pixel_values=x).last_hidden_state[:, 1:]  # the CLS token dropped
    got = enc(images)
    assert got.shape == (2, 256, 32) and torch.allclose(got, want, atol=1e-5)
    assert enc.fingerprint == load_vision_encoder(str(dino_dir)).fingerprint
    other = Dinov2Encoder(_randomize(Dinov2Model.from_pretrained(dino_dir)))
    assert other.fingerprint != enc.fingerprint


def test_missing_or_bad_encoders_are_clear_errors(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(VisionEncoderError, match="hf download facebook/dinov2-base --local-dir DIR"):
        load_vision_encoder("dinov2-b")
    with pytest.raises(VisionEncoderError, match="patchforcing train-classifier DATA --out"):
        load_vision_encoder(f"classifier:{tmp_path / 'nope.pt'}")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    with pytest.raises(VisionEncoderError, match="not a transformers model|describes a None model"):
        load_vision_encoder(str(tmp_path / "vae"))
    with pytest.raises(VisionEncoderError, match="unknown vision encoder"):
        load_vision_encoder("resnet50")
    with pytest.raises(ValueError, match="either encoder and images"):
        RepaTarget(features=torch.zeros(1, 4, 2), encoder=nn.Identity(), images=torch.zeros(1, 3, 4, 4))


def test_classifier_encoder(tmp_path):
    from patchforcing.data import build_dataset
    from patchforcing.evaluation import train_classifier

    data = build_dataset({"kind": "synthetic", "resolution": 16, "num_classes": 4, "length": 64})
    ckpt = train_classifier(data, tmp_path / "clf.pt", max_steps=2, batch_size=16, width=8, log=None).path
    enc = load_vision_encoder(f"classifier:{ckpt}")
    assert isinstance(enc, ClassifierEncoder) and isinstance(enc, FrozenEncoder)
    assert enc.dim == 32 and enc.grid(16, 16) == (4, 4)  # block 2: R/4 grid, 4 * width channels
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    fmap = x
    for b in range(3):
        fmap = enc.net.blocks[b](fmap)
    assert torch.equal(enc(x), fmap.flatten(2).transpose(1, 2))
    assert enc(F.interpolate(x, size=32)).shape == (3, 16, 32)  # other sizes are resized first


# ------------------------------------------------------------------------------------ training


def _repa_cfg(dino_dir, *overrides):
    return load_config(
        "tiny-test",
        [
            "train.device=cpu",
            "repa.enabled=true",
            f"repa.encoder={dino_dir}",
            "repa.encoder_depth=1",
            "repa.projector_dim=16",
            *overrides,
        ],
    )


def _state(run_dir: Path) -> dict:
    return safe_torch_load(run_dir / "checkpoints" / "last.pt")


def _assert_same_training_state(a: dict, b: dict):
    assert a["step"] == b["step"]
    for key in ("model", "ema"):
        assert set(a[key]) == set(b[key])
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), f"{key}.{k} differs"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert set(sa) == set(sb)
    for i in sa:
        for k in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k])), f"optimizer {i}.{k} differs"


def test_training_with_repa_resumes_exactly_and_logs_the_term(tmp_path, dino_dir, capsys):
    train(_repa_cfg(dino_dir, "train.max_steps=4", "train.ckpt_every=2"), tmp_path / "full")
    train(_repa_cfg(dino_dir, "train.max_steps=2", "train.ckpt_every=2"), tmp_path / "split")
    trainer = Trainer(_repa_cfg(dino_dir, "train.max_steps=4", "train.ckpt_every=2"), tmp_path / "split", resume=True)
    trainer.fit()
    # the encoder: frozen, in eval mode after the loop's model.train(), not optimised, not saved
    enc = trainer.repa_encoder
    assert not any(m.training for m in enc.modules()) and trainer.model.training
    enc_ids = {id(p) for p in enc.parameters()}
    opt_ids = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not enc_ids & opt_ids and opt_ids == {id(p) for p in trainer.model.parameters() if p.requires_grad}
    trainer.close()
    full, split = _state(tmp_path / "full"), _state(tmp_path / "split")
    _assert_same_training_state(full, split)
    assert any(k.startswith("projector.") for k in full["model"]) and not any("net." in k for k in full["model"])
    assert full["model_config"]["repa"] == {"encoder_depth": 1, "z_dim": 32, "projector_dim": 16}

    rows = list(csv.DictReader((tmp_path / "split" / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(-1 <= float(r["repa"]) <= 1 for r in rows)
    loss, fm, nll, rep = (float(rows[-1][k]) for k in ("loss", "fm", "nll", "repa"))
    assert math.isclose(loss, fm + 0.01 * nll + 0.5 * rep, rel_tol=1e-4)
    assert rows[1]["val_repa"] and rows[3]["val_repa"] and not rows[0]["val_repa"]
    tb = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = tb.EventAccumulator(str(tmp_path / "full" / "tb"))
    acc.Reload()
    assert {"train/repa", "val/val_repa"} <= set(acc.Tags()["scalars"])

    # a REPA run loads with its projector; projector=False drops it with a note, samples unchanged
    model = pf.load_model(tmp_path / "full")
    assert model.projector is not None
    capsys.readouterr()
    plain = pf.load_model(tmp_path / "full", projector=False)
    assert plain.projector is None and plain.config.repa is None and "REPA projector" in capsys.readouterr().err
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    a = pf.sample(model, noise, "look_ahead", 3, y=torch.tensor([0, 3]))
    b = pf.sample(plain, noise, "look_ahead", 3, y=torch.tensor([0, 3]))
    assert torch.equal(a.x, b.x)


def test_compile_check_exercises_the_repa_forward(tmp_path, dino_dir, monkeypatch):
    """``train.compile=true`` with REPA: the check runs the projection path too, so a compilation whose
    projector gradients are wrong (here: scaled by 2, only when the projection is asked for) is rejected."""

    def compile_fn(module, options=None):
        if options:  # the fallback: right
            return module

        def wrong(*args, **kwargs):
            out = module(*args, **kwargs)
            if kwargs.get("return_projection"):
                out[2].register_hook(lambda g: 2 * g)
            return out

        return wrong

    monkeypatch.setattr(torch, "compile", compile_fn)
    trainer = Trainer(_repa_cfg(dino_dir, "train.compile=true", "train.max_steps=1"), tmp_path / "run")
    check = trainer.compile_check
    assert check.options == {"cpp.simdlen": 256} and check.tried[0][1] > 0.1
    trainer.close()


def test_repa_checkpoint_into_plain_model_drops_projector_with_note_and_samples_identically(tmp_path, capsys):
    repa = _randomize(_tiny(dict(encoder_depth=2, z_dim=8, projector_dim=16))).eval()
    path = pf.save_model(repa, tmp_path / "repa.safetensors")
    released = save_released_format(repa, tmp_path / "repa.ckpt")
    obj = safe_torch_load(released)
    assert obj["config"]["target"].endswith("REPAPatchForcingDiT")
    assert {k: obj["config"]["params"][k] for k in ("z_dim", "encoder_depth", "projector_dim")} == {
        "z_dim": 8,
        "encoder_depth": 2,
        "projector_dim": 16,
    }
    for src in (path, released):
        loaded = pf.load_model(src)
        assert loaded.config == repa.config
        assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in repa.state_dict().items())
    # the authors' layout without the REPA params takes their defaults (z_dim 768, depth 8, width 2048)
    from patchforcing.checkpoints import model_from_released_config

    params = dict(obj["config"]["params"], depth=8)
    for k in ("z_dim", "encoder_depth", "projector_dim"):
        params.pop(k)
    with torch.device("meta"):
        m = model_from_released_config({"target": "x.REPAPatchForcingDiT", "params": params})
    assert m.config.repa == pf.models.transformer.RepaConfig(8, 768, 2048)

    plain = _tiny()
    capsys.readouterr()
    load_state_dict_strict(plain, repa.state_dict(), "repa.safetensors")
    assert "REPA projector (6 tensors" in capsys.readouterr().err  # never silently
    noise = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 4, 5])
    for sampler in ("euler_pf", "look_ahead"):
        a = pf.sample(repa, noise, sampler, 4, y=y, cfg_scale=1.5)
        b = pf.sample(plain, noise, sampler, 4, y=y, cfg_scale=1.5)
        assert torch.equal(a.x, b.x)
    # a projector that does not fit is still an error, as any other mismatch
    other = _tiny(dict(encoder_depth=2, z_dim=4, projector_dim=16))
    with pytest.raises(pf.CheckpointError, match="mis-shaped"):
        load_state_dict_strict(other, repa.state_dict())


def test_repa_config_checks():
    with pytest.raises(ConfigError, match="repa.encoder is required"):
        load_config("tiny-test", ["repa.enabled=true"])
    with pytest.raises(ConfigError, match="needs data.kind 'latents'"):
        load_config("tiny-test", ["repa.enabled=true", "repa.source=cached"])
    with pytest.raises(ConfigError, match="exceeds the model depth"):
        load_config("tiny-test", ["repa.enabled=true", "repa.encoder=dinov2-b"])  # depth 8 > 2
    with pytest.raises(ConfigError, match="repa.source must be one of"):
        load_config("tiny-test", ["repa.enabled=true", "repa.encoder=x", "repa.encoder_depth=1", "repa.source=disk"])
    c = load_config("imagenet256-pft-xl-repa")
    assert (c.model.name, c.repa.encoder, c.repa.encoder_depth, c.repa.projector_dim, c.repa.weight) == (
        "PFT-XL/2",
        "dinov2-b",
        8,
        2048,
        0.5,
    )
    assert load_config("imagenet256-sit-xl-repa").model.name == "SiT-XL/2"
    assert (
        load_config("imagenet256-pft-b-repa").repa.encoder_depth
        == load_config("imagenet256-sit-b-repa").repa.encoder_depth
    )
    assert load_config("tiny-test").repa.enabled is False  # old configs: REPA off


def test_repa_z_dim_must_match_the_encoder(tmp_path, dino_dir):
    with pytest.raises(TrainingError, match="repa.z_dim \\(7\\) must be the encoder's width 32"):
        Trainer(_repa_cfg(dino_dir, "repa.z_dim=7"), tmp_path / "run")


@pytest.mark.skipif(not EMOJI.exists(), reason="emoji data set not present")
def test_emoji_repa_preset_trains_with_the_offline_classifier(tmp_path):
    from patchforcing.data import build_dataset
    from patchforcing.evaluation import train_classifier

    data = build_dataset({"kind": "npz", "path": str(EMOJI), "resolution": 32})
    ckpt = train_classifier(data, tmp_path / "clf.pt", max_steps=2, batch_size=32, width=8, log=None).path
    overrides = [f"data.path={EMOJI}", f"repa.encoder=classifier:{ckpt}", "train.max_steps=2", "optim.batch_size=8"]
    overrides += ["sample.num=4", "sample.steps=2", "train.sample_every=2", "train.progress=false"]
    res = train(load_config("emoji32-pft-repa", overrides + ["data.val_size=16", "model.depth=2"]), tmp_path / "run")
    assert res.step == 2 and math.isfinite(res.metrics["repa"]) and math.isfinite(res.metrics["val_repa"])
    assert pf.load_model(tmp_path / "run").config.repa.z_dim == 32  # the classifier's block-2 width


# ------------------------------------------------------------------------------ cached features

N_IMAGES, RES = 10, 32


@pytest.fixture(scope="module")
def latent_work(tmp_path_factory, dino_dir):
    from diffusers import AutoencoderKL

    work = tmp_path_factory.mktemp("repa-latents")
    torch.manual_seed(0)
    AutoencoderKL(
        block_out_channels=(8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=4,
        sample_size=RES,
    ).save_pretrained(work / "vae")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:RES, 0:RES] / RES
    imgs = [
        np.clip(np.stack([rng.uniform() * xx + rng.uniform() * yy**2 for _ in range(3)], -1) * 255, 0, 255)
        for _ in range(N_IMAGES)
    ]
    np.savez(work / "images.npz", images=np.stack(imgs).astype(np.uint8), labels=np.arange(N_IMAGES) % 2)
    opts = dict(resolution=RES, flip=True, batch_size=3, shard_size=4, device="cpu", progress=False, dtype="float32")
    res = encode_source(work / "images.npz", work / "store", str(work / "vae"), repa_encoder=str(dino_dir), **opts)
    assert res.encoded_shards == [0, 1, 2]
    return work, opts


def test_cached_features_are_identical_to_online_ones(latent_work, dino_dir):
    work, opts = latent_work
    enc = load_vision_encoder(str(dino_dir))
    images = torch.stack([x for x, _ in open_image_source(work / "images.npz", RES)])
    online, online_flip = enc(images), enc(images.flip(-1))
    ds = LatentDataset(work / "store", repa_features=True, seed=3)
    assert ds.repa_info["fingerprint"] == enc.fingerprint and ds.repa_info["grid"] == [16, 16]
    assert ds.repa_info["dim"] == 32 and ds.repa_info["tokens"] == 256
    for i in range(N_IMAGES):
        assert torch.equal(ds.repa(i), online[i]) and torch.equal(ds.repa(i, flipped=True), online_flip[i])
        z, label, feats = ds[i]
        flipped = hflip_flag(3, 0, i)
        assert torch.equal(feats, online_flip[i] if flipped else online[i])  # the same flip as the latent
    index = verify_latent_store(work / "store")
    assert index["repa"]["spec"] == str(dino_dir)
    # deterministic: a second encode writes the same bytes; rerunning resumes (nothing to do)
    again = encode_source(work / "images.npz", work / "again", str(work / "vae"), repa_encoder=str(dino_dir), **opts)
    assert [s["sha256"] for s in again.index["shards"]] == [s["sha256"] for s in index["shards"]]
    resumed = encode_source(work / "images.npz", work / "store", str(work / "vae"), repa_encoder=enc, **opts)
    assert resumed.encoded_shards == [] and resumed.skipped_shards == [0, 1, 2]
    # another encoder into the same store is refused; a store without features says how to make them
    from transformers import Dinov2Model

    other = Dinov2Encoder(_randomize(Dinov2Model.from_pretrained(dino_dir)), spec="other")
    with pytest.raises(LatentStoreError, match="other settings.*repa"):
        encode_source(work / "images.npz", work / "store", str(work / "vae"), repa_encoder=other, **opts)
    plain = encode_source(work / "images.npz", work / "plain", str(work / "vae"), **opts)
    assert "repa" not in plain.index
    with pytest.raises(LatentStoreError, match="--repa-encoder SPEC"):
        LatentDataset(work / "plain", repa_features=True)


def test_mirrored_features_when_the_store_has_no_flip(latent_work, dino_dir):
    work, opts = latent_work
    out = work / "noflip"
    encode_source(work / "images.npz", out, str(work / "vae"), repa_encoder=str(dino_dir), **{**opts, "flip": False})
    ds = LatentDataset(out, repa_features=True)
    f = ds.repa(0)
    assert torch.equal(ds.repa(0, flipped=True), f.view(16, 16, -1).flip(1).reshape(256, -1))


def test_training_from_cached_and_from_decoded_latents(latent_work, dino_dir, tmp_path):
    work, _ = latent_work
    common = [
        "train.device=cpu",
        "data.kind=latents",
        f"data.path={work / 'store'}",
        f"data.resolution={RES}",
        "data.val_size=2",
        "model.name=PFT-T/2",
        "repa.enabled=true",
        "repa.encoder_depth=1",
        "repa.projector_dim=16",
        "train.max_steps=2",
        "optim.batch_size=4",
        "train.sample_every=2",
        "sample.num=2",
        "sample.steps=2",
    ]
    for source in ("cached", "online"):
        extra = ["repa.source=cached"] if source == "cached" else ["repa.source=online", f"repa.encoder={dino_dir}"]
        trainer = Trainer(load_config("tiny-test", common + extra), tmp_path / source)
        if source == "cached":  # no encoder in the loop: the store's features
            assert trainer.repa_encoder is None and trainer.repa_grid == (16, 16)
        else:  # the encoder sees the latents decoded by the store's VAE
            assert trainer.repa_encoder is not None and trainer.repa_decode is not None
        res = trainer.fit()
        trainer.close()
        assert res.step == 2 and math.isfinite(res.metrics["repa"]) and math.isfinite(res.metrics["val_repa"])
        assert pf.load_model(tmp_path / source).config.repa.z_dim == 32
    with pytest.raises(TrainingError, match="made by"):
        Trainer(load_config("tiny-test", common + ["repa.source=cached", "repa.encoder=dinov2-b"]), tmp_path / "x")


def test_segment_terms_match_segment_losses(dino_dir):
    model = _randomize(_tiny(dict(encoder_depth=1, z_dim=32, projector_dim=8))).eval()
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    enc = load_vision_encoder(str(dino_dir))
    a = segment_terms(model, x, None, 4, torch.Generator().manual_seed(0), repa=RepaTarget(enc, x))
    b = segment_losses(model, x, None, 4, torch.Generator().manual_seed(0))
    assert torch.equal(a["fm"], b) and a["repa"].shape == (4,)
    assert float(a["repa"].min()) >= -1 and float(a["repa"].max()) <= 1


def test_cli_encode_with_repa_encoder_and_a_missing_encoder(latent_work, dino_dir, tmp_path, monkeypatch, capsys):
    from patchforcing.cli import main

    work, _ = latent_work
    args = ["encode", str(work / "images.npz"), "--vae", str(work / "vae"), "--resolution", str(RES), "--quiet"]
    args += ["--repa-encoder", str(dino_dir), "--shard-size", "4", "--device", "cpu", "--out", str(tmp_path / "s")]
    assert main(args) == 0
    assert "REPA features 256x32" in capsys.readouterr().out
    assert main(["encode", "--verify", "--out", str(tmp_path / "s")]) == 0
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = ["train", "tiny-test", "train.device=cpu", "repa.enabled=true", "repa.encoder=dinov2-s"]
    assert main([*run, "repa.encoder_depth=1", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "hf download facebook/dinov2-small --local-dir DIR" in err and "Traceback" not in err
