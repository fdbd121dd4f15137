"""CLIP score of generated images against their prompts, through Hugging Face ``transformers``.

Definition (CLIPScore, Hessel et al. 2021, with torchmetrics' scale of 100 instead of 2.5)::

    CLIPScore(I, C) = 100 * max(cos(E_I, E_C), 0)        averaged over the (image, prompt) pairs

``E_I`` is CLIP's projected image embedding (vision tower's pooled output through
``visual_projection``), ``E_C`` the projected text embedding (text tower's end-of-text token
through ``text_projection``). The clamp is per pair, as in the paper and torchmetrics' documented
formula (torchmetrics' code clamps the mean instead; the two agree whenever every cosine is >= 0,
which is the usual case for a trained CLIP). The standard model is
``openai/clip-vit-large-patch14`` (:data:`DEFAULT_CLIP`); any ``CLIPModel`` by hub id or local
directory works.

Preprocessing is CLIP's (``CLIPImageProcessor``): ``uint8`` RGB, shortest side resized to 224
with PIL bicubic, 224 x 224 centre crop, scaled to [0, 1], normalised with the CLIP mean/std.
The sizes, mean, std and resampling filter are read from the model's ``preprocessor_config.json``
when it has one (else: the vision tower's ``image_size`` and the OpenAI CLIP mean/std). Float
images in [-1, 1] are first quantised to ``uint8`` exactly as saved samples are
(:func:`patchforcing.utils.images.to_uint8`), so a tensor and its ``.npz`` score the same.
Prompts longer than the text tower's 77 tokens are truncated (counted in the result).

``transformers`` is an optional dependency (``pip install 'patchforcing[text]'``), imported when a
model is loaded.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..utils.hub import HubError, probe_hub_file
from ..utils.images import to_uint8_images
from ..utils.io import is_offline, looks_local
from .reference import EvaluationError, ImageSet, open_images

__all__ = [
    "DEFAULT_CLIP",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "CLIPPreprocess",
    "CLIPScorer",
    "as_uint8_images",
    "clip_score",
    "read_prompts",
    "samples_prompts",
]

#: the CLIP model of the standard CLIP score (torchmetrics' default)
DEFAULT_CLIP = "openai/clip-vit-large-patch14"
#: CLIP's image normalisation (OpenAI)
OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
#: array names tried, in order, for the per-sample prompts of a samples .npz (``patchforcing
#: sample`` writes ``captions``)
PROMPT_KEYS: tuple[str, ...] = ("captions", "prompts")


def _missing_message(source: str, why: str) -> str:
    hub_id = source if not looks_local(source) else DEFAULT_CLIP
    return (
        f"cannot load the CLIP model {source!r}: {why}. Download it once with\n"
        f"    huggingface-cli download {hub_id}    (or: hf download {hub_id} --local-dir DIR, and pass DIR)\n"
        f"and pass it to --clip (the standard CLIP score uses {DEFAULT_CLIP})"
    )


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise EvaluationError(
            "the CLIP score needs transformers: pip install 'patchforcing[text]' (or pip install transformers)"
        ) from None
    return transformers


# --------------------------------------------------------------------------------------------
# preprocessing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CLIPPreprocess:
    """CLIP's image preprocessing, batched: ``uint8 (B, H, W, 3)`` -> ``float32 (B, 3, crop, crop)``.

    Attributes:
        resize: target of the shortest side (the long side becomes ``int(resize * long / short)``).
        crop: side of the centre crop (offsets ``(H' - crop) // 2``, ``(W' - crop) // 2``).
        mean, std: per-channel normalisation of the [0, 1] pixels.
        resample: PIL filter code (3 = bicubic).
    """

    resize: int = 224
    crop: int = 224
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    resample: int = 3

    def __post_init__(self) -> None:
        if not (1 <= self.crop <= self.resize):
            raise EvaluationError(f"CLIP preprocessing: crop {self.crop} must be in 1..resize ({self.resize})")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise EvaluationError(f"CLIP preprocessing: bad mean/std {self.mean}/{self.std}")

    @classmethod
    def from_processor_config(cls, config: dict[str, Any] | None, image_size: int) -> CLIPPreprocess:
        """From a ``preprocessor_config.json`` mapping (``None``: ``image_size`` and CLIP's defaults)."""
        if not config:
            return cls(resize=int(image_size), crop=int(image_size))

        def side(v: Any, *keys: str) -> int | None:
            if isinstance(v, int):
                return v
            if isinstance(v, dict):
                for k in keys:
                    if isinstance(v.get(k), int):
                        return int(v[k])
            return None

        crop = side(config.get("crop_size"), "height", "shortest_edge") or int(image_size)
        resize = side(config.get("size"), "shortest_edge", "height") or crop
        return cls(
            resize=resize,
            crop=crop,
            mean=tuple(float(v) for v in config.get("image_mean", OPENAI_CLIP_MEAN)),
            std=tuple(float(v) for v in config.get("image_std", OPENAI_CLIP_STD)),
            resample=int(config.get("resample", 3)),
        )

    def _one(self, im: np.ndarray) -> np.ndarray:
        h, w = im.shape[:2]
        short, long = min(h, w), max(h, w)
        new_long = int(self.resize * long / short)
        nh, nw = (self.resize, new_long) if h <= w else (new_long, self.resize)
        if (nh, nw) != (h, w):
            im = np.asarray(Image.fromarray(im).resize((nw, nh), resample=Image.Resampling(self.resample)))
        top, left = (nh - self.crop) // 2, (nw - self.crop) // 2
        return im[top : top + self.crop, left : left + self.crop]

    def __call__(self, images: np.ndarray) -> Tensor:
        """``uint8 (B, H, W, 3)`` -> ``float32 (B, 3, crop, crop)``, normalised."""
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise EvaluationError(f"CLIP preprocessing takes uint8 (B, H, W, 3), got {images.dtype} {images.shape}")
        out = np.stack([self._one(im) for im in images])
        x = torch.from_numpy(out).permute(0, 3, 1, 2).float() / 255.0
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std


def as_uint8_images(images: Any) -> np.ndarray:
    """A batch of images as ``uint8 (B, H, W, 3)``: uint8 arrays/tensors as they are, float ones in
    [-1, 1] through :func:`~patchforcing.utils.images.to_uint8` (as samples are saved); either
    layout, ``(B, H, W, 3)`` or ``(B, 3, H, W)`` (:func:`~patchforcing.utils.images.to_uint8_images`
    with ``strict=True``).

    Raises:
        EvaluationError: not a 4-D batch of 3-channel uint8 or float images.
    """
    try:
        return to_uint8_images(images, strict=True)
    except ValueError as err:
        raise EvaluationError(str(err)) from None


# --------------------------------------------------------------------------------------------
# the scorer
# --------------------------------------------------------------------------------------------


def _load_clip(source: str) -> tuple[Any, Any, dict[str, Any] | None]:
    """``(CLIPModel, tokenizer, preprocessor config or None)`` of a hub id or local directory."""
    transformers = _import_transformers()
    path = Path(source).expanduser()
    unreachable: str | None = None
    if path.is_dir():
        target, local_only = str(path), True
        if not (path / "config.json").is_file():
            raise EvaluationError(
                _missing_message(
                    source, "the directory has no config.json (expected a CLIPModel saved with save_pretrained)"
                )
            )
    elif looks_local(source):
        raise EvaluationError(_missing_message(source, "no such directory"))
    else:
        target, local_only = source, is_offline()
        if not local_only:
            try:  # one quick request instead of transformers' retries on a machine without network
                probe_hub_file(source, "config.json")
            except HubError as err:  # the cache may still have it
                local_only, unreachable = True, f"not a local directory; tried hub repo {source!r}: {err}"
    try:
        config = transformers.AutoConfig.from_pretrained(target, local_files_only=local_only)
        if getattr(config, "model_type", None) != "clip":
            raise EvaluationError(
                f"{source!r} is a {getattr(config, 'model_type', '?')!r} model, not CLIP (model_type 'clip'); "
                f"the CLIP score needs a CLIPModel such as {DEFAULT_CLIP}"
            )
        model = transformers.CLIPModel.from_pretrained(target, local_files_only=local_only)
        tokenizer = transformers.AutoTokenizer.from_pretrained(target, local_files_only=local_only)
    except EvaluationError:
        raise
    except (OSError, ValueError) as err:
        if unreachable is not None:
            why = unreachable
        elif local_only and not path.is_dir():
            why = "offline and not in the Hugging Face cache"
        else:
            why = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        raise EvaluationError(_missing_message(source, why)) from None
    except Exception as err:  # network errors of huggingface_hub/httpx: report plainly
        raise EvaluationError(_missing_message(source, f"{type(err).__name__}: {err}")) from None
    processor = None
    try:
        found = transformers.utils.cached_file(
            target,
            "preprocessor_config.json",
            local_files_only=True if path.is_dir() else local_only,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )
        if found:
            processor = json.loads(Path(found).read_text())
    except (OSError, ValueError):  # no processor config: the vision tower's size and CLIP's defaults
        processor = None
    return model, tokenizer, processor


class CLIPScorer:
    """A frozen CLIP model that embeds images and prompts and scores their pairs.

    Args:
        model: hub id or local directory of a ``CLIPModel`` (default :data:`DEFAULT_CLIP`).
        device: where CLIP runs.
        batch_size: images / prompts per forward pass.

    Raises:
        EvaluationError: transformers missing, the model not found (offline and not cached: the
            message names ``huggingface-cli download ...``), or not a CLIP model.
    """

    def __init__(self, model: str | os.PathLike = DEFAULT_CLIP, device: Any = "cpu", batch_size: int = 64):
        if int(batch_size) < 1:
            raise EvaluationError(f"batch size must be >= 1, got {batch_size}")
        self.source = str(model)
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        clip, self.tokenizer, processor = _load_clip(self.source)
        self.model = clip.float().eval().requires_grad_(False).to(self.device)
        vc, tc = self.model.config.vision_config, self.model.config.text_config
        self.preprocess = CLIPPreprocess.from_processor_config(processor, int(vc.image_size))
        self.max_length = int(tc.max_position_embeddings)
        self.dim = int(self.model.config.projection_dim)

    @torch.no_grad()
    def embed_images(self, images: Any) -> Tensor:
        """Unit-norm image embeddings ``float32 (B, dim)`` (CPU) of a batch: ``uint8 (B, H, W, 3)``
        or float ``(B, 3, H, W)`` in [-1, 1] (numpy or torch)."""
        a = as_uint8_images(images)
        out = []
        for s in range(0, len(a), self.batch_size):
            px = self.preprocess(a[s : s + self.batch_size]).to(self.device)
            pooled = self.model.vision_model(pixel_values=px).pooler_output
            out.append(self.model.visual_projection(pooled).float().cpu())
        e = torch.cat(out) if out else torch.zeros(0, self.dim)
        return e / e.norm(dim=-1, keepdim=True)

    def tokenize(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """CLIP tokens of ``prompts``, padded to the longest, truncated to :attr:`max_length`."""
        enc = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def num_truncated(self, prompts: Sequence[str]) -> int:
        """How many ``prompts`` are longer than :attr:`max_length` tokens (they are cut)."""
        ids = self.tokenizer(list(prompts), truncation=False)["input_ids"]
        return sum(len(i) > self.max_length for i in ids)

    @torch.no_grad()
    def embed_texts(self, prompts: Sequence[str]) -> Tensor:
        """Unit-norm text embeddings ``float32 (B, dim)`` (CPU) of ``prompts``."""
        if isinstance(prompts, str):
            raise EvaluationError("prompts must be a list of strings, not one string")
        prompts = list(prompts)
        out = []
        for s in range(0, len(prompts), self.batch_size):
            enc = {k: v.to(self.device) for k, v in self.tokenize(prompts[s : s + self.batch_size]).items()}
            pooled = self.model.text_model(**enc).pooler_output
            out.append(self.model.text_projection(pooled).float().cpu())
        e = torch.cat(out) if out else torch.zeros(0, self.dim)
        return e / e.norm(dim=-1, keepdim=True)

    def scores(self, images: Any, prompts: Sequence[str]) -> Tensor:
        """Per-pair CLIP scores ``float32 (B,)``: ``100 * max(cos(E_I, E_C), 0)``."""
        if len(images) != len(prompts):
            raise EvaluationError(f"{len(images)} images but {len(prompts)} prompts: they pair up by index")
        cos = (self.embed_images(images) * self.embed_texts(prompts)).sum(-1)
        return 100.0 * cos.clamp(min=0.0)

    def describe(self) -> dict[str, Any]:
        p = self.preprocess
        return {
            "model": self.source,
            "projection_dim": self.dim,
            "max_tokens": self.max_length,
            "preprocess": {"resize": p.resize, "crop": p.crop, "mean": list(p.mean), "std": list(p.std)},
            "definition": "mean over pairs of 100 * max(cos(image embedding, text embedding), 0)",
        }


# --------------------------------------------------------------------------------------------
# prompts
# --------------------------------------------------------------------------------------------


def read_prompts(path: str | os.PathLike) -> list[str]:
    """The prompts of a text file, one per line (UTF-8; the line break is dropped, nothing else:
    an empty line is an empty prompt, so line ``i`` stays prompt ``i``; a final newline ends the
    last line and adds none)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise EvaluationError(f"prompts file {str(p)!r} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EvaluationError(f"cannot read prompts file {str(p)!r} as UTF-8 text: {e}") from None
    lines = text.splitlines()
    if not lines:
        raise EvaluationError(f"prompts file {str(p)!r} is empty")
    return lines


def samples_prompts(path: str | os.PathLike) -> list[str] | None:
    """The per-sample prompts stored in a samples ``.npz`` (array ``captions``, as ``patchforcing
    sample`` writes for a text model, or ``prompts``), or ``None`` when it has neither."""
    p = Path(path).expanduser()
    if not p.is_file() or p.suffix.lower() != ".npz":
        return None
    try:
        with np.load(p, allow_pickle=False) as z:
            key = next((k for k in PROMPT_KEYS if k in z.files), None)
            if key is None:
                return None
            arr = z[key]
    except ValueError as e:  # an object array needs pickle: refused
        raise EvaluationError(f"cannot read the prompts of {str(p)!r}: {e} (store them as a str array)") from None
    except OSError as e:
        raise EvaluationError(f"cannot read {str(p)!r}: {e}") from None
    if arr.ndim != 1 or arr.dtype.kind not in "US":
        raise EvaluationError(f"{str(p)!r}: array {key!r} must be 1-D strings, got {arr.dtype} {arr.shape}")
    return [str(s) for s in arr.tolist()]


# --------------------------------------------------------------------------------------------
# the metric
# --------------------------------------------------------------------------------------------


def clip_score(
    samples: Any,
    prompts: Sequence[str] | str | os.PathLike | None = None,
    model: str | os.PathLike | CLIPScorer = DEFAULT_CLIP,
    *,
    batch_size: int = 64,
    device: Any = "cpu",
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """CLIP score of ``samples`` against ``prompts`` (pair ``i`` = image ``i``, prompt ``i``).

    Args:
        samples: a samples ``.npz`` / ``.npy`` / image folder / :class:`ImageSet`, a ``uint8
            (N, H, W, 3)`` array, or a float tensor ``(N, 3, H, W)`` in [-1, 1].
        prompts: a list of ``N`` strings, a text file (one prompt per line), or ``None``: the
            ``captions`` (or ``prompts``) array of the samples ``.npz``.
        model: hub id / local directory of a CLIPModel, or a :class:`CLIPScorer`.

    Returns:
        ``{"metrics": {"clip_score": mean}, "details": {"clip_score_std": ..., "clip_score_sem":
        ..., "num_pairs": N, "truncated_prompts": k}, "clip": scorer.describe(), "prompts":
        where they came from}``.

    Raises:
        EvaluationError: no prompts, counts that do not pair up, unreadable inputs, CLIP missing.
    """
    if prompts is None:
        found = samples_prompts(samples) if isinstance(samples, (str, os.PathLike)) else None
        if found is None:
            raise EvaluationError(
                "no prompts: give --prompts FILE (one per line) or samples from `patchforcing sample` of a text model "
                f"(its .npz holds a {' or '.join(PROMPT_KEYS)} array)"
            )
        prompts, where = found, f"{os.fspath(samples)} [{'/'.join(PROMPT_KEYS)}]"
    elif isinstance(prompts, (str, os.PathLike)):
        where = os.fspath(prompts)
        prompts = read_prompts(prompts)
    else:
        prompts, where = list(prompts), "<list>"
        if any(not isinstance(p, str) for p in prompts):
            raise EvaluationError("prompts must be strings")
    scorer = model if isinstance(model, CLIPScorer) else CLIPScorer(model, device=device, batch_size=batch_size)

    if isinstance(samples, (Tensor, np.ndarray)):  # in memory: CLIP's preprocessing sees them as they are
        a = as_uint8_images(samples)
        n, batches = len(a), (a[s : s + scorer.batch_size] for s in range(0, len(a), scorer.batch_size))
    else:  # files: read in batches (a non-square array is centre-cropped to a square first, as for FID)
        smp: ImageSet = open_images(samples, role="samples")
        n = smp.num_images
        batches = smp.batches(scorer.batch_size, None if smp.kind != "folder" else scorer.preprocess.resize)
    if n != len(prompts):
        raise EvaluationError(
            f"{n} images but {len(prompts)} prompts ({where}): they must pair up one to one, in order "
            "(the .npz of `patchforcing sample` carries its per-sample captions: leave out --prompts)"
        )
    scores, done, every = [], 0, max(1, n // 10)
    for block in batches:
        scores.append(scorer.scores(block, prompts[done : done + len(block)]))
        before, done = done, done + len(block)
        if progress is not None and (done // every > before // every or done == n):
            progress(f"CLIP score: {done}/{n} images")
    s = torch.cat(scores).double()
    std = float(s.std(unbiased=True)) if n > 1 else 0.0
    return {
        "metrics": {"clip_score": float(s.mean())},
        "details": {
            "clip_score_std": std,
            "clip_score_sem": std / math.sqrt(n),
            "num_pairs": n,
            "truncated_prompts": scorer.num_truncated(prompts),
        },
        "clip": scorer.describe(),
        "prompts": where,
    }
