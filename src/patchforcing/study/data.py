"""The real images of a study: the held-out reference, the real-vs-real floor, the sample labels.

* **reference**: the held-out split the trainer sets aside for its validation loss
  (``data.val_size`` items, the same fixed choice as :func:`~patchforcing.training.trainer.split_train_val`):
  never trained on by any arm or by the study's classifier. Every FD is measured against it.
* **labels**: sample ``i`` of every run, sampler and NFE gets the label of training item
  ``order[i % M]`` (``order`` a permutation seeded by the study's sample seed, ``M = min(#train,
  10000)``), so the samples follow the training label distribution and sample ``i``'s label is the
  same everywhere.
* **floor**: the training items ``order[:n]`` (``n = min(num_samples, #train)``), i.e. real images
  with exactly the samples' labels, scored like samples: the FD a generator that reproduces the
  training images would reach at this sample count (the "real-vs-real floor").

Images are read without flips and, for latent data, decoded by the data's autoencoder.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..autoencoders import load_autoencoder
from ..training.config import ExperimentConfig, apply_overrides
from ..training.trainer import build_data, split_train_val
from ..utils.images import to_uint8
from ..utils.io import atomic_write, save_npz_atomic
from .spec import StudyError

__all__ = [
    "RealSets",
    "SampleLabels",
    "sample_labels",
    "real_sets",
    "write_real_sets",
    "check_held_out",
    "data_identity",
    "LabelledView",
    "MAX_LABELS",
]

#: at most this many training labels are listed (sample i takes label ``i % MAX_LABELS``)
MAX_LABELS = 10_000
_BATCH = 64


class LabelledView(Dataset):
    """``base[indices[i]]`` with the data-set attributes :func:`~patchforcing.evaluation.train_classifier`
    reads (``num_classes``, ``resolution``, ``class_names``) and ``set_epoch`` forwarded."""

    def __init__(self, base: Any, indices: list[int]):
        self.base, self.indices = base, list(indices)
        self.num_classes = int(base.num_classes)
        self.resolution = int(getattr(base, "resolution", 0) or 0)
        self.class_names = getattr(base, "class_names", None)

    def __len__(self) -> int:
        return len(self.indices)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __getitem__(self, i: int):
        return self.base[self.indices[i]]

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Items ``indices`` as ``(images (B, 3, R, R), labels (B,))``; vectorised when the base
        data set renders batches (:class:`~patchforcing.data.SyntheticShapes`)."""
        idx = [self.indices[i] for i in indices]
        if hasattr(self.base, "batch"):
            return self.base.batch(idx)
        items = [self.base[i] for i in idx]
        return torch.stack([torch.as_tensor(x) for x, _ in items]), torch.tensor([int(y) for _, y in items])


@dataclass
class RealSets:
    """Real images (``uint8 (n, H, W, 3)``) and the shared sample labels of a study.

    Attributes:
        reference: the held-out images; floor: training images with the samples' labels.
        classes: label of sample ``i`` is ``classes[i % len(classes)]``.
        num_train, num_classes: training split size and classes.
        classifier_data: the training split (with the config's flips) for the study's classifier;
            ``None`` for latent data (no pixels to train on).
        pixel_space: whether the model works on pixels (no autoencoder).
    """

    reference: np.ndarray
    floor: np.ndarray
    classes: list[int]
    num_train: int
    num_classes: int
    classifier_data: LabelledView | None
    pixel_space: bool

    def describe(self) -> dict[str, Any]:
        return {
            "reference_images": int(len(self.reference)),
            "floor_images": int(len(self.floor)),
            "train_items": int(self.num_train),
            "num_classes": int(self.num_classes),
            "resolution": int(self.reference.shape[1]),
        }


@dataclass
class SampleLabels:
    """The study's sample labels and the training split they come from (no images read).

    Attributes:
        classes: label of sample ``i`` is ``classes[i % len(classes)]``.
        order: the seeded permutation of the training split (the floor is ``order[:n]``).
        num_train, num_classes: training split size and classes.
    """

    classes: list[int]
    order: list[int]
    num_train: int
    num_classes: int


def _labels_of(subset: Any, order: list[int]) -> list[int]:
    base, idx = getattr(subset, "dataset", None), getattr(subset, "indices", None)
    labels = getattr(base, "labels", None)
    if labels is not None and idx is not None:
        arr = np.asarray(labels)
        return [int(arr[idx[i]]) for i in order]
    return [int(subset[i][1]) for i in order]


def _images(items: Any, indices: list[int], decode: Any, device: torch.device) -> np.ndarray:
    out = []
    for s in range(0, len(indices), _BATCH):
        x = torch.stack([torch.as_tensor(items[i][0]) for i in indices[s : s + _BATCH]]).to(device)
        if decode is not None:
            x = decode(x)
        out.append(to_uint8(x.float()).permute(0, 2, 3, 1).cpu().numpy())
    if not out:
        raise StudyError("no real images to read")
    return np.ascontiguousarray(np.concatenate(out))


def check_held_out(cfg: ExperimentConfig) -> None:
    """Raises :class:`StudyError` when the config holds no images out (``data.val_size < 2``)."""
    if cfg.data.val_size < 2:
        raise StudyError(
            f"the study measures FD against held-out images, but data.val_size={cfg.data.val_size}; "
            "set data.val_size (e.g. data.val_size=512)"
        )


def _split(cfg: ExperimentConfig) -> tuple[Any, Any, Any]:
    """``(data, train, val)`` of ``cfg`` read without flips (latent data as configured)."""
    plain = apply_overrides(cfg, ["data.flip=false"]) if cfg.data.kind != "latents" else cfg
    data = build_data(plain)
    train, val = split_train_val(data, cfg.data.val_size)
    return data, train, val


def _sample_labels(data: Any, train: Any, seed: int) -> SampleLabels:
    num_classes = int(getattr(data, "num_classes", 0) or 0)
    n_train = len(train)
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(int(seed))).tolist()
    classes = _labels_of(train, order[: min(n_train, MAX_LABELS)]) if num_classes > 0 else [0]
    return SampleLabels(classes=classes, order=order, num_train=n_train, num_classes=num_classes)


def sample_labels(cfg: ExperimentConfig, seed: int = 0) -> SampleLabels:
    """The labels of a study's samples (see the module docstring), read from the data's label
    array without decoding images: what every rank of a distributed study needs to sample.

    Raises:
        StudyError: ``data.val_size`` is below 2 (no held-out images)."""
    check_held_out(cfg)
    data, train, _ = _split(cfg)
    return _sample_labels(data, train, seed)


def real_sets(
    cfg: ExperimentConfig,
    num_samples: int,
    seed: int = 0,
    device: torch.device | str = "cpu",
    labels: SampleLabels | None = None,
) -> RealSets:
    """The reference, floor and labels of a study on ``cfg``'s data (see the module docstring).

    ``labels``: the study's :func:`sample_labels` if already read (for ``cfg`` and ``seed``);
    otherwise they are read here.

    Raises:
        StudyError: ``data.val_size`` is below 2 (no held-out images).
    """
    device = torch.device(device)
    check_held_out(cfg)
    data, train, val = _split(cfg)
    labels = labels if labels is not None else _sample_labels(data, train, seed)
    spec = getattr(data, "autoencoder_spec", None)
    decode = None
    if spec is not None and spec.kind != "identity":
        decode = load_autoencoder(spec, device=device).decode
    reference = _images(val, list(range(len(val))), decode, device)
    floor = _images(train, labels.order[: min(int(num_samples), labels.num_train)], decode, device)
    view = None
    if decode is None and cfg.data.kind != "latents" and labels.num_classes >= 2:
        train_flip, _ = split_train_val(build_data(cfg), cfg.data.val_size)
        view = LabelledView(train_flip.dataset, list(train_flip.indices))
    return RealSets(
        reference=reference,
        floor=floor,
        classes=labels.classes,
        num_train=labels.num_train,
        num_classes=labels.num_classes,
        classifier_data=view,
        pixel_space=decode is None,
    )


def data_identity(cfg: ExperimentConfig) -> dict[str, Any]:
    """What the real images depend on (for caches): the data section."""
    return dataclasses.asdict(cfg.data) | {"num_workers": None}


def write_real_sets(directory: str | Path, real: RealSets, num_samples: int) -> dict[str, Path]:
    """The study's real images as files, so that any cell can be checked outside the study:

    * ``reference.npz``: the held-out images (``arr_0``, uint8 NHWC), the ``--ref`` of
      ``patchforcing eval`` that reproduces the study's FDs;
    * ``floor.npz``: the floor's training images (``arr_0``) with their labels (``labels``);
    * ``labels.txt``: the labels of samples ``0 .. num_samples - 1``, comma-separated on one line,
      the ``--classes`` of ``patchforcing sample`` that gives every sample its study label.

    Files are written atomically and only when their content changed (a resumed study keeps them).
    Returns the paths by name (``"reference"``, ``"floor"``, ``"labels"``)."""
    directory = Path(directory)
    labels = [real.classes[i % len(real.classes)] for i in range(int(num_samples))]
    paths = {
        "reference": directory / "reference.npz",
        "floor": directory / "floor.npz",
        "labels": directory / "labels.txt",
    }
    arrays = {
        "reference": {"arr_0": real.reference},
        "floor": {"arr_0": real.floor, "labels": np.asarray(labels[: len(real.floor)], dtype=np.int64)},
    }
    for name, want in arrays.items():
        path = paths[name]
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as z:
                    if set(z.files) == set(want) and all(np.array_equal(z[k], v) for k, v in want.items()):
                        continue
            except (OSError, ValueError):
                pass
        save_npz_atomic(path, **want)
    text = ",".join(map(str, labels)) + "\n"
    if not (paths["labels"].is_file() and paths["labels"].read_text() == text):
        atomic_write(paths["labels"], lambda tmp: Path(tmp).write_text(text))
    return paths
