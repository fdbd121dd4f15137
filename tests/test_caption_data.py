"""Captioned data (npz captions, sidecar-caption folders), the caption-embedding cache, and the
FLUX.2 autoencoder (random weights in its real architecture) for captioned latents."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from patchforcing.autoencoders import AutoencoderError, AutoencoderSpec, detect_kind, load_autoencoder
from patchforcing.conditioning import TextEmbeddings
from patchforcing.data import (
    CaptionedFolderDataset,
    CaptionedNpzDataset,
    DataError,
    ImageFolderDataset,
    NpzImageDataset,
    WithCaptions,
    build_captioned_dataset,
)
from patchforcing.latents import OnlineEncodedDataset, TextCacheError, TextEmbeddingCache
from patchforcing.latents.text_cache import caption_key

EMOJI = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "emoji-google-64.npz"


def _npz(path: Path, n: int = 6, size: int = 16, **extra) -> Path:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    np.savez(path, images=images, labels=np.arange(n) % 3, **extra)
    return path


# --------------------------------------------------------------------------------------------
# npz captions
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(not EMOJI.is_file(), reason="the emoji data set is not here")
def test_emoji_npz_yields_images_and_their_captions():
    ds = CaptionedNpzDataset(EMOJI, resolution=32)
    plain = NpzImageDataset(EMOJI, resolution=32, flip=False)
    with np.load(EMOJI) as z:
        captions, labels = z["captions"], z["labels"]
    assert len(ds) == len(captions) == 3781
    for i in (0, 17, len(ds) - 1, -1):
        x, caption = ds[i]
        assert isinstance(caption, str) and caption == str(captions[i])
        assert torch.equal(x, plain[i][0]) and x.shape == (3, 32, 32)
    assert ds[0][1] == "grinning face"
    assert ds.class_names is not None and ds.num_classes == 9 and np.array_equal(ds.labels, labels)


def test_npz_captions_errors(tmp_path):
    with pytest.raises(DataError, match=r"has no caption array 'captions'; arrays in it: \['images', 'labels'\]"):
        CaptionedNpzDataset(_npz(tmp_path / "none.npz"))
    with pytest.raises(DataError, match="5 captions in 'captions' for 6 images"):
        CaptionedNpzDataset(_npz(tmp_path / "short.npz", captions=np.array(["a"] * 5)))
    with pytest.raises(DataError, match="needs pickle to load"):
        CaptionedNpzDataset(_npz(tmp_path / "obj.npz", captions=np.array(["a", None] * 3, dtype=object)))
    with pytest.raises(DataError, match="expected \\(N,\\) strings"):
        CaptionedNpzDataset(_npz(tmp_path / "num.npz", captions=np.arange(6)))
    ds = CaptionedNpzDataset(_npz(tmp_path / "bytes.npz", captions=np.array([f"cap {i}".encode() for i in range(6)])))
    assert [ds[i][1] for i in range(6)] == [f"cap {i}" for i in range(6)]


# --------------------------------------------------------------------------------------------
# folders with sidecar captions
# --------------------------------------------------------------------------------------------


def _folder(root: Path, bad: bool = False) -> Path:
    rng = np.random.default_rng(1)
    for cls in ("cats", "dogs"):
        (root / cls).mkdir(parents=True)
        for k in range(3):
            arr = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"{k:03d}.png")
            (root / cls / f"{k:03d}.txt").write_text(f"  a {cls[:-1]} number {k}\n")
    if bad:
        (root / "cats" / "zz_bad.png").write_bytes(b"not an image")
        (root / "cats" / "zz_bad.txt").write_text("the caption of a broken file")
    return root


def test_folder_with_sidecar_captions(tmp_path):
    root = _folder(tmp_path / "data")
    ds = CaptionedFolderDataset(root, 16)
    plain = ImageFolderDataset(root, 16, flip=False)
    assert len(ds) == 6 and ds.class_names == ["cats", "dogs"] and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.captions[0] == "a cat number 0" and ds.captions[5] == "a dog number 2"  # whitespace stripped
    for i in range(6):
        x, caption = ds[i]
        assert torch.equal(x, plain[i][0]) and caption == ds.captions[i]
    assert [s for s, _ in ds.samples] == [s for s, _ in plain.samples]


def test_folder_missing_captions(tmp_path):
    root = _folder(tmp_path / "data")
    (root / "dogs" / "001.txt").unlink()
    with pytest.raises(DataError, match=r"1 of 6 images have no caption file \(e.g. '.*dogs/001.txt'\)"):
        CaptionedFolderDataset(root, 16)
    ds = CaptionedFolderDataset(root, 16, missing_caption="empty")
    assert ds[4][1] == ""


def test_unreadable_image_brings_its_substitutes_caption(tmp_path):
    root = _folder(tmp_path / "data", bad=True)
    ds = CaptionedFolderDataset(root, 16)
    bad = next(i for i, (p, _) in enumerate(ds.samples) if p.endswith("zz_bad.png"))
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        x, caption = ds[bad]
    assert caption != "the caption of a broken file"
    j = ds.captions.index(caption)
    assert torch.equal(x, ds[j][0])  # the substitute's image with the substitute's caption


def test_with_captions_attaches_a_list_in_item_order(tmp_path):
    images = NpzImageDataset(_npz(tmp_path / "a.npz"), flip=False)
    caps = [f"caption {i}" for i in range(6)]
    ds = WithCaptions(images, caps)
    assert ds[2][1] == "caption 2" and ds[-1][1] == "caption 5" and torch.equal(ds[2][0], images[2][0])
    assert ds.resolution == images.resolution and ds.num_classes == 3  # attributes of the wrapped set
    with pytest.raises(DataError, match="5 captions for a data set of 6 items"):
        WithCaptions(images, caps[:5])


def test_build_captioned_dataset(tmp_path):
    npz = _npz(tmp_path / "c.npz", captions=np.array([f"c{i}" for i in range(6)]))
    ds = build_captioned_dataset({"kind": "npz", "path": str(npz), "resolution": 8})
    assert isinstance(ds, CaptionedNpzDataset) and ds[0][0].shape == (3, 8, 8) and not ds.flip
    folder = build_captioned_dataset({"kind": "folder", "path": str(_folder(tmp_path / "f")), "resolution": 16})
    assert isinstance(folder, CaptionedFolderDataset)
    with pytest.raises(DataError, match="unknown key\\(s\\) \\['labels'\\]"):
        build_captioned_dataset({"kind": "npz", "path": str(npz), "labels": 3})
    with pytest.raises(DataError, match="needs a 'resolution'"):
        build_captioned_dataset({"kind": "shards", "path": "x/{0..3}.tar"})
    with pytest.raises(DataError, match="kind must be one of"):
        build_captioned_dataset({"kind": "csv", "path": "x"})
    with pytest.raises(DataError, match="4 of 4 shards do not exist"):
        build_captioned_dataset({"kind": "webdataset", "path": str(tmp_path / "s-{0..3}.tar"), "resolution": 16})


# --------------------------------------------------------------------------------------------
# the caption-embedding cache
# --------------------------------------------------------------------------------------------


class FakeEncoder:
    """Deterministic states per caption (one token per word, plus one), counting what it encodes."""

    def __init__(self, salt: str = "a", dim: int = 8):
        self.salt, self.dim = salt, dim
        self.fingerprint = hashlib.sha256(salt.encode()).hexdigest()
        self.calls: list[str] = []

    def info(self):
        return {"spec": f"fake-{self.salt}", "dim": self.dim, "fingerprint": self.fingerprint}

    def states(self, caption: str) -> torch.Tensor:
        seed = int(hashlib.sha256(f"{self.salt}|{caption}".encode()).hexdigest()[:12], 16)
        return torch.randn(len(caption.split()) + 1, self.dim, generator=torch.Generator().manual_seed(seed))

    def __call__(self, captions):
        self.calls.extend(captions)
        rows = [self.states(c) for c in captions]
        length = max(r.shape[0] for r in rows)
        tokens = torch.zeros(len(rows), length, self.dim)
        mask = torch.zeros(len(rows), length, dtype=torch.bool)
        for i, r in enumerate(rows):
            tokens[i, : len(r)], mask[i, : len(r)] = r, True
        null = self.states("")
        return TextEmbeddings(tokens, mask, null, torch.ones(len(null), dtype=torch.bool))


CAPS = ["a red apple", "grinning face", "a cat on a wooden table", "a red apple"]


def test_cache_computes_each_distinct_caption_once_and_reads_it_back(tmp_path):
    enc = FakeEncoder()
    cache = TextEmbeddingCache(tmp_path, enc)
    assert cache.precompute(CAPS, batch_size=2) == 4  # 3 distinct + the empty caption
    assert sorted(enc.calls) == sorted(["", "a red apple", "grinning face", "a cat on a wooden table"])
    assert cache.precompute(CAPS) == 0 and len(enc.calls) == 4

    # a fresh, read-only cache (no encoder) reads the same states from disk
    ro = TextEmbeddingCache(tmp_path, fingerprint=enc.fingerprint)
    batch = ["grinning face", "a cat on a wooden table", "grinning face"]
    emb = ro.lookup(batch)
    assert emb.tokens.shape == (3, 7, 8) and emb.tokens.dtype == torch.float32
    assert emb.mask.sum(1).tolist() == [3, 7, 3]
    for i, c in enumerate(batch):
        assert torch.equal(emb.tokens[i, : len(c.split()) + 1], enc.states(c))
    assert (emb.tokens[~emb.mask] == 0).all()
    assert torch.equal(emb.null_tokens, enc.states("")) and emb.null_mask.all()
    assert torch.equal(ro.get("a red apple"), enc.states("a red apple"))
    assert len(enc.calls) == 4
    shards = list(cache.path.glob("shard-*.safetensors"))
    assert len(shards) == 1 and (cache.path / "encoder.json").is_file()


def test_changing_a_caption_or_the_encoder_recomputes_only_what_changed(tmp_path):
    enc = FakeEncoder()
    TextEmbeddingCache(tmp_path, enc).precompute(CAPS)
    enc.calls.clear()
    edited = ["a red apple", "grinning face with smiling eyes", "a cat on a wooden table"]
    cache = TextEmbeddingCache(tmp_path, enc)
    assert cache.missing(edited) == ["grinning face with smiling eyes"]
    assert cache.precompute(edited) == 1 and enc.calls == ["grinning face with smiling eyes"]
    torch.testing.assert_close(cache.get("a red apple"), enc.states("a red apple"), rtol=0, atol=0)

    other = FakeEncoder(salt="b")  # another encoder: its own entries, the first one's untouched
    cache_b = TextEmbeddingCache(tmp_path, other)
    assert cache_b.path != cache.path
    assert cache_b.precompute(edited) == 4 and sorted(other.calls) == sorted(["", *edited])
    assert torch.equal(cache_b.get("a red apple"), other.states("a red apple"))
    assert torch.equal(
        TextEmbeddingCache(tmp_path, fingerprint=enc.fingerprint).get("a red apple"), enc.states("a red apple")
    )
    assert caption_key(enc.fingerprint, "x") != caption_key(other.fingerprint, "x")


def test_cache_fills_misses_when_it_has_the_encoder_and_errors_without(tmp_path):
    enc = FakeEncoder()
    cache = TextEmbeddingCache(tmp_path, enc)
    emb = cache.lookup(["grinning face"])
    assert torch.equal(emb.tokens[0], enc.states("grinning face")) and sorted(enc.calls) == ["", "grinning face"]
    assert not list(cache.path.glob("shard-*")) and cache.flush() is not None
    ro = TextEmbeddingCache(tmp_path, fingerprint=enc.fingerprint)
    assert "grinning face" in ro
    with pytest.raises(TextCacheError, match="caption 'a dog' \\(1 missing\\) is not in the caption-embedding cache"):
        ro.lookup(["grinning face", "a dog"])
    with pytest.raises(TextCacheError, match="no caption-embedding cache for encoder"):
        TextEmbeddingCache(tmp_path, fingerprint="0" * 64)
    with pytest.raises(TextCacheError, match="is a different encoder"):
        TextEmbeddingCache(tmp_path, enc, fingerprint="0" * 64)


def test_ranks_split_the_precompute_and_see_each_others_shards(tmp_path):
    caps = [f"caption number {i}" for i in range(7)]
    encs = [FakeEncoder(), FakeEncoder()]
    caches = [TextEmbeddingCache(tmp_path, e) for e in encs]
    done = [c.precompute(caps, rank=r, world_size=2) for r, c in enumerate(caches)]
    assert done == [4, 4] and not set(encs[0].calls) & set(encs[1].calls)
    assert sorted(encs[0].calls + encs[1].calls) == sorted(["", *caps])
    caches[0].refresh()
    assert caches[0].missing(caps) == [] and len(caches[0]) == 8
    assert torch.equal(caches[0].get(caps[1]), encs[0].states(caps[1]))


def test_cache_in_float16(tmp_path):
    enc = FakeEncoder()
    cache = TextEmbeddingCache(tmp_path, enc, dtype="float16")
    cache.precompute(["grinning face"])
    got = TextEmbeddingCache(tmp_path, fingerprint=enc.fingerprint).lookup(["grinning face"])
    assert got.tokens.dtype == torch.float32
    assert torch.equal(got.tokens[0], enc.states("grinning face").half().float())


@pytest.mark.skipif(importlib.util.find_spec("all_minilm_l6_v2") is None, reason="needs the minilm package")
def test_cache_of_the_minilm_encoder_matches_direct_encoding(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from patchforcing.encoders import load_text_encoder

    monkeypatch.setenv("PATCHFORCING_CACHE", str(tmp_path / "pf"))
    enc = load_text_encoder("minilm", device="cpu")
    caps = ["grinning face", "man getting massage, medium skin tone", "red apple"]
    cache = TextEmbeddingCache(tmp_path / "cache", enc)
    cache.precompute(caps)
    got = TextEmbeddingCache(tmp_path / "cache", fingerprint=enc.fingerprint).lookup(caps)
    ref = enc(caps)
    assert torch.equal(got.mask, ref.mask)
    torch.testing.assert_close(got.tokens, ref.tokens, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.null_tokens, enc.null_tokens, atol=1e-5, rtol=1e-4)
    meta = cache.meta
    assert meta["spec"] == "minilm" and meta["dim"] == 384 and meta["fingerprint"] == enc.fingerprint


# --------------------------------------------------------------------------------------------
# FLUX.2 autoencoder
# --------------------------------------------------------------------------------------------


def _tiny_flux2(path: Path, seed: int = 0):
    """A random-weight AutoencoderKLFlux2: its real architecture (4 levels, factor 8, 32 latent
    channels, 2x2-patch batch norm), narrow widths, random batch-norm statistics."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKLFlux2(
        block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=32, norm_num_groups=32, sample_size=32
    )
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.randn(128) * 0.5)
        vae.bn.running_var.copy_(torch.rand(128) * 2 + 0.1)
    vae.save_pretrained(path)
    return vae.eval()


def test_flux2_autoencoder_scales_like_the_flux2_pipeline(tmp_path):
    vae = _tiny_flux2(tmp_path / "flux2")
    from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline

    ae = load_autoencoder(str(tmp_path / "flux2"))
    spec = ae.spec
    assert spec.kind == "flux2" and ae.latent_channels == 32 and ae.downsample == 8
    assert spec.stats_patch_size == 2 and len(spec.latents_mean) == 128 and spec.scale_factor == 1.0

    z = torch.randn(2, 32, 4, 6, generator=torch.Generator().manual_seed(0))
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    expected = Flux2Pipeline._unpatchify_latents((Flux2Pipeline._patchify_latents(z) - mean) / std)
    torch.testing.assert_close(ae.scale(z), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ae.unscale(ae.scale(z)), z, atol=1e-5, rtol=1e-5)

    x = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        decoded = vae.decode(z).sample.clamp(-1, 1)
    # the pipeline's normalised (patchified) latents are ours, patchified
    ours = ae.encode(x, sample=False)
    torch.testing.assert_close(
        Flux2Pipeline._patchify_latents(ours),
        (Flux2Pipeline._patchify_latents(posterior.mean) - mean) / std,
        atol=1e-5,
        rtol=1e-5,
    )
    torch.testing.assert_close(ae.decode(ae.scale(z)), decoded, atol=1e-5, rtol=1e-4)
    with pytest.raises(AutoencoderError, match="latents of 3x6 do not divide into the 2x2 patches"):
        ae.scale(torch.zeros(1, 32, 3, 6))


def test_flux2_spec_round_trip_and_overrides():
    stats = dict(latents_mean=[0.1] * 128, latents_std=[2.0] * 128, stats_patch_size=2)
    spec = AutoencoderSpec(kind="flux2", source="some/flux2-vae", scale_factor=1.0, shift_factor=0.0, **stats)
    d = spec.to_dict()
    assert d["stats_patch_size"] == 2 and AutoencoderSpec.from_dict(d) == spec
    assert "stats_patch_size" not in AutoencoderSpec.sd_vae().to_dict()  # other specs' dicts unchanged
    per_channel = spec.with_overrides(latents_mean=[0.0] * 32, latents_std=[1.0] * 32)
    assert per_channel.stats_patch_size == 1
    z = torch.randn(1, 32, 2, 2)
    torch.testing.assert_close(per_channel.scale(z), z)
    torch.testing.assert_close(spec.scale(z), (z - 0.1) / 2.0)
    with pytest.raises(AutoencoderError, match="stats_patch_size=2 needs per-channel statistics"):
        AutoencoderSpec(kind="flux2", source="x/y", latents_mean=[0.0] * 30, latents_std=[1.0] * 30, stats_patch_size=2)
    assert detect_kind("black-forest-labs/FLUX.2-small-decoder") == "flux2"
    assert detect_kind("stabilityai/sd-vae-ft-ema") == "kl"


def test_captioned_images_to_flux2_latents(tmp_path):
    _tiny_flux2(tmp_path / "flux2")
    npz = _npz(tmp_path / "c.npz", n=3, size=32, captions=np.array(["a red apple", "grinning face", "a cat"]))
    captioned = CaptionedNpzDataset(npz)
    ae = load_autoencoder(str(tmp_path / "flux2"))
    latents = WithCaptions(OnlineEncodedDataset(NpzImageDataset(npz, flip=False), ae, seed=0), captioned.captions)
    z, caption = latents[1]
    assert z.shape == (32, 4, 4) and caption == "grinning face" and latents.input_size == 4
    x = captioned[1][0]
    mean, std = ae.encode_posterior(x[None])
    assert torch.isfinite(z).all() and not torch.allclose(z, ae.scale(mean)[0])  # a posterior sample
