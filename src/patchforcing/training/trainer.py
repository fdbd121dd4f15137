"""The training loop: AdamW + warm-up, clipping, EMA, CFG label dropout, accumulation, bf16,
DDP, atomic checkpoints, exact resume, sample grids, validation by t-segments, metrics.

Exactness: every random draw of step ``k`` on rank ``r`` (noise, timesteps, label dropout,
flips are per item) comes from a generator seeded by ``(seed, k, r)``, and the data order is a
function of the step (:mod:`.data_order`). A run stopped after step ``k`` and resumed therefore
ends with the same weights as an uninterrupted run. The checkpoint still stores every RNG state
(Python, NumPy, torch CPU/CUDA) and restores them, for user code that draws from them.
"""

from __future__ import annotations

import csv
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm.auto import tqdm

from ..autoencoders import load_autoencoder
from ..checkpoints import TRAIN_FORMAT, CheckpointError, load_state_dict_strict, safe_torch_load
from ..data import build_dataset
from ..encoders.vision import VisionEncoderError, load_vision_encoder
from ..flow.loss import RepaTarget, patch_flow_loss, segment_terms
from ..flow.timesteps import make_timestep_sampler
from ..latents import build_latent_dataset, build_online_dataset
from ..models import PatchForcingTransformer, create_model
from ..models.attention import set_attention_kernel
from ..models.registry import is_text_to_image
from ..sampling import sample
from ..utils.compile import CPU_FALLBACK_OPTIONS, CompileCheck, checked_compile
from ..utils.devices import auto_precision, resolve_device, torchrun_env
from ..utils.io import RunLock, RunLockedError, atomic_write, clean_temp_files, ensure_writable_dir, torch_save_atomic
from ..utils.seeding import item_hash
from ..viz import prompt_grid, save_grid
from .config import RESUME_SAFE_KEYS, ExperimentConfig, config_from_dict, config_to_dict, diff_configs, save_config
from .data_order import EpochIndexed, StepBatchSampler, micro_batch_size
from .distributed import (
    DistEnv,
    all_reduce_mean,
    any_rank,
    full_model_state,
    full_optimizer_state,
    init_distributed,
    load_optimizer_state,
    loadable,
    local_value,
    shard_model,
    shutdown_distributed,
)
from .ema import EMA
from .speed import build_adamw, resolve_attention_kernel, resolve_fused
from .text import EncodedStream, TextConditioner, build_captioned_data, caption_dropout, stream_micro_batches

__all__ = [
    "Trainer",
    "TrainResult",
    "TrainingError",
    "NonFiniteLossError",
    "train",
    "build_model_for",
    "lr_factor",
    "apply_label_dropout",
    "step_generator",
]

CSV_COLUMNS = (
    ["step", "loss", "fm", "nll", "grad_norm", "lr", "ema_decay", "images_per_sec", "val_loss"]
    + [f"val_seg{j}" for j in range(8)]
    + ["repa", "val_repa"]  # REPA's alignment term (train, validation); empty without REPA
)


class TrainingError(RuntimeError):
    """A run that cannot start or continue (bad resume, data too small, ...)."""


class NonFiniteLossError(TrainingError):
    """The loss became NaN/inf; the last good checkpoint is left untouched."""


@dataclass
class TrainResult:
    """What a finished (or interrupted) run left behind."""

    run_dir: Path
    step: int
    interrupted: bool
    last_checkpoint: Path | None
    metrics: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------


class _Subset(Dataset):
    """``dataset[indices[i]]`` that forwards ``set_epoch`` (unlike torch's Subset)."""

    def __init__(self, dataset: Dataset, indices: list[int]):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __getitem__(self, i: int):
        return self.dataset[self.indices[i]]


def split_train_val(dataset: Dataset, val_size: int, seed: int = 12345) -> tuple[Dataset, Dataset | None]:
    """Hold out ``val_size`` items (a fixed, seeded choice) for the validation loss (streamed
    data sets have no items to hold out: no validation)."""
    if val_size <= 0 or isinstance(dataset, IterableDataset):
        return dataset, None
    n = len(dataset)
    if val_size >= n // 2:
        raise TrainingError(
            f"data.val_size={val_size} leaves too little to train on ({n} items): hold out fewer than half, "
            f"e.g. data.val_size={max(1, n // 8)}"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return _Subset(dataset, sorted(perm[val_size:])), _Subset(dataset, sorted(perm[:val_size]))


def build_data(cfg: ExperimentConfig) -> Dataset:
    """The data set of a config (images in [-1, 1], NCHW)."""
    d = cfg.data
    if cfg.text.encoder is not None:  # text-to-image: items (x, caption)
        data = build_captioned_data(cfg)
        if not cfg.autoencoder.online:
            return data
        if isinstance(data, IterableDataset):  # streamed: the training step encodes whole batches
            return EncodedStream(data, cfg.autoencoder, resolve_device(cfg.train.device, torchrun_env().local_rank))
        return build_online_dataset(data, cfg.autoencoder, seed=d.seed, device=cfg.train.device)
    if d.kind == "latents":  # (cached REPA features: items are (latent, label, features))
        return build_latent_dataset(d, cfg.autoencoder, repa_features=cfg.repa.enabled and cfg.repa.source == "cached")
    spec: dict[str, Any] = {"kind": d.kind, "resolution": d.resolution, "seed": d.seed}
    if d.kind == "synthetic":
        spec["num_classes"] = d.num_classes if d.num_classes is not None else 8
        spec["length"] = d.length if d.length is not None else 10_000
    else:
        spec["path"] = d.path
        spec["flip"] = d.flip
        if d.num_classes is not None:
            spec["num_classes"] = d.num_classes
    if cfg.autoencoder.online:  # images encoded by the VAE in the loop
        return build_online_dataset(build_dataset(spec), cfg.autoencoder, seed=d.seed, device=cfg.train.device)
    return build_dataset(spec)


def build_model_for(
    cfg: ExperimentConfig,
    dataset: Dataset | None = None,
    repa: dict[str, int] | None = None,
    text_dim: int | None = None,
) -> PatchForcingTransformer:
    """The model of a config; sizes the config leaves open come from the data set; ``repa``: the
    projector (``encoder_depth``, ``z_dim``, ``projector_dim``) of a REPA run; ``text_dim``: the
    text encoder's width (text-to-image presets)."""
    m = cfg.model
    overrides = m.preset_overrides()
    if repa is not None:
        overrides["repa"] = repa
    input_size = (
        m.input_size
        or getattr(dataset, "input_size", None)
        or getattr(dataset, "resolution", None)
        or cfg.data.resolution
    )
    in_channels = m.in_channels or getattr(dataset, "channels", None) or 3
    if is_text_to_image(m.name):
        if text_dim is None:
            raise TrainingError(f"{m.name} is a text-to-image model: set text.encoder")
        return create_model(m.name, input_size=input_size, in_channels=in_channels, text_dim=text_dim, **overrides)
    num_classes = m.num_classes if m.num_classes is not None else getattr(dataset, "num_classes", None)
    if num_classes is None:
        raise TrainingError("model.num_classes is not set and the data set does not say how many classes it has")
    return create_model(m.name, input_size=input_size, in_channels=in_channels, num_classes=num_classes, **overrides)


def lr_factor(step: int, warmup_steps: int) -> float:
    """Multiplier of ``optim.lr`` used by optimiser step ``step`` (0-based): linear warm-up
    ``min(1, (step + 1) / warmup_steps)``, then 1 (``warmup_steps <= 0``: always 1)."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def apply_label_dropout(y: Tensor, p: float, num_classes: int, generator: torch.Generator | None) -> Tensor:
    """Replace each label by the null class ``num_classes`` with probability ``p`` (CFG training).

    Draws one ``torch.rand(y.shape)`` from ``generator`` (nothing when ``p <= 0`` or the model is
    unconditional, ``num_classes == 0``); label ``i`` is dropped where that draw is ``< p``.

    Args:
        y: ``(B,)`` long labels in ``[0, num_classes)``.
    Returns:
        ``(B,)`` long labels in ``[0, num_classes]``.
    """
    if p <= 0 or num_classes <= 0:
        return y
    drop = torch.rand(y.shape, generator=generator, device=y.device) < p
    return torch.where(drop, torch.full_like(y, num_classes), y)


#: salt of the per-step global-RNG seed of text-to-image steps (RoPE jitter)
_JITTER_SALT = 0x7E47_0000_0001


@contextmanager
def _seeded(ctx, seed: int):
    """Enter the ``fork_rng`` context ``ctx`` and seed every global RNG with ``seed`` inside it."""
    with ctx:
        torch.manual_seed(seed)
        yield


def step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """The generator of all random draws of optimiser step ``step`` on rank ``rank``."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step) * 10_007 + rank)
    return g


def rng_state() -> dict[str, Any]:
    """Every global RNG state, as tensors and plain containers (loads with weights_only)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


_RESUME_KEYS = ("config", "step", "model", "ema", "optimizer", "scheduler", "rng")


class _ModelView:
    """``model(x, t, y)`` through the DDP/compiled wrapper, attributes from the raw network."""

    def __init__(self, forward: Callable, raw: PatchForcingTransformer):
        self._forward, self._raw = forward, raw

    def __call__(self, x, t, y, **kwargs):
        return self._forward(x, t, y, **kwargs)

    def __getattr__(self, name):
        return getattr(self._raw, name)


# --------------------------------------------------------------------------------------------
# the trainer
# --------------------------------------------------------------------------------------------


class Trainer:
    """Train a PFT/SiT from an :class:`ExperimentConfig` into a run directory.

    Args:
        cfg: the experiment.
        run_dir: where config, checkpoints, samples and metrics go.
        resume: continue from ``run_dir/checkpoints/last.pt`` (refused if the config differs
            in anything but :data:`RESUME_SAFE_KEYS`).
        env: the process group (default: from torchrun's environment).
        decode: maps model outputs to images in [-1, 1] for sample grids (latent models);
            default: the data's autoencoder (latent data sets carry its spec), loaded on rank 0.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        run_dir: str | os.PathLike,
        resume: bool = False,
        env: DistEnv | None = None,
        decode: Callable[[Tensor], Tensor] | None = None,
    ):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.env = env or init_distributed(cfg.train.device)
        self.device = self.env.device
        self.decode = decode
        self.stop_requested = False
        self._on_step_end: list[Callable[[Trainer, int], None]] = []
        self._lock: RunLock | None = None
        if self.env.is_main:
            self._claim_run_dir(resume)
        try:
            self._build(resume)
        except BaseException:
            self._release_lock()
            raise

    def _claim_run_dir(self, resume: bool) -> None:
        """Rank 0, before any data or model is built: the run directory is writable, no other
        process writes it (a lock held until :meth:`close` or the process's death), a fresh run
        does not overwrite an old one, and temp files of a killed write are gone."""
        try:
            ensure_writable_dir(self.run_dir, "run directory")
        except OSError as e:
            raise TrainingError(str(e)) from None
        try:
            self._lock = RunLock(self.run_dir).acquire()
        except RunLockedError as e:
            raise TrainingError(f"another training process is writing this run: {e}") from None
        try:
            if not resume:
                held = [n for n in ("config.yaml", "metrics.csv", "checkpoints") if (self.run_dir / n).exists()]
                if held:
                    how = (
                        "pass --resume to continue it"
                        if (self.ckpt_dir / "last.pt").exists()
                        else "it has no checkpoint to --resume from yet: remove it"
                    )
                    raise TrainingError(
                        f"{self.run_dir} already holds a run ({', '.join(held)}); {how} or choose another --out"
                    )
            clean_temp_files(self.ckpt_dir)
            clean_temp_files(self.run_dir)
        except BaseException:
            self._release_lock()
            raise

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _build(self, resume: bool) -> None:
        cfg = self.cfg
        tc, oc = cfg.train, cfg.optim
        self.micro_batch = micro_batch_size(oc.batch_size, self.env.world_size, oc.grad_accum)
        self.precision = tc.precision
        if self.precision == "auto":  # bf16 on CUDA and on CPUs with native bf16 units
            self.precision = auto_precision(self.device)

        data = build_data(cfg)
        spec = getattr(data, "autoencoder_spec", None)  # latent data: the VAE that decodes it
        self.autoencoder_spec = spec.to_dict() if spec is not None else None
        if self.decode is None and spec is not None and spec.kind != "identity" and self.env.is_main:
            self.decode = load_autoencoder(spec, device=self.device)
        self.train_data, self.val_data = split_train_val(data, cfg.data.val_size)
        repa = self._build_repa(data)
        self.text = self._build_text(data)
        with torch.random.fork_rng(devices=[]):  # the initial weights depend on train.seed only
            torch.manual_seed(tc.seed)
            self.model = build_model_for(cfg, data, repa, self.text.dim if self.text is not None else None)
        self.fsdp = tc.strategy == "fsdp" and self.env.distributed  # FSDP: built on the CPU, sharded below
        self.model = self.model if self.fsdp else self.model.to(self.device)
        self.num_classes = getattr(self.model, "num_classes", 0)
        self.ema = EMA(self.model, cfg.ema.decay, cfg.ema.warmup)
        # the training steps' attention kernel (train.attention); the EMA (validation, samples) keeps SDPA
        self.attention_kernel = resolve_attention_kernel(tc.attention, self.precision, self.device)
        set_attention_kernel(self.model, self.attention_kernel)
        if self.fsdp:  # (train.strategy=fsdp) the EMA's shards mirror the model's; it computes in fp32
            shard_model(self.model, self.env, self.precision)
            shard_model(self.ema.model, self.env, training=False)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.fused_adamw = resolve_fused(oc.fused, self.device)
        self.optimizer = build_adamw(params, oc.lr, tuple(oc.betas), oc.eps, oc.weight_decay, self.fused_adamw)
        warmup = max(0, oc.warmup_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda k: lr_factor(k, warmup))
        self.timestep_sampler = make_timestep_sampler(cfg.objective.timestep_sampler, **cfg.objective.timestep_options)
        forward: Callable = self.model
        self.compile_check: CompileCheck | None = None
        if tc.compile:
            forward = self._compile()
        if self.env.distributed and not self.fsdp:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DDP(forward if isinstance(forward, nn.Module) else self.model, device_ids=ids)
            forward = self.ddp
        else:
            self.ddp = None
        self.forward = _ModelView(forward, self.model)
        self.step = 0
        if resume:
            self._resume()

    # ---- train.compile ----------------------------------------------------------------------------

    def _compile(self) -> Callable:
        """``torch.compile`` of the model, checked against eager first (:func:`checked_compile`): one
        forward/backward of the training loss on a micro-batch of the real shapes, on a copy with random
        weights; on a CPU the AVX2 code generator is tried when the default code disagrees, and the
        model runs eagerly when nothing agrees. (FSDP: compiled unchecked; its shards cannot be copied.)"""
        if self.fsdp:
            return torch.compile(self.model)
        forward, check = checked_compile(
            self.model,
            self._compile_probe(),
            fallbacks=CPU_FALLBACK_OPTIONS if self.device.type == "cpu" else (),
        )
        self.compile_check = check
        if check.fell_back and self.env.is_main:
            print(f"note: {check.describe()}")
        return forward

    def _compile_probe(self) -> Callable[[Callable], None]:
        """The training loss on a fixed random micro-batch, as ``_micro_steps`` computes it (REPA: with random
        target features)."""
        model, b, dev = self.model, self.micro_batch, self.device
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn((b, model.in_channels, *model.image_size), generator=g, device=dev)
        if self.text is not None:
            prompts = self._grid_prompts() or [""]
            y = self._condition([prompts[i % len(prompts)] for i in range(b)], None, 0.0)
        else:
            y = torch.randint(0, max(1, self.num_classes), (b,), generator=g, device=dev)
        repa = {}
        if self.cfg.repa.enabled:  # the REPA forward (return_projection) too, against random features
            z = torch.randn((b, model.num_patches, model.config.repa.z_dim), generator=g, device=dev)
            repa = {"repa": RepaTarget(features=z, weight=self.cfg.repa.weight, grid=model.grid_size)}

        def probe(fn: Callable) -> None:
            torch.manual_seed(0)  # (text-to-image: the RoPE jitter; the caller restores the global RNG)
            with self._autocast():
                terms = patch_flow_loss(
                    _ModelView(fn, model),
                    x,
                    y,
                    timestep_sampler=self.timestep_sampler,
                    uncertainty_weight=self.cfg.objective.uncertainty_weight,
                    generator=torch.Generator(device=dev).manual_seed(1),
                    **repa,
                )
            terms["loss"].backward()

        return probe

    # ---- text conditioning (text-to-image, docs/t2i.md) -------------------------------------------

    def _build_text(self, data: Dataset) -> TextConditioner | None:
        """Load the frozen text encoder and encode every caption of the data once (cached on disk)."""
        if self.cfg.text.encoder is None:
            return None
        try:
            text = TextConditioner(self.cfg, self.device, self.env)
        except ValueError as e:  # TextEncoderError, TextCacheError
            raise TrainingError(f"text.encoder: {e}") from None
        captions = getattr(data, "captions", None)
        if captions is not None:
            text.precompute(list(captions) + list(self.cfg.text.prompts or []))
        return text

    def _condition(self, y: Any, g: torch.Generator | None, dropout: float) -> Any:
        """The model's conditioning input of a batch's ``y`` (labels, or captions for a T2I run),
        with CFG dropout ``dropout`` drawn from ``g``."""
        if self.text is not None:
            return caption_dropout(self.text(list(y)), dropout, g).model_input()
        y = y.to(self.device, non_blocking=True).long()
        return apply_label_dropout(y, dropout, self.num_classes, g)

    def _grid_prompts(self) -> list[str]:
        """The prompts of the sample grids: ``text.prompts``, else the first validation captions."""
        t = self.cfg.text
        if t.prompts:
            return list(t.prompts)
        rows = max(1, self.cfg.sample.num // t.per_prompt)
        source = self.val_data if self.val_data is not None else None
        captions = getattr(getattr(source, "dataset", None), "captions", None)
        if captions is not None:
            picked = [captions[i] for i in source.indices]
            return list(dict.fromkeys(picked))[:rows]
        return [""] * rows

    # ---- REPA (representation alignment, docs/repa.md) -----------------------------------------

    def _build_repa(self, data: Dataset) -> dict[str, int] | None:
        """Set up REPA's frozen encoder (online; and the VAE decoding latents for it) or check the
        cached features; returns the model's projector settings (``None``: REPA off)."""
        r = self.cfg.repa
        self.repa_encoder = self.repa_decode = self.repa_grid = None
        if not r.enabled:
            return None
        if r.source == "cached":
            info = getattr(data, "repa_info", None) or {}
            if r.encoder and r.encoder != info.get("spec"):
                raise TrainingError(
                    f"repa.encoder is {r.encoder!r} but the features in {self.cfg.data.path} were made by "
                    f"{info.get('spec')!r}; set repa.encoder=null (use the store's) or re-encode"
                )
            dim, self.repa_grid = int(info["dim"]), tuple(info["grid"])
        else:
            try:
                self.repa_encoder = load_vision_encoder(r.encoder, device=self.device, resolution=r.resolution)
            except VisionEncoderError as e:
                raise TrainingError(f"repa.encoder: {e}") from None
            spec = getattr(data, "autoencoder_spec", None)  # latents: the encoder sees the decoded image
            if spec is not None and spec.kind != "identity":
                self.repa_decode = (
                    self.decode if self.decode is not None else load_autoencoder(spec, device=self.device)
                )
            dim = self.repa_encoder.dim
        if r.z_dim is not None and r.z_dim != dim:
            raise TrainingError(f"repa.z_dim ({r.z_dim}) must be the encoder's width {dim} (or null)")
        return {"encoder_depth": r.encoder_depth, "z_dim": dim, "projector_dim": r.projector_dim}

    def _repa_target(self, x: Tensor, extra: list[Tensor]) -> RepaTarget | None:
        """The REPA target of a batch ``(x, y, *extra)``: cached features (``extra[0]``), or the
        frozen encoder on the clean images (``x`` itself in pixel space, else decoded latents)."""
        r = self.cfg.repa
        if not r.enabled:
            return None
        if r.source == "cached":
            return RepaTarget(features=extra[0].to(self.device), weight=r.weight, grid=self.repa_grid)
        images = x
        if self.repa_decode is not None:
            with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
                images = self.repa_decode(x.float()).clamp(-1, 1)
        return RepaTarget(self.repa_encoder, images, weight=r.weight)

    # ---- checkpoints ------------------------------------------------------------------------

    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "format": TRAIN_FORMAT,
            "format_version": 1,
            "model_config": self.model.config.to_dict(),
            "config": config_to_dict(self.cfg),
            "step": self.step,
            "model": full_model_state(self.model),  # FSDP: gathered to rank 0 (today's layout)
            "ema": full_model_state(self.ema.model),
            "optimizer": full_optimizer_state(self.model, self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "data_position": {
                "step": self.step,
                "consumed_samples": self.step * self.cfg.optim.batch_size,
                "global_batch": self.cfg.optim.batch_size,
            },
            "rng": rng_state(),
            "world_size": self.env.world_size,
            "autoencoder": self.autoencoder_spec,
            "text_encoder": self.text.info() if self.text is not None else None,
        }

    def save_checkpoint(self) -> Path | None:
        """Write ``step_XXXXXXX.pt`` and ``last.pt`` atomically (rank 0); keep the last K."""
        path = None
        state = self.checkpoint_state() if self.env.is_main or self.fsdp else None  # FSDP: collective
        if self.env.is_main:
            path = torch_save_atomic(state, self.ckpt_dir / f"step_{self.step:07d}.pt")
            tmp = self.ckpt_dir / ".last.pt.link"
            if tmp.exists():
                tmp.unlink()
            try:
                os.link(path, tmp)
                os.replace(tmp, self.ckpt_dir / "last.pt")
            except OSError:  # file systems without hard links
                torch_save_atomic(state, self.ckpt_dir / "last.pt")
            old = sorted(self.ckpt_dir.glob("step_*.pt"))[: -self.cfg.train.keep_last]
            for p in old:
                p.unlink()
        return path

    def _resume(self) -> None:
        last = self.ckpt_dir / "last.pt"
        if not last.exists():
            raise TrainingError(f"--resume: no checkpoint at {last}")
        try:
            state = safe_torch_load(last, map_location="cpu")
        except CheckpointError as e:
            raise TrainingError(f"--resume: {e}") from None
        if not isinstance(state, Mapping) or state.get("format") != TRAIN_FORMAT:
            found = state.get("format") if isinstance(state, Mapping) else type(state).__name__
            keys = sorted(map(str, state))[:8] if isinstance(state, Mapping) else []
            raise TrainingError(
                f"--resume: {last} is not a patchforcing training checkpoint (format {found!r}, expected "
                f"{TRAIN_FORMAT!r}; top-level keys {keys}). A released or exported model cannot be resumed; "
                "start a fresh run in another --out (fine-tuning from weights is not supported by --resume)"
            )
        missing = [k for k in _RESUME_KEYS if k not in state]
        if missing:
            raise TrainingError(f"--resume: {last} is an incomplete training checkpoint (missing {missing})")
        try:
            saved_cfg = config_from_dict(state["config"])
        except ValueError as e:  # ConfigError
            raise TrainingError(f"--resume: the config stored in {last} is not valid: {e}") from None
        diffs = diff_configs(saved_cfg, self.cfg, ignore=RESUME_SAFE_KEYS)
        if diffs:
            lines = "\n  ".join(f"{k}: run has {a!r}, now {b!r}" for k, a, b in diffs)
            raise TrainingError(f"cannot resume {self.run_dir}: the config differs in\n  {lines}")
        try:
            load_state_dict_strict(loadable(self.model), state["model"], f"{last} [model]")
            load_state_dict_strict(loadable(self.ema.model), state["ema"], f"{last} [ema]")
        except CheckpointError as e:
            raise TrainingError(f"--resume: {e}") from None
        try:
            load_optimizer_state(self.model, self.optimizer, state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise TrainingError(
                f"--resume: the optimizer/scheduler state in {last} does not fit this model: {e}"
            ) from None
        set_rng_state(state["rng"])
        self.step = int(state["step"])
        if state.get("world_size", 1) != self.env.world_size and self.env.is_main:
            print(
                f"note: resuming a {state.get('world_size')}-process run on {self.env.world_size} processes: "
                "the data order is kept, per-rank noise differs from an uninterrupted run"
            )

    # ---- evaluation hooks ---------------------------------------------------------------------

    def _to_images(self, x: Tensor) -> Tensor:
        return self.decode(x) if self.decode is not None else x

    @torch.no_grad()
    def sample_grid(self) -> Path:
        sc = self.cfg.sample
        model = self.ema.model
        n = sc.num
        g = torch.Generator(device=self.device).manual_seed(sc.seed)
        path = self.run_dir / "samples" / f"step_{self.step:07d}.png"
        if self.text is not None:  # a row of per_prompt samples per prompt, the prompt under it
            prompts = self._grid_prompts()
            k = self.cfg.text.per_prompt
            n = len(prompts) * k
        noise = torch.randn(n, model.in_channels, *model.image_size, generator=g, device=self.device)
        if self.text is not None:
            text = self.text([p for p in prompts for _ in range(k)])
            res = sample(model, noise, sc.sampler, sc.steps, text=text, cfg_scale=sc.cfg_scale, **sc.options)
            if self.env.is_main:
                cfg = f", CFG {sc.cfg_scale:g}" if sc.cfg_scale != 1 else ""
                title = f"step {self.step} · {sc.sampler} · {res.nfe} NFE{cfg}"
                prompt_grid(self._to_images(res.x), prompts, path, title=title)
            return path
        y = torch.arange(n, device=self.device) % max(1, self.num_classes) if self.num_classes > 0 else None
        res = sample(model, noise, sc.sampler, sc.steps, y=y, cfg_scale=sc.cfg_scale, **sc.options)
        if self.env.is_main:  # (FSDP: every rank samples, the sharded EMA's forward is collective)
            save_grid(self._to_images(res.x), path, nrow=int(math.ceil(math.sqrt(n))))
        return path

    @torch.no_grad()
    def validation(self) -> dict[str, float]:
        if self.val_data is None:
            return {}
        loader = DataLoader(self.val_data, batch_size=min(256, len(self.val_data)), shuffle=False)
        g = torch.Generator(device=self.device).manual_seed(1234)
        totals, repa_total, count = torch.zeros(8), torch.zeros(8), 0
        for x, y, *extra in loader:
            x, y = x.to(self.device), self._condition(y, None, 0.0)
            terms = segment_terms(self.ema.model, x, y, 8, g, repa=self._repa_target(x, extra))
            totals += terms["fm"] * x.shape[0]
            repa_total += terms.get("repa", torch.zeros(8)) * x.shape[0]
            count += x.shape[0]
        seg = totals / count
        out = {f"val_seg{j}": float(v) for j, v in enumerate(seg)}
        out["val_loss"] = float(seg.mean())
        if self.cfg.repa.enabled:
            out["val_repa"] = float(repa_total.mean() / count)
        return out

    # ---- the loop -----------------------------------------------------------------------------

    def add_step_callback(self, fn: Callable[[Trainer, int], None]) -> None:
        """Call ``fn(trainer, step)`` after every optimiser step (e.g. to request a stop)."""
        self._on_step_end.append(fn)

    def request_stop(self, *_: Any) -> None:
        """Finish the current step, write a checkpoint and return (what SIGINT/SIGTERM do)."""
        self.stop_requested = True

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _loader(self):
        if isinstance(self.train_data, IterableDataset):  # streamed shards: resumes at an epoch boundary
            return stream_micro_batches(
                self.train_data,
                self.micro_batch,
                self.cfg.data.num_workers,
                start_epoch=self.step,
                pin_memory=self.device.type == "cuda",
            )
        sampler = StepBatchSampler(
            len(self.train_data),
            self.cfg.optim.batch_size,
            self.env.world_size,
            self.env.rank,
            self.cfg.optim.grad_accum,
            self.cfg.data.seed,
            self.step,
            self.cfg.train.max_steps,
        )
        workers = self.cfg.data.num_workers
        return DataLoader(
            EpochIndexed(self.train_data),
            batch_sampler=sampler,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
            prefetch_factor=4 if workers > 0 else None,
        )

    def lr_at(self, step: int) -> float:
        """The learning rate optimiser step ``step`` (0-based) uses."""
        return self.cfg.optim.lr * lr_factor(step, max(0, self.cfg.optim.warmup_steps))

    def _train_step(self, batches) -> dict[str, Tensor]:
        """Forward/backward of one optimiser step's micro-batches ``[(x, y), ...]`` (``grad_accum``
        of them): leaves the gradient of the mean loss in ``.grad``; returns the mean ``loss``,
        ``fm`` and ``nll`` (scalars, this rank)."""
        cfg = self.cfg
        g = step_generator(cfg.train.seed, self.step, self.env.rank, self.device)
        names = ("loss", "fm", "nll") + (("repa",) if cfg.repa.enabled else ())
        totals = {k: torch.zeros((), device=self.device) for k in names}
        self.optimizer.zero_grad(set_to_none=True)
        with self._step_global_rng():
            self._micro_steps(batches, g, totals)
        return totals

    def _step_global_rng(self):
        """Text-to-image models draw their RoPE position jitter from the global RNG: seed it from
        ``(seed, step, rank)`` for the step (and restore it after), so that a resumed run draws
        what an uninterrupted one does whatever ran in between (validation, sample grids)."""
        if self.text is None:
            return nullcontext()
        devices = [self.device] if self.device.type == "cuda" else []
        ctx = torch.random.fork_rng(devices=devices)
        seed = item_hash(_JITTER_SALT, self.cfg.train.seed, self.step, self.env.rank) % (2**63)
        return _seeded(ctx, seed)

    def _micro_steps(self, batches, g: torch.Generator, totals: dict[str, Tensor]) -> None:
        cfg = self.cfg
        accum = cfg.optim.grad_accum
        for m, (x, y, *extra) in enumerate(batches):
            x = x.to(self.device, non_blocking=True)
            if isinstance(self.train_data, EncodedStream):  # streamed images -> latents, batch-wise
                x = self.train_data.encode_batch(x, g)
            y = self._condition(y, g, cfg.objective.label_dropout)
            sync = self.ddp is not None and m < accum - 1
            if self.fsdp:  # reduce-scatter the gradients after the last micro-batch only
                self.model.set_requires_gradient_sync(m == accum - 1)
            with self.ddp.no_sync() if sync else nullcontext(), self._autocast():
                terms = patch_flow_loss(
                    self.forward,
                    x,
                    y,
                    timestep_sampler=self.timestep_sampler,
                    uncertainty_weight=cfg.objective.uncertainty_weight,
                    generator=g,
                    **({"repa": self._repa_target(x, extra)} if cfg.repa.enabled else {}),  # REPA: the alignment term
                )
            (terms["loss"] / accum).backward()
            for k in totals:
                totals[k] += terms[k].detach().float() / accum

    def _apply_gradients(self) -> tuple[Tensor, float, float]:
        """Clip, take the optimiser and scheduler step, update the EMA, advance ``self.step``.

        Returns:
            ``(grad_norm, lr, ema_decay)``: the total L2 gradient norm before clipping, the
            learning rate and the EMA decay this step used.
        """
        grad_norm = self._clip_gradients()
        return (grad_norm, *self._step_optimizer())

    def _clip_gradients(self) -> Tensor:
        """Clip to ``optim.grad_clip``; returns the total L2 gradient norm before clipping."""
        clip = self.cfg.optim.grad_clip
        # grad_clip <= 0: off (an infinite bound measures the norm and leaves the gradients alone)
        return local_value(  # (FSDP: a replicated DTensor)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else math.inf)
        )

    def _step_optimizer(self) -> tuple[float, float]:
        """The optimiser and scheduler step, the EMA update, ``self.step += 1``; returns ``(lr, ema_decay)``."""
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        decay = self.ema.update(self.model, self.step)
        self.step += 1
        return lr, decay

    def _non_finite(self, what: str, last_ckpt: Path | None) -> NonFiniteLossError:
        good = f"step {self._last_saved_step()}" if last_ckpt else "none yet"
        hint = (
            " The loss was finite: if this is the first step with train.compile=true, run without it to"
            " rule out the compiler."
            if "gradients" in what and self.cfg.train.compile
            else ""
        )
        return NonFiniteLossError(
            f"{what} at step {self.step + 1}; stopping. The last good checkpoint ({good}) in {self.ckpt_dir} "
            "is untouched. Lower optim.lr, raise optim.warmup_steps or use train.precision=fp32." + hint
        )

    def fit(self) -> TrainResult:
        """Run until ``train.max_steps`` (or a stop request); returns where things are."""
        cfg, env = self.cfg, self.env
        tc = cfg.train
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.run_dir / "config.yaml", lambda tmp: save_config(cfg, tmp))
        csv_file, writer, tb = self._open_logs() if env.is_main else (None, None, None)
        handlers = self._install_signal_handlers()
        last_ckpt: Path | None = self.ckpt_dir / "last.pt" if (self.ckpt_dir / "last.pt").exists() else None
        metrics: dict[str, float] = {}
        bar = tqdm(
            total=tc.max_steps,
            initial=self.step,
            disable=not (tc.progress and env.is_main),
            desc=f"train {cfg.name}",
            dynamic_ncols=True,
        )
        seen, t_last = 0, time.perf_counter()
        try:
            it = iter(self._loader())
            while self.step < tc.max_steps:
                self.model.train()
                batches = [next(it) for _ in range(cfg.optim.grad_accum)]
                totals = self._train_step(batches)
                loss = all_reduce_mean(totals["loss"], env)
                if not torch.isfinite(loss):
                    raise self._non_finite(f"non-finite loss ({loss.item()})", last_ckpt)
                grad_norm = self._clip_gradients()
                if not torch.isfinite(grad_norm):  # before the optimiser step: the weights stay finite
                    raise self._non_finite(f"non-finite gradients (norm {float(grad_norm)})", last_ckpt)
                lr, decay = self._step_optimizer()
                seen += cfg.optim.batch_size
                bar.update(1)
                for fn in self._on_step_end:
                    fn(self, self.step)

                row: dict[str, float] = {}
                if self.step % tc.log_every == 0 or self.step == tc.max_steps:
                    now = time.perf_counter()
                    ips = seen / max(now - t_last, 1e-9)
                    seen, t_last = 0, now
                    row.update(
                        loss=float(loss),
                        fm=float(all_reduce_mean(totals["fm"], env)),
                        nll=float(all_reduce_mean(totals["nll"], env)),
                        grad_norm=float(grad_norm),
                        lr=lr,
                        ema_decay=decay,
                        images_per_sec=ips,
                    )
                    if "repa" in totals:
                        row["repa"] = float(all_reduce_mean(totals["repa"], env))
                    bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{ips:.0f}")
                val_every = tc.val_every or tc.sample_every
                # FSDP: validation and samples run on every rank (the sharded EMA's forward is collective)
                if (env.is_main or self.fsdp) and (self.step % val_every == 0 or self.step == tc.max_steps):
                    row.update(self.validation())
                if (env.is_main or self.fsdp) and (self.step % tc.sample_every == 0 or self.step == tc.max_steps):
                    self.sample_grid()
                if "val_loss" in row or self.step % tc.sample_every == 0:
                    seen, t_last = 0, time.perf_counter()  # images/s counts training time only
                if row and env.is_main:
                    metrics.update(row)
                    self._log(writer, tb, row)
                    csv_file.flush()
                stop = any_rank(self.stop_requested, env)
                if self.step % tc.ckpt_every == 0 or self.step == tc.max_steps or stop:
                    last_ckpt = self.save_checkpoint() or last_ckpt
                    if csv_file is not None:  # the log is durable up to every checkpoint
                        os.fsync(csv_file.fileno())
                if stop:
                    break
        finally:
            bar.close()
            self._restore_signal_handlers(handlers)
            if csv_file is not None:
                csv_file.close()
            if tb is not None:
                tb.close()
        return TrainResult(
            self.run_dir,
            self.step,
            self.stop_requested and self.step < tc.max_steps,
            self.ckpt_dir / "last.pt" if env.is_main else None,
            metrics,
        )

    def _last_saved_step(self) -> int:
        try:
            return int(sorted(self.ckpt_dir.glob("step_*.pt"))[-1].stem.split("_")[1])
        except IndexError:
            return 0

    # ---- logging & signals --------------------------------------------------------------------

    def _open_logs(self):
        """Open ``metrics.csv`` for appending. The rows up to the resumed step are kept (a crash
        may have logged beyond it), rewritten atomically first, so a kill at any moment leaves
        every row that was there; each new row is flushed as it is written."""
        path = self.run_dir / "metrics.csv"
        rows = []
        if path.exists():
            with open(path, newline="") as f:
                rows = [
                    r
                    for r in csv.DictReader(f)
                    if r.get("step") and _int_or_none(r["step"]) is not None and int(r["step"]) <= self.step
                ]

        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as out:
                w = csv.DictWriter(out, fieldnames=CSV_COLUMNS, extrasaction="ignore")
                w.writeheader()
                w.writerows(rows)

        atomic_write(path, write)
        f = open(path, "a", newline="")
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=self.step + 1 if self.step else None)
        except (ImportError, ModuleNotFoundError):
            pass
        return f, writer, tb

    def _log(self, writer, tb, row: dict[str, float]) -> None:
        writer.writerow({"step": self.step, **row})
        if tb is not None:
            for k, v in row.items():
                tag = f"val/{k}" if k.startswith("val") else f"train/{k}"
                tb.add_scalar(tag, v, self.step)

    def _install_signal_handlers(self):

        if threading.current_thread() is not threading.main_thread():
            return None
        previous = {}

        def handler(signum, frame):
            if self.stop_requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.request_stop()
            if self.env.is_main:
                tqdm.write(
                    f"received {signal.Signals(signum).name}: finishing step {self.step + 1}, "
                    "writing a checkpoint, then stopping (press Ctrl-C again to abort)"
                )

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
        return previous

    @staticmethod
    def _restore_signal_handlers(previous) -> None:
        if previous:
            for sig, h in previous.items():
                signal.signal(sig, h)

    def close(self) -> None:
        """Free the models before leaving the process group (gloo may abort otherwise); release
        the run directory's lock."""
        self.ddp = None
        self.forward = None
        self.model = None
        self.ema = None
        self.optimizer = None
        self._release_lock()
        shutdown_distributed()


def _int_or_none(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def train(
    cfg: ExperimentConfig,
    run_dir: str | os.PathLike,
    resume: bool = False,
    decode: Callable[[Tensor], Tensor] | None = None,
) -> TrainResult:
    """Build a :class:`Trainer`, run it, and shut the process group down cleanly."""
    trainer = Trainer(cfg, run_dir, resume=resume, decode=decode)
    try:
        return trainer.fit()
    finally:
        trainer.close()
