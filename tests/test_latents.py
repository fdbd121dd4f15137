"""The latent pipeline: autoencoders (random-weight diffusers VAEs built from configs, nothing
downloaded), sharded latent stores (encode, resume, verify, distributed), latent and online-encoded
training data, and decoding of trained / exported / released-format checkpoints."""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import patchforcing as pf  # noqa: E402
from patchforcing.autoencoders import (  # noqa: E402
    SD_VAE_SCALE,
    AutoencoderError,
    AutoencoderSpec,
    IdentityAutoencoder,
    autoencoder_spec_from_checkpoint,
    decode_to_images,
    load_autoencoder,
    load_autoencoder_for,
)
from patchforcing.checkpoints import safe_torch_load, save_released_format  # noqa: E402
from patchforcing.cli import main  # noqa: E402
from patchforcing.data.augment import hflip_flag  # noqa: E402
from patchforcing.latents import (  # noqa: E402
    LatentDataset,
    LatentStoreError,
    build_latent_dataset,
    encode_source,
    read_index,
    verify_latent_store,
)
from patchforcing.training.config import AutoencoderSection, DataSection  # noqa: E402

N_IMAGES, RES, LATENT = 16, 32, 8  # 32x32 images -> 4x8x8 latents with the 3-level test VAE


def tiny_kl(seed: int = 0):
    """A random-weight AutoencoderKL with the SD VAE's structure, 3 levels (factor 4), tiny widths."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=4,
        sample_size=RES,
    )


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("latents")


@pytest.fixture(scope="module")
def vae_dir(work) -> Path:
    path = work / "vae"
    tiny_kl().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def images_npz(work) -> Path:
    rng = np.random.default_rng(0)
    # smooth images (a few colour blobs) so that flips change them visibly
    yy, xx = np.mgrid[0:RES, 0:RES] / RES
    imgs = []
    for _ in range(N_IMAGES):
        c = rng.uniform(0, 1, (3, 3))
        img = np.stack([c[k, 0] + c[k, 1] * xx + c[k, 2] * np.sin(6 * yy * xx) for k in range(3)], -1)
        imgs.append(np.clip(img / img.max() * 255, 0, 255).astype(np.uint8))
    path = work / "images.npz"
    np.savez(path, images=np.stack(imgs), labels=np.arange(N_IMAGES) % 3)
    return path


def encode(images_npz, vae, out, **kw):
    opts = dict(resolution=RES, flip=True, batch_size=4, shard_size=6, device="cpu", progress=False)
    opts.update(kw)
    return encode_source(images_npz, out, vae, **opts)


@pytest.fixture(scope="module")
def store(work, images_npz, vae_dir) -> Path:
    out = work / "store"
    res = encode(images_npz, str(vae_dir), out)
    assert res.encoded_shards == [0, 1, 2] and res.skipped_shards == [] and res.images == N_IMAGES
    return out


# ------------------------------------------------------------------------------- autoencoders


def test_autoencoder_kl_shapes_and_scaling(vae_dir):
    ae = load_autoencoder(str(vae_dir))
    assert ae.spec == AutoencoderSpec(kind="kl", source=str(vae_dir), scale_factor=SD_VAE_SCALE, shift_factor=0.0)
    assert (ae.latent_channels, ae.downsample, ae.latent_size(RES)) == (4, 4, LATENT)
    x = torch.rand(2, 3, RES, RES) * 2 - 1
    mean, std = ae.encode_posterior(x)
    assert mean.shape == std.shape == (2, 4, LATENT, LATENT) and bool((std > 0).all())
    torch.testing.assert_close(ae.encode(x, sample=False), mean * SD_VAE_SCALE)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    torch.testing.assert_close(ae.encode(x, generator=g1), ae.encode(x, generator=g2))
    img = ae.decode(ae.encode(x, sample=False), batch_size=1)
    assert img.shape == (2, 3, RES, RES) and img.dtype == torch.float32 and img.abs().max() <= 1
    with pytest.raises(AutoencoderError, match="multiple of"):
        ae.latent_size(30)


def test_scaling_round_trip_scalar_and_per_channel():
    z = torch.randn(3, 4, 5, 5) * torch.tensor([1.0, 2.0, 3.0, 4.0]).view(4, 1, 1) + torch.tensor([0.5, -1, 2, 0]).view(
        4, 1, 1
    )
    scalar = AutoencoderSpec(kind="kl", source="x/y", scale_factor=0.18215, shift_factor=0.1)
    torch.testing.assert_close(scalar.scale(z), (z - 0.1) * 0.18215)
    chan = AutoencoderSpec(
        kind="kl",
        source="x/y",
        scale_factor=1.0,
        shift_factor=0.0,
        latents_mean=[0.5, -1, 2, 0],
        latents_std=[1, 2, 3, 4],
    )
    for spec in (scalar, chan, AutoencoderSpec()):
        torch.testing.assert_close(spec.unscale(spec.scale(z)), z, atol=1e-5, rtol=1e-5)
        assert AutoencoderSpec.from_dict(spec.to_dict()) == spec
    whitened = chan.scale(z)
    assert whitened.mean(dim=(0, 2, 3)).abs().max() < 0.8  # 75 samples per channel
    assert chan.scale(z[0]).shape == (4, 5, 5)  # (C, h, w) items too
    with pytest.raises(AutoencoderError, match="channels"):
        chan.scale(torch.zeros(1, 3, 2, 2))
    with pytest.raises(AutoencoderError, match="together"):
        AutoencoderSpec(kind="kl", source="a/b", latents_mean=[0.0])
    with pytest.raises(AutoencoderError, match="kind"):
        AutoencoderSpec(kind="vq")
    ident = IdentityAutoencoder()
    x = torch.rand(2, 3, 4, 4) * 2 - 1
    torch.testing.assert_close(ident.decode(ident.encode(x)), x)


def test_autoencoder_tiny(work, images_npz):
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    path = work / "taesd"
    AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8),
        decoder_block_out_channels=(8, 8, 8),
        num_encoder_blocks=(1, 1, 1),
        num_decoder_blocks=(1, 1, 1),
    ).save_pretrained(path)
    ae = load_autoencoder(str(path))  # kind detected from config.json
    assert ae.spec.kind == "tiny" and ae.spec.scale_factor == 1.0 and ae.downsample == 4
    mean, std = ae.encode_posterior(torch.zeros(1, 3, RES, RES))
    assert mean.shape == (1, 4, LATENT, LATENT) and bool((std == 0).all())
    assert ae.decode(mean).shape == (1, 3, RES, RES)
    res = encode(images_npz, str(path), work / "store-tiny", flip=False, shard_size=16)
    assert res.index["autoencoder"]["kind"] == "tiny" and res.index["flip"] is False
    ds = LatentDataset(work / "store-tiny", flip=False)
    x, _ = ds[0]
    torch.testing.assert_close(x, ae.encode(ds_image(images_npz, 0)[None], sample=False)[0], atol=5e-3, rtol=5e-3)


def test_missing_vae_is_a_clear_error(monkeypatch, images_npz, tmp_path, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AutoencoderError) as info:
        load_autoencoder("nonexistent-org/nonexistent-vae")
    msg = str(info.value)
    assert (
        "offline" in msg and "hf download nonexistent-org/nonexistent-vae --local-dir DIR" in msg and "--vae DIR" in msg
    )
    with pytest.raises(AutoencoderError, match="no such directory"):
        load_autoencoder("./no-vae-here")
    rc = main(
        [
            "encode",
            str(images_npz),
            "--vae",
            "nonexistent-org/nonexistent-vae",
            "--out",
            str(tmp_path / "o"),
            "--resolution",
            str(RES),
            "--quiet",
        ]
    )
    assert rc == 2 and "hf download" in capsys.readouterr().err


# ------------------------------------------------------------------------------- the store


def ds_image(npz: Path, i: int) -> torch.Tensor:
    from patchforcing.data import NpzImageDataset

    return NpzImageDataset(npz, RES, flip=False)[i][0]


def test_store_contents_and_flip(store, images_npz, vae_dir):
    index = verify_latent_store(store)
    assert index["num_items"] == N_IMAGES and [s["count"] for s in index["shards"]] == [6, 6, 4]
    assert index["latent_shape"] == [4, LATENT, LATENT] and index["resolution"] == RES and index["flip"] is True
    assert index["num_classes"] == 3 and index["dtype"] == "float16" and len(index["shards"][0]["sha256"]) == 64
    assert index["autoencoder"]["source"] == str(vae_dir) and index["autoencoder"]["scale_factor"] == SD_VAE_SCALE
    ds = LatentDataset(store)
    assert (len(ds), ds.channels, ds.input_size, ds.resolution, ds.num_classes) == (N_IMAGES, 4, LATENT, RES, 3)
    assert ds.labels.tolist() == (np.arange(N_IMAGES) % 3).tolist()
    ae = load_autoencoder(str(vae_dir))
    for i in (0, 7, 15):
        img = ds_image(images_npz, i)[None]
        mean, std, label = ds.posterior(i)
        m, s = ae.encode_posterior(img)
        torch.testing.assert_close(mean, m[0], atol=2e-2, rtol=2e-3)  # float16 storage
        torch.testing.assert_close(std, s[0], atol=1e-3, rtol=2e-3)
        fmean, fstd, _ = ds.posterior(i, flipped=True)  # the posterior of the mirrored image
        fm, fs = ae.encode_posterior(img.flip(-1))
        torch.testing.assert_close(fmean, fm[0], atol=2e-2, rtol=2e-3)
        torch.testing.assert_close(fstd, fs[0], atol=1e-3, rtol=2e-3)
        assert not torch.allclose(fmean, mean, atol=1e-2) and label == i % 3


def test_latent_dataset_items_are_deterministic_posterior_samples(store):
    ds = LatentDataset(store, flip=True, seed=3)
    spec = ds.autoencoder_spec
    items = {}
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        for i in range(N_IMAGES):
            x, y = ds[i]
            assert x.shape == (4, LATENT, LATENT) and x.dtype == torch.float32 and y == i % 3
            flipped = hflip_flag(3, epoch, i)
            mean, std, _ = ds.posterior(i, flipped)
            noise = (spec.unscale(x) - mean) / std  # the eps of this (seed, epoch, index)
            assert noise.abs().max() < 6 and 0.3 < noise.std() < 2
            items[epoch, i] = x
    ds2 = pickle.loads(pickle.dumps(ds))  # as a DataLoader worker gets it
    ds2.set_epoch(1)
    torch.testing.assert_close(ds2[5][0], items[1, 5])
    assert not torch.allclose(items[0, 5], items[1, 5])
    flips = [hflip_flag(3, e, i) for e in (0, 1) for i in range(N_IMAGES)]
    assert 0 < sum(flips) < len(flips)
    mean_only = LatentDataset(store, flip=False, sample_posterior=False)
    torch.testing.assert_close(mean_only[2][0], spec.scale(mean_only.posterior(2)[0]))


def test_resume_skips_finished_shards_and_redoes_bad_ones(work, images_npz, vae_dir, store):
    out = work / "store-resume"
    calls = []

    def interrupt(k):
        calls.append(k)
        if len(calls) == 2:
            raise KeyboardInterrupt  # stopped after two shards

    with pytest.raises(KeyboardInterrupt):
        encode(images_npz, str(vae_dir), out, on_shard=interrupt)
    with pytest.raises(LatentStoreError, match="did not finish"):
        read_index(out)
    mtime0 = (out / "shard-00000.safetensors").stat().st_mtime_ns
    (out / "shard-00001.safetensors").write_bytes(b"garbage")  # a damaged shard is redone
    res = encode(images_npz, str(vae_dir), out)
    assert res.skipped_shards == [0] and res.encoded_shards == [1, 2] and res.images == 10
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == mtime0
    again = encode(images_npz, str(vae_dir), out)
    assert again.encoded_shards == [] and again.skipped_shards == [0, 1, 2]
    # same content as the uninterrupted encode
    ref, got = read_index(store), verify_latent_store(out)
    assert [s["sha256"] for s in got["shards"]] == [s["sha256"] for s in ref["shards"]]
    # other settings into the same directory are refused (or redone with overwrite)
    with pytest.raises(LatentStoreError, match="other settings|flip"):
        encode(images_npz, str(vae_dir), out, flip=False)
    res = encode(images_npz, str(vae_dir), out, flip=False, overwrite=True, shard_size=16)
    assert res.encoded_shards == [0] and read_index(out)["flip"] is False and not (out / "shard-00002.json").exists()


def test_checksums_detect_corruption(work, store):
    out = work / "store-corrupt"
    out.mkdir()
    for p in store.iterdir():
        (out / p.name).write_bytes(p.read_bytes())
    verify_latent_store(out)
    shard = out / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # same size, one byte of latent data changed
    shard.write_bytes(bytes(data))
    with pytest.raises(LatentStoreError, match="shard-00001.safetensors: sha256 mismatch"):
        verify_latent_store(out)
    assert main(["encode", "--verify", "--out", str(out)]) == 2
    (out / "shard-00002.safetensors").unlink()
    with pytest.raises(LatentStoreError, match="missing"):
        LatentDataset(out)


def test_per_channel_scaling_is_stored_and_whitens(work, images_npz, vae_dir):
    res = encode(images_npz, str(vae_dir), work / "store-pc", flip=False, scaling="per-channel", shard_size=8)
    spec = AutoencoderSpec.from_dict(res.index["autoencoder"])
    assert spec.per_channel and spec.scale_factor == 1.0 and len(spec.latents_mean) == 4
    ds = LatentDataset(work / "store-pc", flip=False)
    z = torch.stack([ds[i][0] for i in range(N_IMAGES)])
    assert z.mean(dim=(0, 2, 3)).abs().max() < 0.15
    assert ((z.std(dim=(0, 2, 3)) - 1).abs() < 0.15).all()
    torch.testing.assert_close(spec.unscale(spec.scale(z)), z, atol=1e-5, rtol=1e-5)


def test_build_latent_dataset_checks_and_overrides(store, vae_dir):
    data = DataSection(kind="latents", path=str(store), resolution=RES, flip=True)
    ds = build_latent_dataset(data, AutoencoderSection(scale_factor=0.5))
    assert ds.autoencoder_spec.scale_factor == 0.5 and ds.autoencoder_spec.source == str(vae_dir)
    with pytest.raises(LatentStoreError, match="data.resolution=32"):
        build_latent_dataset(DataSection(kind="latents", path=str(store), resolution=256))
    with pytest.raises(LatentStoreError, match="autoencoder.kind is 'tiny'"):
        build_latent_dataset(data, AutoencoderSection(kind="tiny"))
    with pytest.raises(LatentStoreError, match="does not exist"):
        build_latent_dataset(DataSection(kind="latents", path=str(store) + "-nope", resolution=RES))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_encode_matches_one_process(work, images_npz, vae_dir, store):
    out = work / "store-dist"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        "-m",
        "patchforcing",
        "encode",
        str(images_npz),
        "--vae",
        str(vae_dir),
        "--out",
        str(out),
        "--resolution",
        str(RES),
        "--flip",
        "--batch-size",
        "4",
        "--shard-size",
        "6",
        "--device",
        "cpu",
        "--quiet",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "encoded" in proc.stdout and "index" in proc.stdout
    one, two = read_index(store), verify_latent_store(out)
    assert [s["count"] for s in two["shards"]] == [s["count"] for s in one["shards"]]
    assert {k: v for k, v in two.items() if k != "shards"} == {k: v for k, v in one.items() if k != "shards"}
    a, b = LatentDataset(store), LatentDataset(out)
    for i in range(N_IMAGES):
        for flipped in (False, True):
            (m1, s1, y1), (m2, s2, y2) = a.posterior(i, flipped), b.posterior(i, flipped)
            torch.testing.assert_close(m1, m2, atol=1e-2, rtol=1e-3)
            torch.testing.assert_close(s1, s2, atol=1e-3, rtol=1e-3)
            assert y1 == y2


# ------------------------------------------------------------------------------- training and decoding


def _train(run: Path, *overrides: str) -> int:
    return main(
        [
            "train",
            "tiny-test",
            "model.name=PFT-T/2",
            "data.val_size=2",
            "train.device=cpu",
            "train.max_steps=2",
            "train.ckpt_every=2",
            "train.sample_every=2",
            *overrides,
            "--out",
            str(run),
        ]
    )


def test_encode_train_sample_decode_end_to_end(work, store, vae_dir):
    run = work / "run-latents"
    assert _train(run, "data.kind=latents", f"data.path={store}", f"data.resolution={RES}") == 0
    assert (run / "samples" / "step_0000002.png").is_file()
    from PIL import Image

    assert Image.open(run / "samples" / "step_0000002.png").size[0] > 2 * RES  # decoded images, not 8x8 latents
    state = safe_torch_load(run / "checkpoints" / "last.pt")
    assert state["autoencoder"] == read_index(store)["autoencoder"]
    assert (state["model_config"]["in_channels"], state["model_config"]["input_size"]) == (4, LATENT)
    # export -> load -> sample -> decode through the stored spec
    exported = work / "pft-latent.safetensors"
    assert main(["export", str(run), "--out", str(exported)]) == 0
    spec = autoencoder_spec_from_checkpoint(exported)
    assert spec == AutoencoderSpec.from_dict(state["autoencoder"])
    model = pf.load_model(exported)
    res = pf.sample(model, torch.randn(3, 4, LATENT, LATENT), "euler_pf", 3, y=torch.tensor([0, 1, 2]))
    images = decode_to_images(res.x, exported)
    assert images.shape == (3, 3, RES, RES) and images.abs().max() <= 1
    assert autoencoder_spec_from_checkpoint(run) == spec  # run directories say it too


def test_online_encoding_trains(work, images_npz, vae_dir):
    run = work / "run-online"
    assert (
        _train(
            run,
            "data.kind=npz",
            f"data.path={images_npz}",
            f"data.resolution={RES}",
            "autoencoder.online=true",
            f"autoencoder.source={vae_dir}",
        )
        == 0
    )
    state = safe_torch_load(run / "checkpoints" / "last.pt")
    assert (state["model_config"]["in_channels"], state["model_config"]["input_size"]) == (4, LATENT)
    assert state["autoencoder"]["kind"] == "kl" and state["autoencoder"]["scale_factor"] == SD_VAE_SCALE
    assert (run / "samples" / "step_0000002.png").is_file()


def test_released_checkpoint_plus_vae_gives_images(work, vae_dir):
    """The documented path (docs/latents.md): the authors' .ckpt + a local SD-VAE folder -> a grid."""
    ckpt = work / "pft-b2_ema.ckpt"
    model = pf.create_model(
        "PFT-T/2", input_size=LATENT, in_channels=4, num_classes=10, depth=1, hidden_size=32, num_heads=2
    )
    save_released_format(model, ckpt)
    model = pf.load_model(ckpt)
    vae = load_autoencoder_for(ckpt, vae=str(vae_dir), model=model)
    assert vae.spec == AutoencoderSpec.sd_vae(str(vae_dir))  # released files: SD VAE, 0.18215
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(4, model.in_channels, *model.image_size, generator=g)
    res = pf.sample(model, noise, "look_ahead", nfe=8, y=torch.arange(4), cfg_scale=2.0)
    images = vae.decode(res.x)
    from patchforcing.viz import save_grid

    save_grid(images, work / "grid.png", nrow=2)
    assert images.shape == (4, 3, RES, RES) and (work / "grid.png").is_file()
    pixel = pf.create_model("PFT-T/2", input_size=8, in_channels=3, num_classes=2, depth=1, hidden_size=32, num_heads=2)
    assert load_autoencoder_for(None, model=pixel).spec.kind == "identity"
    pf.save_model(pixel, work / "pixel.safetensors")  # ours, nothing recorded: pixel space
    assert autoencoder_spec_from_checkpoint(work / "pixel.safetensors") == AutoencoderSpec()
    x = torch.rand(2, 3, 8, 8) * 4 - 2
    torch.testing.assert_close(decode_to_images(x, work / "pixel.safetensors"), x.clamp(-1, 1))
    assert autoencoder_spec_from_checkpoint(ckpt) is None  # released files do not say
