"""CLIP score: a random-weight CLIPModel in its real architecture + a tiny CLIP BPE tokenizer,
saved to a directory and loaded by path (offline)."""

from __future__ import annotations

import json
import string
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from patchforcing.cli.app import main
from patchforcing.evaluation import EvaluationError
from patchforcing.evaluation.clip_score import (
    DEFAULT_CLIP,
    CLIPPreprocess,
    CLIPScorer,
    as_uint8_images,
    clip_score,
    read_prompts,
    samples_prompts,
)
from patchforcing.utils.images import to_float, to_uint8_images

transformers = pytest.importorskip("transformers")

PROMPTS = [
    "a red apple",
    "grinning face, medium skin tone",
    "cat face",
    "a red car",
    "man getting massage",
    "rocket",
    "",  # the empty caption
]
IMAGE_SIZE = 32


def _tokenizer(d: Path):
    """A CLIP BPE tokenizer over lowercase letters, digits and a little punctuation."""
    chars = list(string.ascii_lowercase + string.digits + ",.-'")
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges = ["r e", "a p", "re d</w>", "c a", "ca t</w>"]
    for m in merges:
        vocab["".join(m.split())] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return transformers.CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("clip")
    tok = _tokenizer(d)
    config = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=12,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=IMAGE_SIZE,
            patch_size=8,
        ),
        projection_dim=16,
    )
    torch.manual_seed(0)
    transformers.CLIPModel(config).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _images(n: int, h: int = 20, w: int = 28, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _manual_scores(clip_dir: Path, images: np.ndarray, prompts: list[str]) -> torch.Tensor:
    """Independent of the module: HF's own (PIL) CLIP image processor, get_*_features, cosine."""
    model = transformers.CLIPModel.from_pretrained(clip_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(clip_dir)
    proc = transformers.CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    px = proc(images=list(images), return_tensors="pt")["pixel_values"]
    enc = tok(prompts, padding="max_length", truncation=True, max_length=12, return_tensors="pt")
    with torch.no_grad():
        img, txt = model.get_image_features(pixel_values=px), model.get_text_features(**enc)
    img = img if isinstance(img, torch.Tensor) else img.pooler_output
    txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
    cos = F.cosine_similarity(img, txt, dim=-1)
    return cos, 100 * torch.clamp(cos, min=0)


def test_score_equals_independent_computation(clip_dir):
    images = _images(len(PROMPTS))
    cos, want = _manual_scores(clip_dir, images, PROMPTS)
    assert (cos < 0).any() and (cos > 0).any()  # the clamp is per pair: both signs occur here
    scorer = CLIPScorer(clip_dir)
    got = scorer.scores(images, PROMPTS)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    res = clip_score(images, PROMPTS, scorer)
    assert res["metrics"]["clip_score"] == pytest.approx(float(want.mean()), abs=1e-4)
    assert res["metrics"]["clip_score"] != pytest.approx(max(float((100 * cos).mean()), 0.0), abs=1e-3)
    assert res["details"]["num_pairs"] == len(PROMPTS)
    # CLIP's normalisation: a mid-grey image gives (0.502 - mean) / std in every pixel
    grey = scorer.preprocess(np.full((1, 8, 8, 3), 128, np.uint8))
    torch.testing.assert_close(
        grey[0, :, 0, 0], (128 / 255 - torch.tensor(scorer.preprocess.mean)) / torch.tensor(scorer.preprocess.std)
    )


def test_preprocess_matches_clip_image_processor():
    """Our batched preprocessing == HF's CLIP processor (PIL backend) at CLIP's real 224 size,
    for a non-square image (resize of the short side, centre-crop offsets) and a small square one."""
    proc = transformers.CLIPImageProcessorPil()
    ours = CLIPPreprocess.from_processor_config(proc.to_dict(), 224)
    assert (ours.resize, ours.crop, ours.resample) == (224, 224, 3)
    for im in (_images(1, 37, 61, seed=1)[0], _images(1, 32, 32, seed=2)[0]):
        want = proc(images=[im], return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(ours(im[None]), want, atol=1e-5, rtol=0)
    # without a processor config: the vision tower's size and the OpenAI mean/std
    plain = CLIPPreprocess.from_processor_config(None, 32)
    assert (plain.resize, plain.crop) == (32, 32) and plain.mean == tuple(proc.image_mean)


def test_as_uint8_images_reads_both_layouts_and_refuses_the_rest():
    u8 = np.random.default_rng(0).integers(0, 256, (2, 4, 5, 3), dtype=np.uint8)
    assert as_uint8_images(u8) is u8  # already fitting: returned as is
    assert np.array_equal(as_uint8_images(u8.transpose(0, 3, 1, 2)), u8)  # (B, 3, H, W) uint8
    assert np.array_equal(as_uint8_images(torch.from_numpy(u8)), u8)  # a uint8 tensor is not re-quantised
    x = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0, 3.0]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    out = as_uint8_images(x)  # float (B, 3, H, W): to_uint8 = clamp(127.5 x + 128) truncated
    assert out.shape == (1, 1, 6, 3) and out[0, 0, :, 0].tolist() == [0, 64, 128, 191, 255, 255]
    f = torch.rand(2, 3, 4, 5) * 2 - 1
    ref = to_uint8_images(f)  # the pictures' reading of channels-first floats: the same pixels
    assert np.array_equal(as_uint8_images(f), ref)
    assert np.array_equal(as_uint8_images(f.permute(0, 2, 3, 1).double().numpy()), ref)  # float NHWC array
    with pytest.raises(EvaluationError, match=r"must have 3 channels, got shape \(2, 4, 5, 1\)"):
        as_uint8_images(u8[..., :1])  # grey is not made up into RGB for a metric
    with pytest.raises(EvaluationError, match=r"must be a batch .* got shape \(4, 5, 3\)"):
        as_uint8_images(u8[0])
    with pytest.raises(EvaluationError, match="uint8 or float in \\[-1, 1\\], got int64"):
        as_uint8_images(u8.astype(np.int64))


def test_batch_size_and_input_kind_invariance(clip_dir):
    images = _images(len(PROMPTS), 32, 32, seed=3)
    one = CLIPScorer(clip_dir, batch_size=1).scores(images, PROMPTS)
    many = CLIPScorer(clip_dir, batch_size=64).scores(images, PROMPTS)
    torch.testing.assert_close(one, many, atol=1e-5, rtol=1e-5)
    scorer = CLIPScorer(clip_dir, batch_size=3)
    # float images in [-1, 1] (B, 3, H, W) score as their uint8 quantisation
    as_float = to_float(torch.from_numpy(images)).permute(0, 3, 1, 2)
    torch.testing.assert_close(scorer.scores(as_float, PROMPTS), many, atol=1e-5, rtol=1e-5)
    a = clip_score(images, PROMPTS, scorer)["metrics"]["clip_score"]
    b = clip_score(images, PROMPTS, CLIPScorer(clip_dir, batch_size=5))["metrics"]["clip_score"]
    assert a == pytest.approx(b, abs=1e-5)


def test_long_prompts_are_truncated_and_counted(clip_dir):
    scorer = CLIPScorer(clip_dir)
    long = "a " * 40 + "red apple"
    assert scorer.num_truncated([long, "cat"]) == 1
    ids = scorer.tokenize([long])["input_ids"]
    assert ids.shape[1] == scorer.max_length == 12 and ids[0, -1] == scorer.tokenizer.eos_token_id
    res = clip_score(_images(2, seed=4), [long, "cat"], scorer)
    assert res["details"]["truncated_prompts"] == 1


def test_bad_inputs_are_clear_errors(clip_dir, tmp_path, monkeypatch):
    scorer = CLIPScorer(clip_dir)
    with pytest.raises(EvaluationError, match="3 images but 2 prompts"):
        clip_score(_images(3), ["a", "b"], scorer)
    with pytest.raises(EvaluationError, match="no prompts"):
        clip_score(_images(3), None, scorer)
    with pytest.raises(EvaluationError, match="no such directory"):
        CLIPScorer(tmp_path / "nowhere")
    bert = tmp_path / "bert"
    transformers.BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1).save_pretrained(bert)
    with pytest.raises(EvaluationError, match="'bert' model, not CLIP"):
        CLIPScorer(bert)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    with pytest.raises(EvaluationError, match=f"huggingface-cli download {DEFAULT_CLIP}"):
        CLIPScorer()


def test_prompt_files(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a red apple\n\ncat face\n")
    assert read_prompts(f) == ["a red apple", "", "cat face"]  # line i is prompt i
    with pytest.raises(EvaluationError, match="does not exist"):
        read_prompts(tmp_path / "none.txt")
    npz = tmp_path / "s.npz"
    np.savez(npz, arr_0=_images(2), captions=np.array(["x", "y z"]))
    assert samples_prompts(npz) == ["x", "y z"]
    np.savez(npz, arr_0=_images(2))
    assert samples_prompts(npz) is None


def test_eval_cli_clip_score(clip_dir, tmp_path, capsys):
    def _cli(*args: str) -> SimpleNamespace:  # in-process `patchforcing ...` (exit status, stdout, stderr)
        code = main(list(args))
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)

    images = _images(len(PROMPTS), 32, 32, seed=5)
    npz = tmp_path / "samples.npz"
    np.savez(npz, arr_0=images, labels=np.full(len(PROMPTS), -1), captions=np.array(PROMPTS))
    want = clip_score(images, PROMPTS, CLIPScorer(clip_dir))["metrics"]["clip_score"]

    out = tmp_path / "scores.json"
    r = _cli("eval", str(npz), "--clip", str(clip_dir), "--batch-size", "3", "--out", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["metrics"]["clip_score"] == pytest.approx(want, abs=1e-5)
    assert "clip_score" in r.stdout and "captions" in res["prompts"]

    # a prompts file (one per line) instead of the stored captions; reversed -> a different score
    pf = tmp_path / "prompts.txt"
    pf.write_text("\n".join(PROMPTS[::-1]) + "\n")
    r = _cli("eval", str(npz), "--prompts", str(pf), "--clip", str(clip_dir), "--out", str(out))
    assert r.returncode == 0, r.stderr
    rev = clip_score(images, PROMPTS[::-1], CLIPScorer(clip_dir))["metrics"]["clip_score"]
    assert json.loads(out.read_text())["metrics"]["clip_score"] == pytest.approx(rev, abs=1e-5)

    pf.write_text("only one prompt\n")
    r = _cli("eval", str(npz), "--prompts", str(pf), "--clip", str(clip_dir))
    assert r.returncode == 2 and "7 images but 1 prompts" in r.stderr and "Traceback" not in r.stderr
    r = _cli("eval", str(npz))
    assert r.returncode == 2 and "--ref" in r.stderr and "--clip" in r.stderr
