"""Sampling at scale: many images, any number of processes, resumable, ADM ``.npz`` output.

Sample ``i``'s noise and label depend only on ``(seed, i)`` and the network's output for a
sample does not depend on its batch-mates (the model evaluates its per-conditioning layers
batch-invariantly), so the result is the same for any number of processes and any batch size
(bitwise on CPU in fp32; on GPUs up to the kernels' own determinism).

Work is split in shards of ``shard_size`` consecutive indices; rank ``r`` of ``W`` generates
the shards ``j`` with ``j % W == r`` and writes each one atomically to ``OUT.parts/``. Finished
shards are skipped on a rerun, but only when ``OUT.parts/settings.json`` (written before the first
shard) shows they were made with the same settings: the model's weights (sha256 of its
state_dict), sampler and options, steps / NFE, time grid, guidance, labels, seed, shard size,
precision and decoder. Other settings are refused (:class:`ShardSettingsError`, naming the
differences) unless ``overwrite=True`` re-samples everything. Rank 0 then streams the shards, in
index order, into one ADM ``.npz`` (``arr_0`` uint8 NHWC, ``labels``) without holding them all in
memory, and writes ``OUT.json`` with the sampler, its options, steps, NFE, CFG and images/s.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..utils.images import to_uint8
from ..utils.io import atomic_write, clean_temp_files, read_json, write_json_atomic
from ..utils.seeding import indexed_randn, item_hash
from .api import SampleResult, _check_count, sample
from .guidance import check_guidance
from .samplers import SAMPLERS, make_sampler, resolve_quantile_alias

__all__ = [
    "GenerationSpec",
    "ShardSettingsError",
    "SETTINGS_FILE",
    "model_sha256",
    "sampling_settings",
    "sample_noise",
    "sample_labels",
    "sample_indices",
    "generate",
    "merge_shards",
]

_NOISE_SALT = 0x6E6F697365  # "noise"
_LABEL_SALT = 0x6C6162656C  # "label"
SHARDS_FORMAT = "patchforcing-sample-shards"
SHARDS_VERSION = 1
#: the settings record beside the shards, in ``OUT.parts/``
SETTINGS_FILE = "settings.json"


class ShardSettingsError(ValueError):
    """``OUT.parts/`` holds shards made with other settings (or with no settings record)."""


@dataclass
class GenerationSpec:
    """What to generate.

    Attributes:
        num_samples: images in total.
        batch_size: images per network batch (memory only; results do not depend on it).
        seed: the seed of every sample's noise and label.
        sampler, steps, nfe, cfg_scale, guidance_interval, options: as in :func:`~patchforcing.sample`
            (checked here, before any work; ``p`` in ``options`` becomes ``quantile``).
        labels: ``"uniform"`` (i.i.d. uniform classes), ``"balanced"`` (``i % K``), or given by
            ``classes`` (cycled).
        classes: explicit class list (``--classes 1,2,3``).
        shard_size: indices per shard file.
    """

    num_samples: int
    batch_size: int = 64
    seed: int = 0
    sampler: str = "euler_pf"
    steps: int | None = None
    nfe: int | None = None
    cfg_scale: float = 1.0
    guidance_interval: tuple[float, float] | None = None
    labels: str = "uniform"
    classes: list[int] | None = None
    shard_size: int = 1000
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.batch_size < 1 or self.shard_size < 1:
            raise ValueError("batch_size and shard_size must be >= 1")
        if self.labels not in ("uniform", "balanced", "given"):
            raise ValueError(f"labels must be 'uniform', 'balanced' or 'given', got {self.labels!r}")
        if self.classes is not None:
            self.labels = "given"
        if self.labels == "given" and not self.classes:
            raise ValueError("labels='given' needs a non-empty classes list")
        if self.steps is not None and self.nfe is not None:
            raise ValueError("give either steps or an NFE budget, not both")
        if self.steps is not None:
            _check_count("steps", self.steps)
        if self.nfe is not None:
            _check_count("nfe", self.nfe)
        self.cfg_scale, self.guidance_interval = check_guidance(self.cfg_scale, self.guidance_interval)
        cls = SAMPLERS.get(self.sampler)
        if cls is not None and "quantile" in cls.__dataclass_fields__:
            self.options = resolve_quantile_alias(self.sampler, dict(self.options))
        make_sampler(self.sampler, **self.options)  # unknown sampler / option / bad value: refused now


def sample_noise(seed: int, indices: Sequence[int], shape: Sequence[int]) -> Tensor:
    """``(len(indices), *shape)`` float32 standard normal noise; row ``k`` depends only on
    ``(seed, indices[k])``."""
    return indexed_randn(_NOISE_SALT, seed, indices, shape)


def sample_labels(spec: GenerationSpec, indices: Sequence[int], num_classes: int) -> Tensor | None:
    """``(len(indices),)`` long labels (``None`` for an unconditional model); label ``k`` depends
    only on ``(seed, indices[k])``."""
    if spec.labels == "given":
        bad = [c for c in spec.classes if not 0 <= c < max(num_classes, 1)]
        if bad:
            raise ValueError(f"classes {bad} are outside [0, {num_classes - 1}]")
        return torch.tensor([spec.classes[i % len(spec.classes)] for i in indices], dtype=torch.long)
    if num_classes == 0:
        return None
    if spec.labels == "balanced":
        return torch.tensor([i % num_classes for i in indices], dtype=torch.long)
    return torch.tensor([item_hash(_LABEL_SALT, spec.seed, i) % num_classes for i in indices], dtype=torch.long)


# --------------------------------------------------------------------------------------------
# the settings record
# --------------------------------------------------------------------------------------------


def sample_indices(
    model: nn.Module,
    spec: GenerationSpec,
    indices: Sequence[int],
    *,
    device: torch.device | str = "cpu",
    decode: Callable[[Tensor], Tensor] | None = None,
    progress: bool = False,
) -> tuple[Tensor, Tensor | None, SampleResult]:
    """Samples ``indices`` of a run: their noise and labels depend only on ``(spec.seed, i)``.

    Returns:
        ``(x, y, result)``: ``x`` (len(indices), C, H, W) decoded to images when ``decode`` is given
        (model space otherwise), ``y`` (len(indices),) labels on the CPU (``None`` for an
        unconditional model), and the sampler's :class:`SampleResult`.
    """
    noise = sample_noise(spec.seed, indices, (model.in_channels, *model.image_size)).to(device)
    y = sample_labels(spec, indices, model.num_classes)
    res = sample(
        model,
        noise,
        spec.sampler,
        spec.steps,
        nfe=spec.nfe,
        y=None if y is None else y.to(device),
        cfg_scale=spec.cfg_scale,
        guidance_interval=spec.guidance_interval,
        progress=progress,
        **spec.options,
    )
    return (decode(res.x) if decode is not None else res.x), y, res


def model_sha256(model: nn.Module) -> str:
    """sha256 of a model's ``state_dict``: every tensor's name, dtype, shape and bytes, in key
    order (the same on any device; one tensor on the CPU at a time)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _model_dtype(model: nn.Module) -> str:
    for t in model.parameters():
        return str(t.dtype).replace("torch.", "")
    return "float32"


def sampling_settings(
    model: nn.Module,
    spec: GenerationSpec,
    *,
    decode: Callable[[Tensor], Tensor] | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything the images of a shard depend on (the record kept beside the shards).

    ``meta`` may give ``model_sha256`` (else the state_dict is hashed) and ``vae`` or ``decode``
    (a JSON description of the decoder; a custom ``decode`` without one is recorded as ``"custom"``).
    Batch size, world size and ``num_samples`` are not part of it (results do not depend on them).
    """
    meta = meta or {}
    sampler = make_sampler(spec.sampler, **spec.options)
    if "decode" in meta:
        decoder: Any = meta["decode"]
    elif "vae" in meta:
        decoder = meta["vae"]
    else:
        decoder = None if decode is None else "custom"
    settings = {
        "format": SHARDS_FORMAT,
        "version": SHARDS_VERSION,
        "model_sha256": str(meta.get("model_sha256") or model_sha256(model)),
        "model": type(model).__name__,
        "image_shape": [int(model.in_channels), *map(int, model.image_size)],
        "num_classes": int(model.num_classes),
        "dtype": _model_dtype(model),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "sampler": sampler.name,
        "options": sampler.options(),
        "steps": spec.steps,
        "nfe": spec.nfe,
        "time_grid": "uniform",
        "cfg_scale": spec.cfg_scale,
        "guidance_interval": None if spec.guidance_interval is None else list(spec.guidance_interval),
        "guide_uncertainty": True,
        "labels": spec.labels,
        "classes": None if spec.classes is None else [int(c) for c in spec.classes],
        "seed": int(spec.seed),
        "shard_size": int(spec.shard_size),
        "decode": decoder,
    }
    return json.loads(json.dumps(settings, default=str))  # as it reads back from the file


def _short(v: Any) -> str:
    text = json.dumps(v, default=str)
    return text if len(text) <= 70 else text[:67] + "..."


def _settings_diff(old: Any, new: dict[str, Any]) -> list[str]:
    if not isinstance(old, dict):
        return ["(unreadable record)"]
    return [
        f"{k}: {_short(old.get(k))} -> {_short(new.get(k))}"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]


def _prepare_parts(
    parts: Path, settings: dict[str, Any], overwrite: bool, rank: int, world_size: int, n_shards: int
) -> None:
    """Check (or write) the settings record; with ``overwrite`` drop this rank's shards first.

    Every rank calls this on its own (no barrier needed): the record is written atomically before
    any shard, ranks only delete their own shards, and equal settings give equal records."""
    record = parts / SETTINGS_FILE
    shards = sorted(parts.glob("shard_*.npz"))
    if overwrite:
        for path in shards:
            j = int(path.stem.split("_")[1])
            if (j < n_shards and j % world_size == rank) or (j >= n_shards and rank == 0):
                path.unlink(missing_ok=True)
        (parts / f"rank_{rank:04d}.json").unlink(missing_ok=True)
        write_json_atomic(record, settings)
        return
    if record.is_file():
        try:
            old = read_json(record)
        except ValueError:
            old = None
        diff = _settings_diff(old, settings)
        if diff:
            raise ShardSettingsError(
                f"{parts} holds samples made with other settings ({'; '.join(diff)}); they would be mixed with "
                "the new ones. Choose another output, or re-sample everything with overwrite=True (--overwrite)"
            )
        return
    if shards:
        raise ShardSettingsError(
            f"{parts} holds {len(shards)} shard(s) but no {SETTINGS_FILE} (made by an older patchforcing?), so their "
            "settings are unknown. Choose another output, or re-sample everything with overwrite=True (--overwrite)"
        )
    write_json_atomic(record, settings)


def _shard_path(parts: Path, j: int) -> Path:
    return parts / f"shard_{j:06d}.npz"


def _shard_done(path: Path, lo: int, hi: int) -> bool:
    try:
        with np.load(path, allow_pickle=False) as z:
            n = hi - lo
            return (
                z["arr_0"].shape[0] == n
                and z["labels"].shape[0] == n
                and np.array_equal(z["indices"], np.arange(lo, hi, dtype=np.int64))
            )
    except Exception:  # missing, truncated, or not an npz: redo it
        return False


def _save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(path, write)


def generate(
    model: nn.Module,
    spec: GenerationSpec,
    out: str | Path,
    *,
    decode: Callable[[Tensor], Tensor] | None = None,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    barrier: Callable[[], None] | None = None,
    progress: bool = True,
    meta: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path | None:
    """Generate ``spec.num_samples`` images into the ADM ``.npz`` ``out`` (this rank's share).

    Args:
        model: the network (eval mode) on ``device``.
        decode: latents ``(B, c, h, w)`` -> images ``(B, 3, H, W)`` in [-1, 1] (``None`` for pixel models).
        rank, world_size, barrier: the process group (``barrier`` waits for all ranks).
        meta: extra entries for ``OUT.json`` (e.g. the checkpoint path); ``model_sha256`` and
            ``vae`` / ``decode`` also enter the settings record (:func:`sampling_settings`).
        overwrite: re-sample every shard even if ``OUT.parts/`` holds finished ones (made with
            these or other settings).
    Returns:
        the merged ``.npz`` on rank 0, ``None`` elsewhere.
    Raises:
        ShardSettingsError: ``OUT.parts/`` holds shards made with other settings (the message
            names the differences) and ``overwrite`` is off.
        NonFiniteSampleError: the network produced NaN/inf (nothing of that batch is written).
    """
    out = Path(out)
    if out.suffix != ".npz":
        raise ValueError(f"output must be an .npz file, got {out}")
    parts = out.with_name(out.name + ".parts")
    parts.mkdir(parents=True, exist_ok=True)
    if world_size == 1:
        clean_temp_files(parts)  # left by a killed run (under torchrun another rank may be writing)
    n_shards = math.ceil(spec.num_samples / spec.shard_size)
    settings = sampling_settings(model, spec, decode=decode, meta=meta)
    _prepare_parts(parts, settings, overwrite, rank, world_size, n_shards)
    mine = [j for j in range(n_shards) if j % world_size == rank]
    todo = []
    for j in mine:
        lo, hi = j * spec.shard_size, min((j + 1) * spec.shard_size, spec.num_samples)
        if not _shard_done(_shard_path(parts, j), lo, hi):
            todo.append((j, lo, hi))
    total = sum(hi - lo for _, lo, hi in todo)
    bar = tqdm(total=total, desc=f"sampling [rank {rank}]", disable=not progress, dynamic_ncols=True)
    stats: dict[str, Any] = {}
    seconds, made = 0.0, 0
    for j, lo, hi in todo:
        images, labels = [], []
        for b in range(lo, hi, spec.batch_size):
            idx = list(range(b, min(b + spec.batch_size, hi)))
            t0 = time.perf_counter()
            x, y, res = sample_indices(model, spec, idx, device=device, decode=decode)
            images.append(to_uint8(x).permute(0, 2, 3, 1).cpu().numpy())
            seconds += time.perf_counter() - t0
            made += len(idx)
            labels.append((y if y is not None else torch.full((len(idx),), -1)).numpy())
            stats = {"steps": res.steps, "nfe": res.nfe, "calls_per_batch": res.calls, "options": res.options}
            bar.update(len(idx))
            bar.set_postfix(img_s=f"{made / max(seconds, 1e-9):.2f}")
        _save_npz_atomic(
            _shard_path(parts, j),
            arr_0=np.concatenate(images),
            labels=np.concatenate(labels).astype(np.int64),
            indices=np.arange(lo, hi, dtype=np.int64),
        )
    bar.close()
    rank_info = {"rank": rank, "images": made, "seconds": seconds, **stats}
    write_json_atomic(parts / f"rank_{rank:04d}.json", rank_info)
    if barrier is not None:
        barrier()
    if rank != 0:
        return None
    path = merge_shards(parts, out, spec.num_samples, spec.shard_size)
    ranks = [read_json(p) for p in (parts / f"rank_{r:04d}.json" for r in range(world_size)) if p.is_file()]
    made_all = sum(r["images"] for r in ranks)
    secs = max((r["seconds"] for r in ranks), default=0.0)
    info = {
        "num_samples": spec.num_samples,
        "spec": {k: v for k, v in asdict(spec).items()},
        "sampler": spec.sampler,
        "options": stats.get(
            "options", next((r.get("options") for r in ranks if r.get("options")), settings["options"])
        ),
        "steps": stats.get("steps", next((r.get("steps") for r in ranks if r.get("steps")), None)),
        "nfe": stats.get("nfe", next((r.get("nfe") for r in ranks if r.get("nfe")), None)),
        "cfg_scale": spec.cfg_scale,
        "world_size": world_size,
        "images_generated_this_run": made_all,
        "images_per_sec": made_all / secs if secs > 0 else None,
        "settings": settings,
        **(meta or {}),
    }
    write_json_atomic(out.with_suffix(".json"), info)
    return path


def merge_shards(parts: Path, out: Path, num_samples: int, shard_size: int) -> Path:
    """Stream the shards (index order) into one ADM ``.npz`` (``arr_0``, ``labels``), atomically."""
    n_shards = math.ceil(num_samples / shard_size)
    paths = [_shard_path(parts, j) for j in range(n_shards)]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise RuntimeError(
            f"cannot merge: {len(missing)} shard(s) missing in {parts} (e.g. {missing[:3]}); rerun to finish them"
        )
    with np.load(paths[0], allow_pickle=False) as z:
        tail = z["arr_0"].shape[1:]

    def write(tmp: str) -> None:
        labels = []
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(
                    f, {"descr": np.dtype(np.uint8).str, "fortran_order": False, "shape": (num_samples, *tail)}
                )
                for p in paths:
                    with np.load(p, allow_pickle=False) as z:
                        f.write(np.ascontiguousarray(z["arr_0"]).tobytes())
                        labels.append(z["labels"])
            buf = io.BytesIO()
            np.save(buf, np.concatenate(labels))
            zf.writestr("labels.npy", buf.getvalue())

    return atomic_write(out, write)
