"""Tests of the experiment-config layer (training/config/) and the YAML presets in configs/."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import pytest
import torch

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

import patchforcing as pf
from patchforcing.flow.timesteps import TIMESTEP_SAMPLERS
from patchforcing.sampling import SAMPLERS
from patchforcing.training.config import (
    DATA_KINDS,
    RESUME_SAFE_KEYS,
    SAMPLE_SAMPLERS,
    ConfigError,
    DataSection,
    ExperimentConfig,
    OptimSection,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    diff_configs,
    list_presets,
    load_config,
    preset_path,
    save_config,
)

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in (REPO / "configs").glob("*.yaml") if not p.stem.startswith("_"))
EXPECTED_PRESETS = {
    "demo",
    "emoji32-pft",
    "emoji32-sit",
    "imagenet256-pft-b",
    "imagenet256-pft-xl",
    "imagenet256-sit-b",
    "imagenet256-sit-xl",
    "tiny-test",
}


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def raises(match: str, fn, *args, **kwargs) -> str:
    """Assert ``fn`` raises ConfigError whose message contains every '|'-separated part."""
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    for part in match.split("|"):
        assert part in msg, f"{part!r} not in {msg!r}"
    return msg


# ---------------------------------------------------------------------------- defaults, presets


def test_defaults_match_schema():
    c = config_from_dict({})
    assert c == ExperimentConfig() == config_from_dict(None)
    assert c.name == "experiment"
    assert c.model.name == "PFT-T/2" and c.model.input_size is None and c.model.mlp_ratio is None
    assert c.data.kind == "synthetic" and c.data.resolution == 32 and c.data.flip is True
    assert c.data.val_size == 256 and c.data.num_workers == 0
    assert c.objective.timestep_sampler == "ltg" and c.objective.timestep_options == {}
    assert c.objective.uncertainty_weight == 0.01 and c.objective.label_dropout == 0.1
    assert c.optim.lr == 1e-4 and c.optim.betas == [0.9, 0.999] and c.optim.eps == 1e-8
    assert c.optim.warmup_steps == 1000 and c.optim.batch_size == 256 and c.optim.grad_accum == 1
    assert c.ema.decay == 0.9999 and c.ema.warmup is True
    assert (c.sample.sampler, c.sample.steps, c.sample.num, c.sample.cfg_scale) == ("euler_pf", 50, 64, 1.0)
    assert c.train.max_steps == 400000 and c.train.precision == "auto" and c.train.val_every is None
    assert c.train.device == "auto" and c.train.progress is True and c.train.compile is False


def test_mutable_defaults_are_not_shared():
    a, b = ExperimentConfig(), ExperimentConfig()
    a.optim.betas.append(0.5)
    a.objective.timestep_options["loc"] = 0.0
    assert b.optim.betas == [0.9, 0.999] and b.objective.timestep_options == {}


def test_presets_listed():
    assert set(list_presets()) == set(PRESETS)
    assert EXPECTED_PRESETS <= set(PRESETS)
    assert preset_path("demo").resolve() == (REPO / "configs" / "demo.yaml").resolve()  # the package links to configs/
    assert preset_path("demo.yaml") == preset_path("demo")
    raises("no preset named 'demoo'|did you mean 'demo'|tiny-test", preset_path, "demoo")


@pytest.mark.parametrize("name", PRESETS)
def test_preset_loads_validates_roundtrips(name, tmp_path):
    c = load_config(name)
    assert c == load_config(REPO / "configs" / f"{name}.yaml") == load_config(str(preset_path(name)))
    d = config_to_dict(c)
    assert config_from_dict(d) == c
    assert save_config(c, tmp_path / "out" / "c.yaml").is_file()
    assert load_config(tmp_path / "out" / "c.yaml") == c
    # every preset file starts with a comment saying what it is and how to run it
    text = preset_path(name).read_text()
    assert text.startswith("#") and f"patchforcing train {name}" in text


@pytest.mark.parametrize("name", PRESETS)
def test_preset_model_builds_on_meta(name):
    c = load_config(name)
    latents = c.data.kind == "latents" or c.autoencoder.online
    text = c.text.encoder is not None
    cond = {"text_dim": 2048 if "1.2B" in c.model.name else 384} if text else {}
    if not text:
        cond["num_classes"] = c.model.num_classes or c.data.num_classes or 1000
    with torch.device("meta"):
        model = pf.create_model(
            c.model.name,
            input_size=c.model.input_size or c.data.resolution // (8 if latents else 1),
            in_channels=c.model.in_channels or ((32 if text else 4) if latents else 3),
            **cond,
            **c.model.preset_overrides(),
        )
    assert next(model.parameters()).device.type == "meta"
    assert model.condition_kind == ("text" if text else "class")
    if name.startswith("imagenet256"):
        assert (model.image_size, model.in_channels, model.num_classes) == ((32, 32), 4, 1000)
        assert model.patch_size == 2 and model.num_patches == 256
        parts = name.split("-")[1:3]  # imagenet256-<family>-<size>[-repa], or the study base imagenet256-<size> (PFT)
        family, size = parts if len(parts) == 2 and parts[0] in ("pft", "sit") else ("pft", parts[0])
        expected = {"b": (12, 768, 12), "xl": (28, 1152, 16)}[size]
        assert (model.config.depth, model.config.hidden_size, model.config.num_heads) == expected
        assert model.predict_uncertainty == (family == "pft") == model.per_patch_time


def test_preset_contents():
    b = load_config("imagenet256-pft-b")
    assert b.name == "pft-b2-imagenet256" and b.model.name == "PFT-B/2"
    assert (b.model.input_size, b.model.in_channels, b.model.num_classes) == (32, 4, 1000)
    assert (b.data.kind, b.data.path, b.data.resolution, b.data.flip) == (
        "latents",
        "data/imagenet256-latents",
        256,
        True,
    )
    assert (b.autoencoder.kind, b.autoencoder.source, b.autoencoder.online) == (
        "kl",
        "stabilityai/sd-vae-ft-ema",
        False,
    )
    assert b.objective.timestep_options == {"loc": 0.7, "scale": 1.0, "std": 0.6}
    assert (b.optim.lr, b.optim.batch_size, b.optim.warmup_steps, b.optim.grad_clip) == (1e-4, 256, 1000, 1.0)
    assert (b.ema.decay, b.train.max_steps, b.train.ckpt_every, b.train.sample_every) == (0.9999, 400000, 10000, 10000)
    xl = load_config("imagenet256-pft-xl")
    assert xl.model.name == "PFT-XL/2"
    assert diff_configs(b, xl) == [
        ("name", "pft-b2-imagenet256", "pft-xl2-imagenet256"),
        ("model.name", "PFT-B/2", "PFT-XL/2"),
    ]
    for size in ("b", "xl"):
        sit = load_config(f"imagenet256-sit-{size}")
        assert sit.model.name == f"SiT-{size.upper()}/2"
        assert sit.objective.timestep_sampler == "uniform" and sit.objective.uncertainty_weight == 0.0
        assert sit.sample.sampler == "euler"
    demo = load_config("demo")
    assert (demo.data.kind, demo.data.num_classes, demo.data.length, demo.data.resolution) == (
        "synthetic",
        8,
        20000,
        32,
    )
    assert demo.model.name == "PFT-T/4" and demo.model.preset_overrides() == {}
    assert (demo.optim.batch_size, demo.optim.lr, demo.optim.warmup_steps) == (64, 1e-3, 100)
    assert (demo.ema.decay, demo.ema.warmup, demo.train.precision) == (0.999, True, "auto")
    assert (demo.train.max_steps, demo.train.ckpt_every, demo.train.sample_every, demo.train.log_every) == (
        1000,
        250,
        500,
        10,
    )
    assert (demo.sample.steps, demo.sample.num) == (25, 64)
    emoji = load_config("emoji32-pft")
    assert (emoji.data.kind, emoji.data.path) == ("npz", "../shared/datasets/emoji-google-64.npz")
    assert (emoji.model.name, emoji.optim.lr, emoji.optim.warmup_steps, emoji.train.max_steps) == (
        "PFT-T/2",
        5e-4,
        200,
        20000,
    )
    esit = load_config("emoji32-sit")
    assert {k for k, _, _ in diff_configs(emoji, esit)} == {
        "name",
        "model.name",
        "objective.timestep_sampler",
        "objective.uncertainty_weight",
        "sample.sampler",
    }
    tiny = load_config("tiny-test")
    assert tiny.model.preset_overrides() == {"depth": 2, "hidden_size": 64, "num_heads": 4}
    assert (tiny.data.resolution, tiny.data.num_classes, tiny.data.length, tiny.data.val_size) == (16, 4, 256, 8)
    assert (tiny.optim.batch_size, tiny.train.max_steps, tiny.train.progress) == (8, 6, False)
    assert (tiny.sample.num, tiny.sample.steps, tiny.train.ckpt_every, tiny.train.sample_every) == (4, 4, 3, 3)


# ---------------------------------------------------------------------------- files


def test_partial_file_fills_defaults(tmp_path):
    p = write(tmp_path, "optim:\n  lr: 3e-4\nema:\ntrain: {max_steps: 10}\n")
    c = load_config(p)
    assert c.optim.lr == 3e-4 and isinstance(c.optim.lr, float)  # YAML 1.1 would read '3e-4' as text
    assert c.train.max_steps == 10 and c.ema == ExperimentConfig().ema
    assert load_config(write(tmp_path, "{}\n", "braces.yaml")) == ExperimentConfig()  # an explicit empty mapping


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n# and another\n", "null\n", "---\n"])
def test_empty_file_refused(tmp_path, text):
    # issue 9: an empty file used to start a 400k-step run with every default
    raises("is empty|empty.yaml|base: demo", load_config, write(tmp_path, text, "empty.yaml"))


def test_int_for_float_becomes_float(tmp_path):
    c = load_config(write(tmp_path, "optim: {lr: 1, grad_clip: 2}\nsample: {cfg_scale: 4}\n"))
    assert c.optim.lr == 1.0 and type(c.optim.lr) is float and type(c.sample.cfg_scale) is float
    assert config_from_dict(config_to_dict(c)) == c


def test_unknown_key_in_file(tmp_path):
    msg = raises(
        "optim.lrr|did you mean 'lr'|weight_decay|grad_accum", load_config, write(tmp_path, "optim:\n  lrr: 0.1\n")
    )
    assert str(tmp_path / "cfg.yaml") in msg
    raises("unknown key 'optimm'|did you mean 'optim'", load_config, write(tmp_path, "optimm: {}\n"))
    raises("unknown key 'model.hiden_size'|'hidden_size'", config_from_dict, {"model": {"hiden_size": 8}})


def test_freeform_dicts_accept_any_key(tmp_path):
    p = write(
        tmp_path,
        "objective:\n  timestep_options: {loc: 0.5, std: 0.3}\n"
        "sample:\n  sampler: dual_loop\n  options: {anything: [1, 2], nested: {x: 1}}\n",
    )
    c = load_config(p)
    assert c.objective.timestep_options == {"loc": 0.5, "std": 0.3}
    assert c.sample.options == {"anything": [1, 2], "nested": {"x": 1}}


def test_bad_files(tmp_path):
    raises("no such config file or preset|nope.yaml", load_config, tmp_path / "nope.yaml")
    raises("no such config file or preset|bare name: demo", load_config, "somewhere/demo.yaml")
    raises("no preset named 'nosuchpreset'|available presets|demo", load_config, "nosuchpreset")
    raises("not valid YAML", load_config, write(tmp_path, "optim: [1,\n"))
    raises("must contain a mapping", load_config, write(tmp_path, "- 1\n- 2\n"))
    raises("optim: expected a mapping", load_config, write(tmp_path, "optim: 3\n"))


# ---------------------------------------------------------------------------- overrides


def test_overrides_parse_types():
    c = load_config(
        "demo",
        [
            "optim.lr=3e-4",
            "train.compile=true",
            "optim.betas=[0.9,0.95]",
            "model.num_classes=null",
            "data.path=null",
            "train.val_every=7",
            "name=my run",
            "model.name=SiT-T/4",
        ],
    )
    assert c.optim.lr == 0.0003 and isinstance(c.optim.lr, float)
    assert c.train.compile is True
    assert c.optim.betas == [0.9, 0.95]
    assert c.model.num_classes is None and c.data.path is None
    assert c.train.val_every == 7 and c.name == "my run" and c.model.name == "SiT-T/4"
    base = load_config("demo")
    assert {k for k, _, _ in diff_configs(base, c)} == {
        "name",
        "model.name",
        "optim.lr",
        "optim.betas",
        "train.compile",
        "train.val_every",
    }


def test_overrides_apply_in_order_and_nested():
    c = load_config(
        "demo",
        [
            "optim.lr=1e-3",
            "optim.lr=2e-3",
            "model.num_classes=5",
            "objective.timestep_options.loc=0.5",
            "objective.timestep_options.std=0.4",
            "sample.options.p=0.4",
            "sample.options={}",
        ],
    )
    assert c.optim.lr == 2e-3 and c.model.num_classes == 5
    assert c.objective.timestep_options == {"loc": 0.5, "std": 0.4}
    assert c.sample.options == {}
    c = load_config("demo", ["optim={lr: 1.0e-2, warmup_steps: 5}"])  # a section: update given keys
    assert (c.optim.lr, c.optim.warmup_steps, c.optim.batch_size) == (1e-2, 5, 64)
    # text fields keep the text of values YAML would read as numbers or booleans
    assert load_config("demo", ["name=2024", "train.device=0"]).name == "2024"
    assert apply_overrides(load_config("demo"), ["optim.lr=5e-4"]).optim.lr == 5e-4


def test_unknown_key_in_override():
    raises("optim.lrr|did you mean 'lr'|weight_decay", load_config, "demo", ["optim.lrr=3e-4"])
    raises("unknown key 'trian'|did you mean 'train'", load_config, "demo", ["trian.max_steps=3"])
    raises("unknown key 'model.foo'|valid keys of 'model'|hidden_size", load_config, "demo", ["model.foo=1"])
    raises("optim.lr is a float field, not a section", load_config, "demo", ["optim.lr.x=1"])
    raises("optim is a section", load_config, "demo", ["optim=3"])
    raises("unknown key 'optim.lrr'|did you mean 'lr'", load_config, "demo", ["optim={lrr: 1}"])
    raises(
        "unknown key 'objective.timestep_sampeler'|did you mean 'timestep_sampler'",
        load_config,
        "demo",
        ["objective.timestep_sampeler=ltg"],
    )


def test_override_syntax_errors():
    raises("not of the form dotted.key=value", load_config, "demo", ["optim.lr"])
    raises("invalid key", load_config, "demo", ["optim..lr=1"])
    raises("invalid key", load_config, "demo", ["=1"])
    raises("cannot parse the value as YAML", load_config, "demo", ["optim.betas=[0.9,"])
    with pytest.raises(TypeError):
        load_config("demo", "optim.lr=1")  # one string, not a list of overrides


@pytest.mark.parametrize(
    "override, parts",
    [
        ("train.max_steps=abc", "train.max_steps|expected int|'abc'"),
        ("train.max_steps=true", "train.max_steps|expected int|True"),
        ("train.max_steps=4e5", "train.max_steps|expected int|400000"),
        ("optim.lr=[1]", "optim.lr|expected float|[1]"),
        ("optim.lr=true", "optim.lr|expected float|True"),
        ("optim.lr=.nan", "optim.lr|finite"),
        ("optim.betas=0.9", "optim.betas|expected list of float|0.9"),
        ("optim.betas=[0.9,x]", "optim.betas|expected list of float|'x'"),
        ("train.compile=maybe", "train.compile|expected bool|'maybe'"),
        ("train.max_steps=null", "train.max_steps|expected int|not Optional"),
        ("model.input_size=abc", "model.input_size|expected int or null|'abc'"),
        ("name=null", "name|expected str|not Optional"),
        ("objective.timestep_options=[1]", "objective.timestep_options|expected mapping"),
    ],
)
def test_wrong_types(override, parts):
    raises(parts, load_config, "demo", [override])


def test_wrong_types_in_dict():
    raises("data.flip|expected bool|'yes please'", config_from_dict, {"data": {"flip": "yes please"}})
    raises("data.resolution|expected int|32.5", config_from_dict, {"data": {"resolution": 32.5}})
    raises("unknown key 'data.resolutoin'|did you mean 'resolution'", config_from_dict, {"data": {"resolutoin": 2}})
    # OmegaConf keeps a number given for a text field as its text; the model name is checked after
    raises("model.name|unknown model '2'", config_from_dict, {"model": {"name": 2}})
    raises("optim: expected a mapping", config_from_dict, {"optim": [1]})
    raises("unknown key 'base'", config_from_dict, {"base": "demo"})  # inheritance is for files only


# ---------------------------------------------------------------------------- semantic checks


@pytest.mark.parametrize(
    "overrides, parts",
    [
        (["data.kind=hdf5"], "data.kind|synthetic, folder, npz, latents|'hdf5'"),
        (["train.precision=fp16"], "train.precision|auto, fp32, bf16|'fp16'"),
        (["optim.batch_size=64", "optim.grad_accum=3"], "optim.batch_size (64)|divisible by optim.grad_accum (3)"),
        (["optim.lr=0"], "optim.lr must be > 0"),
        (["optim.lr=-1e-4"], "optim.lr must be > 0"),
        (["objective.label_dropout=1.0"], "objective.label_dropout|[0, 1)"),
        (["objective.label_dropout=-0.1"], "objective.label_dropout|[0, 1)"),
        (["ema.decay=1"], "ema.decay|(0, 1)"),
        (["ema.decay=0"], "ema.decay|(0, 1)"),
        (["train.max_steps=0"], "train.max_steps must be >= 1"),
        (["train.keep_last=0"], "train.keep_last must be >= 1"),
        (["objective.timestep_sampler=lgt"], "objective.timestep_sampler|ltg|uniform|'lgt'"),
        (["objective.timestep_options.bogus=1"], "objective.timestep_options|bogus"),
        (["sample.sampler=heun"], "sample.sampler|euler, euler_pf, dual_loop, look_ahead|'heun'"),
        (["autoencoder.kind=vqgan"], "autoencoder.kind|auto, kl, tiny, flux2, identity|'vqgan'"),
        (["autoencoder.online=true"], "autoencoder.online needs autoencoder.source"),
        (["autoencoder.source=vae"], "autoencoder.source is set|pixel space|autoencoder.online=true"),
        (["autoencoder.kind=identity", "autoencoder.source=vae"], "'identity'|takes no source"),
        (["autoencoder.scale_factor=0"], "autoencoder.scale_factor must be > 0"),
        (["autoencoder.latents_mean=[0.1, 0.2]"], "latents_mean and autoencoder.latents_std must be set together"),
        (["autoencoder.latents_mean=[0.1]", "autoencoder.latents_std=[1, 2]"], "one value per latent channel"),
        (["autoencoder.latents_mean=[0.1]", "autoencoder.latents_std=[0]"], "latents_std must be > 0"),
        (["model.name=PFT-Q/2"], "model.name|unknown model 'PFT-Q/2'"),
        (["model.name=resnet"], "model.name|unknown model"),
        (["data.kind=npz"], "data.path is required|'npz'"),
        (["data.kind=folder"], "data.path is required|'folder'"),
        (["data.kind=latents"], "data.path is required|'latents'"),
        (["model.hidden_size=100"], "model.hidden_size (100)|model.num_heads (3)"),
        (["model.input_size=30"], "model.input_size (30)|patch size 4"),
        (["data.resolution=30"], "data.resolution (30)|patch size 4"),
        (["optim.betas=[0.9]"], "optim.betas|two numbers"),
        (["train.sample_every=0"], "train.sample_every must be >= 1"),
    ],
)
def test_semantic_errors(overrides, parts):
    raises(parts, load_config, "demo", overrides)


def test_several_problems_reported_together():
    msg = raises("invalid config|optim.lr|ema.decay", load_config, "demo", ["optim.lr=0", "ema.decay=2"])
    assert msg.count("\n") == 2


def test_semantic_ok_cases():
    c = load_config(
        "demo",
        [
            "data.kind=npz",
            "data.path=x.npz",
            "optim.batch_size=64",
            "optim.grad_accum=4",
            "objective.label_dropout=0",
            "objective.timestep_sampler=uniform",
            "sample.sampler=look_ahead",
            "model.name=SiT-XL/2",
            "train.precision=bf16",
        ],
    )
    assert c.data.kind in DATA_KINDS and c.optim.grad_accum == 4 and c.model.name == "SiT-XL/2"
    # latents: the input size is not known here, so the resolution is not checked against the patch
    assert load_config("imagenet256-pft-b", ["model.input_size=null", "data.resolution=250"]).data.resolution == 250
    # online encoding: neither (the model sees resolution / VAE factor)
    c = load_config("demo", ["data.resolution=30", "autoencoder.online=true", "autoencoder.source=vae"])
    assert c.autoencoder.online and c.data.resolution == 30
    assert load_config("imagenet256-pft-b", ["data.kind=folder", "data.path=imgs", "autoencoder.online=true"])
    raises("data.kind 'latents' is already encoded", load_config, "imagenet256-pft-b", ["autoencoder.online=true"])


# ---------------------------------------------------------------------------- diff, save, dicts


def test_diff_configs_and_resume_safe_keys():
    a = load_config("tiny-test")
    assert diff_configs(a, a) == []
    b = load_config(
        "tiny-test", ["optim.lr=2e-3", "model.depth=3", "train.max_steps=100", "objective.timestep_options.loc=0.1"]
    )
    assert diff_configs(a, b) == [
        ("model.depth", 2, 3),
        ("objective.timestep_options", {}, {"loc": 0.1}),
        ("optim.lr", 1e-3, 2e-3),
        ("train.max_steps", 6, 100),
    ]
    assert [k for k, _, _ in diff_configs(a, b, ignore=RESUME_SAFE_KEYS)] == [
        "model.depth",
        "objective.timestep_options",
        "optim.lr",
    ]
    assert [k for k, _, _ in diff_configs(a, b, ignore=("model", "optim.lr"))] == [
        "objective.timestep_options",
        "train.max_steps",
    ]
    # every resume-safe key may change without a reported difference (on latents, where a VAE
    # source is allowed: it may move, e.g. from the hub id to a local copy)
    lat = ["data.kind=latents", "data.path=lat", "autoencoder.source=stabilityai/sd-vae-ft-ema"]
    a_lat = load_config("tiny-test", lat)
    safe = load_config(
        "tiny-test",
        [
            *lat,
            "train.max_steps=60",
            "train.ckpt_every=7",
            "train.sample_every=8",
            "train.val_every=9",
            "train.log_every=2",
            "train.keep_last=5",
            "train.progress=true",
            "data.num_workers=4",
            "train.device=cpu",
            "autoencoder.source=/data/sd-vae-ft-ema",
        ],
    )
    assert len(diff_configs(a_lat, safe)) == len(RESUME_SAFE_KEYS)
    assert diff_configs(a_lat, safe, ignore=RESUME_SAFE_KEYS) == []
    raises("unknown key 'optim.lrr'|did you mean", diff_configs, a, b, ignore=("optim.lrr",))


def test_save_load_equal(tmp_path):
    c = load_config(
        "emoji32-pft",
        [
            "optim.lr=3e-4",
            "optim.eps=1e-10",
            "objective.timestep_options.loc=0.6",
            "sample.options={p: 0.4}",
            "model.mlp_ratio=2",
            "train.val_every=100",
        ],
    )
    path = save_config(c, tmp_path / "config.yaml")
    assert load_config(path) == c
    text = path.read_text()
    # keys in schema order
    order = ["name:", "model:", "data:", "objective:", "optim:", "ema:", "sample:", "train:"]
    positions = [text.index(f"\n{k}") if not text.startswith(k) else 0 for k in order]
    assert positions == sorted(positions)
    assert text.index("  lr:") < text.index("  weight_decay:") < text.index("  grad_accum:")


def test_config_to_dict_is_plain():
    d = config_to_dict(load_config("imagenet256-pft-b"))
    assert list(d) == [
        "name",
        "model",
        "data",
        "autoencoder",
        "objective",
        "optim",
        "ema",
        "sample",
        "train",
        "repa",
        "text",
    ]
    assert list(d["optim"]) == [f.name for f in OptimSection.__dataclass_fields__.values()]
    assert list(d["data"]) == list(DataSection.__dataclass_fields__)

    def plain(v):
        if isinstance(v, dict):
            return all(isinstance(k, str) and plain(x) for k, x in v.items())
        if isinstance(v, list):
            return all(plain(x) for x in v)
        return v is None or isinstance(v, (bool, int, float, str))

    assert plain(d)
    d["optim"]["betas"].append(1.0)  # a copy: the config is unchanged
    assert load_config("imagenet256-pft-b").optim.betas == [0.9, 0.999]
    with pytest.raises(TypeError):
        config_to_dict({"name": "x"})


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)
    with pytest.raises(ValueError):
        load_config("demo", ["optim.lr=-1"])


# ---------------------------------------------------------------------------- issue 9: run names


@pytest.mark.parametrize("name", ["../../x", "..", ".", ".hidden", "/abs/run", "a/b", "a\\b", "C:\\runs\\x", " ", ""])
def test_name_must_be_plain(name, tmp_path):
    # the run directory is runs/<name>: a path in the name would write outside runs/
    parts = "name must not be empty" if not name.strip() else f"name must|{name!r}"
    raises(parts, config_from_dict, {"name": name})
    raises(parts, load_config, write(tmp_path, f"name: {json.dumps(name)}\n"))
    raises(parts, load_config, "demo", [f"name={name}"])


def test_plain_names_accepted():
    for name in ("my run", "pft-b2_imagenet256", "2024", "run.v2", "x..y"):
        assert config_from_dict({"name": name}).name == name


# ---------------------------------------------------------------------------- OmegaConf parsing subtleties


def test_override_value_parsing_subtleties():
    c = load_config(
        "demo",
        ["optim.lr=3e-4", "optim.eps=1e-10", "name=1e3", "train.device=1", "data.path=null", "optim.betas=[0.9,0.95]"],
    )
    assert c.optim.lr == 3e-4 and type(c.optim.lr) is float and c.optim.eps == 1e-10
    assert c.name == "1e3"  # the text, not '1000.0'
    assert c.train.device == "1" and c.data.path is None and c.optim.betas == [0.9, 0.95]
    assert load_config("demo", ["name=true"]).name == "true"
    # an int list is stored as floats
    assert load_config("demo", ["optim.betas=[0, 0]"]).optim.betas == [0.0, 0.0]
    raises("optim.lr must be finite", load_config, "demo", ["optim.lr=.inf"])
    raises(
        "autoencoder.latents_std must be finite",
        load_config,
        "demo",
        ["autoencoder.latents_mean=[0.0]", "autoencoder.latents_std=[.nan]"],
    )


def test_override_precedence_later_wins(tmp_path):
    p = write(tmp_path, "base: demo\noptim: {lr: 2.0e-3}\n")
    assert load_config(p).optim.lr == 2e-3  # the file over its base
    assert load_config(p, ["optim.lr=5e-3"]).optim.lr == 5e-3  # overrides over the file
    assert load_config(p, ["optim.lr=5e-3", "optim={lr: 6.0e-3}"]).optim.lr == 6e-3
    assert load_config(p, ["optim={lr: 6.0e-3}", "optim.lr=7e-3"]).optim.lr == 7e-3
    c = load_config(p, ["sample.options={a: 1, b: 2}", "sample.options.b=3", "sample.options={c: 4}"])
    assert c.sample.options == {"c": 4}  # a whole free-form mapping replaces
    c = load_config(p, ["sample.options={a: 1}", "sample.options.b=3"])
    assert c.sample.options == {"a": 1, "b": 3}
    assert apply_overrides(load_config(p), ["train.max_steps=5", "train.max_steps=9"]).train.max_steps == 9


# ---------------------------------------------------------------------------- inheritance (base:)


def test_base_child_overrides_parent_keeps_rest(tmp_path):
    write(
        tmp_path,
        "name: parent\noptim: {lr: 2.0e-3, warmup_steps: 7}\n"
        "objective: {timestep_options: {loc: 0.5, std: 0.3}}\nsample: {options: {p: 1}}\n",
        "parent.yaml",
    )
    child = write(
        tmp_path,
        "base: parent.yaml\nname: child\noptim: {lr: 3.0e-3}\nobjective: {timestep_options: {loc: 0.6}}\n",
        "child.yaml",
    )
    c = load_config(child)
    assert c.name == "child" and c.optim.lr == 3e-3
    assert c.optim.warmup_steps == 7  # the parent's key, kept
    assert c.objective.timestep_options == {"loc": 0.6}  # a free-form mapping is one value: replaced
    assert c.sample.options == {"p": 1}  # not given by the child: the parent's
    assert c.optim.batch_size == OptimSection().batch_size  # given by neither: the default
    # the saved config is resolved and self-contained (no base)
    saved = save_config(c, tmp_path / "run" / "config.yaml")
    assert "base" not in saved.read_text() and load_config(saved) == c
    (tmp_path / "parent.yaml").unlink()
    assert load_config(saved) == c


def test_base_chain_and_preset_names(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path, "base: tiny-test\nname: mid\ntrain: {max_steps: 12}\n", "mid.yaml")
    leaf = write(tmp_path, "base: ../mid.yaml\nname: leaf\n", "sub/leaf.yaml")  # relative to the file
    c = load_config(leaf)
    assert (c.name, c.train.max_steps) == ("leaf", 12)
    assert diff_configs(load_config("tiny-test"), c) == [("name", "tiny-test", "leaf"), ("train.max_steps", 6, 12)]


def test_base_errors(tmp_path):
    write(tmp_path, "base: b.yaml\nname: a\n", "a.yaml")
    write(tmp_path, "base: a.yaml\nname: b\n", "b.yaml")
    raises("cycle in base|a.yaml -> |b.yaml -> |a.yaml", load_config, tmp_path / "a.yaml")
    raises("cycle in base", load_config, write(tmp_path, "base: self.yaml\n", "self.yaml"))
    raises("base 'nosuch'|no such preset|_imagenet256", load_config, write(tmp_path, "base: nosuch\n"))
    raises("base 'gone.yaml'|no such file", load_config, write(tmp_path, "base: gone.yaml\n"))
    raises("base must be a preset name or a path|[1]", load_config, write(tmp_path, "base: [1]\n"))
    # errors in a parent name the parent's file
    write(tmp_path, "optim: {lrr: 1}\n", "badparent.yaml")
    msg = raises("unknown key 'optim.lrr'|did you mean 'lr'", load_config, write(tmp_path, "base: badparent.yaml\n"))
    assert "badparent.yaml" in msg
    # an empty parent is refused too
    write(tmp_path, "# nothing\n", "emptyparent.yaml")
    raises("emptyparent.yaml|is empty", load_config, write(tmp_path, "base: emptyparent.yaml\nname: x\n"))


def test_imagenet_presets_share_a_base():
    base = REPO / "configs" / "_imagenet256.yaml"
    assert "_imagenet256" not in list_presets()
    raises("no preset named '_imagenet256'", preset_path, "_imagenet256")
    for name in ("imagenet256-pft-b", "imagenet256-pft-xl", "imagenet256-sit-b", "imagenet256-sit-xl"):
        text = preset_path(name).read_text()
        assert "base: _imagenet256\n" in text and len(text.splitlines()) < 20
    assert "base: emoji32-pft\n" in preset_path("emoji32-sit").read_text()
    assert base.read_text().startswith("#")


def test_presets_are_packaged():
    # wheels carry the presets through [tool.setuptools.package-data]: every file a preset may
    # inherit from (configs/*.yaml, partials included) must match one of its patterns
    if tomllib is None:  # Python 3.10
        pytest.skip("needs tomllib")
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "patchforcing"
    ]
    files = [str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.y*ml")]
    assert files and all(any(fnmatch.fnmatch(f, pat) for pat in patterns) for f in files), (files, patterns)


# ---------------------------------------------------------------------------- registries


def test_choices_come_from_the_registries():
    assert SAMPLE_SAMPLERS == tuple(SAMPLERS)
    for name in SAMPLERS:
        assert load_config("demo", [f"sample.sampler={name}"]).sample.sampler == name
    msg = raises("objective.timestep_sampler must be one of", load_config, "demo", ["objective.timestep_sampler=x"])
    assert all(n in msg for n in TIMESTEP_SAMPLERS)
    for name in TIMESTEP_SAMPLERS:
        assert load_config("demo", [f"objective.timestep_sampler={name}"]).objective.timestep_sampler == name


# ---------------------------------------------------------------------------- files written by earlier versions


DATA = Path(__file__).resolve().parent / "data"

#: keys added after the legacy files were written, with the defaults an old file must load with
NEW_KEYS = {
    ("model", "rope_jitter"): None,
    ("train", "strategy"): "ddp",
    ("train", "attention"): "auto",
    ("optim", "fused"): "auto",
    ("repa",): config_to_dict(ExperimentConfig())["repa"],
    ("text",): config_to_dict(ExperimentConfig())["text"],
}


def _without_new_keys(d: dict) -> dict:
    """``d`` minus :data:`NEW_KEYS`, after checking they hold their defaults."""
    d = json.loads(json.dumps(d))
    for path, default in NEW_KEYS.items():
        parent = d
        for k in path[:-1]:
            parent = parent[k]
        assert parent.pop(path[-1]) == default, path
    return d


def test_legacy_run_config_loads():
    # tests/data/legacy-config.yaml was written by save_config of the hand-written config layer
    # (before OmegaConf); legacy-config.expected.json is what that layer read back from it
    expected = json.loads((DATA / "legacy-config.expected.json").read_text())
    c = load_config(DATA / "legacy-config.yaml")
    assert _without_new_keys(config_to_dict(c)) == expected
    assert c.sample.options == {"p": 0.4, "nested": {"x": [1, 2]}} and c.optim.betas == [0.9, 0.95]
    assert c.autoencoder.latents_std == [1.0, 2.0, 3.0, 4.0] and c.train.val_every == 100


def test_legacy_checkpoint_config_dict_loads():
    # the `config` entry of a training checkpoint is config_to_dict output (trainer resume path)
    d = json.loads((DATA / "legacy-checkpoint-config.json").read_text())
    c = config_from_dict(d)
    assert _without_new_keys(config_to_dict(c)) == d
    assert diff_configs(c, load_config("tiny-test"), ignore=RESUME_SAFE_KEYS) == [
        ("sample.sampler", "dual_loop", "euler_pf")
    ]
