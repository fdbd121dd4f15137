"""Sampling at scale: many images, any number of processes, resumable, ADM ``.npz`` output.

Sample ``i``'s noise and label depend only on ``(seed, i)`` and the network's output for a
sample does not depend on its batch-mates (the model evaluates its per-conditioning layers
batch-invariantly), so the result is the same for any number of processes and any batch size
(bitwise on CPU in fp32; on GPUs up to the kernels' own determinism).

Work is split in shards of ``shard_size`` consecutive indices; rank ``r`` of ``W`` generates
the shards ``j`` with ``j % W == r`` and writes each one atomically to ``OUT.parts/``. Finished
shards are skipped on a rerun. Rank 0 then streams the shards, in index order, into one ADM
``.npz`` (``arr_0`` uint8 NHWC, ``labels``) without holding them all in memory, and writes
``OUT.json`` with the sampler, its options, steps, NFE, CFG and images/s.
"""

from __future__ import annotations

import io
import json
import math
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..checkpoints import atomic_write
from ..data.augment import item_hash
from ..data.convert import to_uint8
from .api import sample

__all__ = ["GenerationSpec", "sample_noise", "sample_labels", "generate", "merge_shards"]

_NOISE_SALT = 0x6E6F697365  # "noise"
_LABEL_SALT = 0x6C6162656C  # "label"


@dataclass
class GenerationSpec:
    """What to generate.

    Attributes:
        num_samples: images in total.
        batch_size: images per network batch (memory only; results do not depend on it).
        seed: the seed of every sample's noise and label.
        sampler, steps, nfe, cfg_scale, guidance_interval, options: as in :func:`~patchforcing.sample`.
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


def sample_noise(seed: int, indices: Sequence[int], shape: Sequence[int]) -> Tensor:
    """``(len(indices), *shape)`` float32 standard normal noise; row ``k`` depends only on
    ``(seed, indices[k])``."""
    out = torch.empty(len(indices), *shape)
    for k, i in enumerate(indices):
        g = torch.Generator().manual_seed(item_hash(_NOISE_SALT, seed, i))
        out[k] = torch.randn(*shape, generator=g)
    return out


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


def _shard_path(parts: Path, j: int) -> Path:
    return parts / f"shard_{j:06d}.npz"


def _shard_done(path: Path, expected: int) -> bool:
    try:
        with np.load(path, allow_pickle=False) as z:
            return z["arr_0"].shape[0] == expected and z["labels"].shape[0] == expected
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
) -> Path | None:
    """Generate ``spec.num_samples`` images into the ADM ``.npz`` ``out`` (this rank's share).

    Args:
        model: the network (eval mode) on ``device``.
        decode: latents -> images in [-1, 1] (``None`` for pixel models).
        rank, world_size, barrier: the process group (``barrier`` waits for all ranks).
        meta: extra entries for ``OUT.json`` (e.g. the checkpoint path).
    Returns:
        the merged ``.npz`` on rank 0, ``None`` elsewhere.
    """
    out = Path(out)
    if out.suffix != ".npz":
        raise ValueError(f"output must be an .npz file, got {out}")
    parts = out.with_name(out.name + ".parts")
    parts.mkdir(parents=True, exist_ok=True)
    n_shards = math.ceil(spec.num_samples / spec.shard_size)
    mine = [j for j in range(n_shards) if j % world_size == rank]
    shape = (model.in_channels, *model.image_size)
    todo = []
    for j in mine:
        lo, hi = j * spec.shard_size, min((j + 1) * spec.shard_size, spec.num_samples)
        if not _shard_done(_shard_path(parts, j), hi - lo):
            todo.append((j, lo, hi))
    total = sum(hi - lo for _, lo, hi in todo)
    bar = tqdm(total=total, desc=f"sampling [rank {rank}]", disable=not progress, dynamic_ncols=True)
    stats: dict[str, Any] = {}
    seconds, made = 0.0, 0
    for j, lo, hi in todo:
        images, labels = [], []
        for b in range(lo, hi, spec.batch_size):
            idx = list(range(b, min(b + spec.batch_size, hi)))
            noise = sample_noise(spec.seed, idx, shape).to(device)
            y = sample_labels(spec, idx, model.num_classes)
            t0 = time.perf_counter()
            res = sample(model, noise, spec.sampler, spec.steps, nfe=spec.nfe,
                         y=None if y is None else y.to(device), cfg_scale=spec.cfg_scale,
                         guidance_interval=spec.guidance_interval, **spec.options)
            x = decode(res.x) if decode is not None else res.x
            images.append(to_uint8(x).permute(0, 2, 3, 1).cpu().numpy())
            seconds += time.perf_counter() - t0
            made += len(idx)
            labels.append((y if y is not None else torch.full((len(idx),), -1)).numpy())
            stats = {"steps": res.steps, "nfe": res.nfe, "calls_per_batch": res.calls, "options": res.options}
            bar.update(len(idx))
            bar.set_postfix(img_s=f"{made / max(seconds, 1e-9):.2f}")
        _save_npz_atomic(_shard_path(parts, j), arr_0=np.concatenate(images),
                         labels=np.concatenate(labels).astype(np.int64),
                         indices=np.arange(lo, hi, dtype=np.int64))
    bar.close()
    rank_info = {"rank": rank, "images": made, "seconds": seconds, **stats}
    (parts / f"rank_{rank:04d}.json").write_text(json.dumps(rank_info))
    if barrier is not None:
        barrier()
    if rank != 0:
        return None
    path = merge_shards(parts, out, spec.num_samples, spec.shard_size)
    ranks = [json.loads(p.read_text()) for p in sorted(parts.glob("rank_*.json"))]
    made_all = sum(r["images"] for r in ranks)
    secs = max((r["seconds"] for r in ranks), default=0.0)
    info = {
        "num_samples": spec.num_samples,
        "spec": {k: v for k, v in asdict(spec).items()},
        "sampler": spec.sampler,
        "options": stats.get("options", next((r.get("options") for r in ranks if r.get("options")), {})),
        "steps": stats.get("steps", next((r.get("steps") for r in ranks if r.get("steps")), None)),
        "nfe": stats.get("nfe", next((r.get("nfe") for r in ranks if r.get("nfe")), None)),
        "cfg_scale": spec.cfg_scale,
        "world_size": world_size,
        "images_generated_this_run": made_all,
        "images_per_sec": made_all / secs if secs > 0 else None,
        **(meta or {}),
    }
    out.with_suffix(".json").write_text(json.dumps(info, indent=2, default=str))
    return path


def merge_shards(parts: Path, out: Path, num_samples: int, shard_size: int) -> Path:
    """Stream the shards (index order) into one ADM ``.npz`` (``arr_0``, ``labels``), atomically."""
    n_shards = math.ceil(num_samples / shard_size)
    paths = [_shard_path(parts, j) for j in range(n_shards)]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise RuntimeError(f"cannot merge: {len(missing)} shard(s) missing in {parts} (e.g. {missing[:3]}); rerun to finish them")
    with np.load(paths[0], allow_pickle=False) as z:
        tail = z["arr_0"].shape[1:]

    def write(tmp: str) -> None:
        labels = []
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(
                    f, {"descr": np.dtype(np.uint8).str, "fortran_order": False, "shape": (num_samples, *tail)})
                for p in paths:
                    with np.load(p, allow_pickle=False) as z:
                        f.write(np.ascontiguousarray(z["arr_0"]).tobytes())
                        labels.append(z["labels"])
            buf = io.BytesIO()
            np.save(buf, np.concatenate(labels))
            zf.writestr("labels.npy", buf.getvalue())

    return atomic_write(out, write)
