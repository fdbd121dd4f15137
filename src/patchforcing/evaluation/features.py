"""Feature extractors for the evaluation metrics.

A :class:`FeatureExtractor` maps a ``uint8`` NHWC batch to a dict of float32 CPU tensors:

* ``pool``: ``(B, D)`` global features (FID / precision / recall),
* ``spatial``: ``(B, Ds)`` spatial features (sFID), or ``None`` when the extractor has none,
* ``logits``: ``(B, K)`` class logits (Inception Score), or ``None``.

Two are provided:

* :class:`InceptionFeatures`: the ADM evaluator's feature space, Inception-v3 with the
  2015-12-05 TensorFlow weights, through ``torch-fidelity``'s ``FeatureExtractorInceptionV3``
  (an optional dependency that needs ``torchvision``; the weights are downloaded by
  torch-fidelity unless a local file is given). ``pool`` = pool3 (2048-d, torch-fidelity's
  ``'2048'``), ``logits`` = the 1008-way logits without bias (``'logits_unbiased'``, as ADM
  computes its softmax), ``spatial`` = the first 7 channels of ``mixed_6/conv`` (17x17, flattened
  in ``(H, W, C)`` order: 2023-d, as in ADM). torch-fidelity does not list ``mixed_6/conv`` among
  its features; it is the output of the module ``Mixed_6d.branch1x1`` (TF's ``mixed_6`` is the
  third 17x17 Inception-C block, ``conv`` its 1x1 branch, conv + batch norm + ReLU), which we read
  with a forward hook during the same pass.
* :class:`ClassifierFeatures`: a :class:`~patchforcing.evaluation.classifier.SmallClassifier`
  checkpoint (penultimate pooled features, a spatial map, logits). Its metrics are *named after
  the classifier* (``FD_classifier``, ``sFD_classifier``, ``IS_classifier``, ...), never FID.

:func:`build_feature_extractor` makes one from ``"inception"`` or ``"classifier:PATH"``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..utils.io import torch_save_atomic
from .classifier import load_classifier
from .reference import EvaluationError

__all__ = [
    "FeatureExtractor",
    "InceptionFeatures",
    "ClassifierFeatures",
    "build_feature_extractor",
    "random_inception_weights",
    "INCEPTION_METRIC_NAMES",
]

#: metric key -> reported name, for Inception features
INCEPTION_METRIC_NAMES: dict[str, str] = {
    "fid": "FID",
    "sfid": "sFID",
    "is": "IS",
    "precision": "precision",
    "recall": "recall",
}

_INSTALL_HINT = (
    "Inception features need torch-fidelity, which needs torchvision: "
    "`pip install torch-fidelity torchvision` (with the torchvision build that matches your torch; "
    "see scripts/check-inception-stack.sh). Without them, train a small classifier with "
    "`patchforcing train-classifier` and use --features classifier:CKPT"
)


class FeatureExtractor:
    """Interface: ``extractor(images uint8 (B, H, W, 3)) -> {"pool", "spatial", "logits"}``.

    Attributes:
        name: short name of the feature space (recorded in results and caches).
        resolution: side images are brought to before extraction (``None``: any size is fine).
        accepts_adm_statistics: the precomputed ``mu``/``sigma``/``mu_s``/``sigma_s`` of an ADM
            reference batch are in this feature space (True only for Inception features).
        metric_names: metric key (``fid``, ``sfid``, ``is``, ``precision``, ``recall``) -> the
            name reported for it.
        spatial_note: why there are no spatial features, when there are none.
    """

    name: str = "features"
    resolution: int | None = None
    accepts_adm_statistics: bool = False
    metric_names: dict[str, str] = {
        "fid": "FD",
        "sfid": "sFD",
        "is": "IS",
        "precision": "precision",
        "recall": "recall",
    }
    spatial_note: str | None = None

    def __call__(self, images: np.ndarray) -> dict[str, Tensor | None]:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """JSON-friendly description (for results files and caches)."""
        return {"name": self.name, "resolution": self.resolution}


def _import_torch_fidelity() -> Any:
    """torch-fidelity's Inception module (an optional dependency, imported here only)."""
    try:
        import torch_fidelity.feature_extractor_inceptionv3 as fe
    except ImportError as e:
        raise EvaluationError(f"{_INSTALL_HINT} (import failed: {e})") from None
    return fe


def _check_batch(images: Any) -> Tensor:
    if isinstance(images, np.ndarray):
        if not images.flags.writeable:  # e.g. streamed from a file: torch wants writable memory
            images = images.copy()
        images = torch.from_numpy(np.ascontiguousarray(images))
    t = images
    if not isinstance(t, Tensor) or t.dtype != torch.uint8 or t.dim() != 4 or t.shape[-1] != 3:
        shape = tuple(getattr(t, "shape", ()))
        raise EvaluationError(
            f"feature extractors take uint8 (B, H, W, 3) batches, got {getattr(t, 'dtype', type(t))} {shape}"
        )
    return t


class InceptionFeatures(FeatureExtractor):
    """Inception-v3 (2015-12-05) features through torch-fidelity; see the module docstring.

    Args:
        weights_path: a local copy of torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``
            (a plain state_dict); ``None`` lets torch-fidelity download it (needs the network).
        device: where the network runs.
        spatial: also read ``mixed_6/conv`` for sFID (default True).
    """

    name = "inception"
    accepts_adm_statistics = True
    metric_names = dict(INCEPTION_METRIC_NAMES)

    def __init__(
        self, weights_path: str | os.PathLike | None = None, device: Any = "cpu", spatial: bool = True
    ) -> None:
        fe = _import_torch_fidelity()
        if weights_path is not None:
            weights_path = Path(weights_path).expanduser()
            if not weights_path.is_file():
                raise EvaluationError(f"Inception weights file {str(weights_path)!r} does not exist")
        self.weights_path = None if weights_path is None else str(weights_path)
        self.device = torch.device(device)
        try:
            self.model = fe.FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=self.weights_path
            )
        except (RuntimeError, OSError, ValueError) as e:
            src = self.weights_path or "the download"
            raise EvaluationError(f"cannot load the Inception weights from {src}: {str(e).splitlines()[0]}") from None
        self.model = self.model.to(self.device).eval()
        self._spatial: Tensor | None = None
        self._hook = None
        if spatial:
            block = getattr(getattr(self.model, "Mixed_6d", None), "branch1x1", None)
            if block is None:
                self.spatial_note = (
                    "this torch-fidelity version has no Mixed_6d.branch1x1 module (ADM's mixed_6/conv); "
                    "sFID is not computed"
                )
            else:
                self._hook = block.register_forward_hook(self._grab)

    def _grab(self, module, inputs, output) -> None:
        self._spatial = output

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> dict[str, Tensor | None]:
        x = _check_batch(images).to(self.device).permute(0, 3, 1, 2).contiguous()
        self._spatial = None
        pool, logits = self.model(x)
        spatial = None
        if self._hook is not None and self._spatial is not None:
            s = self._spatial[:, :7].float()  # (B, 7, 17, 17) -> ADM's [:, :, :, :7] of NHWC, flattened
            spatial = s.permute(0, 2, 3, 1).reshape(s.shape[0], -1).cpu()
        return {"pool": pool.float().cpu(), "spatial": spatial, "logits": logits.float().cpu()}

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "network": "Inception-v3 2015-12-05 (torch-fidelity FeatureExtractorInceptionV3)",
            "weights": self.weights_path or "torch-fidelity download",
            "pool": "pool3 (2048)",
            "spatial": None if self._hook is None else "mixed_6/conv[:7] = Mixed_6d.branch1x1 (7x17x17)",
            "logits": "logits_unbiased (1008)",
        }


def random_inception_weights(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a randomly initialised state_dict with the shapes torch-fidelity's InceptionV3 loads.

    For smoke tests of the Inception pipeline without the real weights (no download): the
    extractor class is instantiated with its weight loading skipped, its modules keep their
    default random initialisation (seeded), and its ``state_dict`` is saved. Needs torch-fidelity.
    """
    fe = _import_torch_fidelity()

    class _NoLoad(fe.FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, *args, **kwargs):  # skip the (empty) weights
            return None

    saved = fe.load_state_dict_from_url
    fe.load_state_dict_from_url = lambda *a, **k: {}  # never download
    try:
        torch.manual_seed(seed)
        model = _NoLoad("inception-v3-compat", ["2048"])
    finally:
        fe.load_state_dict_from_url = saved
    with torch.no_grad():  # He-normal convolutions keep the activations O(1) through the deep stack
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            elif isinstance(m, torch.nn.Linear):
                torch.nn.init.normal_(m.weight, std=m.in_features**-0.5)
                torch.nn.init.zeros_(m.bias)
    sd = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    return torch_save_atomic(sd, path)


class ClassifierFeatures(FeatureExtractor):
    """Features of a :class:`~patchforcing.evaluation.classifier.SmallClassifier` checkpoint.

    Images are resized (ADM centre crop) to the classifier's training resolution by the caller
    (:func:`~patchforcing.evaluation.evaluate.evaluate` reads :attr:`resolution`); metrics are
    reported as ``FD_classifier``, ``sFD_classifier``, ``IS_classifier``,
    ``precision_classifier``, ``recall_classifier``.
    """

    name = "classifier"
    accepts_adm_statistics = False
    metric_names = {
        "fid": "FD_classifier",
        "sfid": "sFD_classifier",
        "is": "IS_classifier",
        "precision": "precision_classifier",
        "recall": "recall_classifier",
    }

    def __init__(self, checkpoint: str | os.PathLike, device: Any = "cpu") -> None:
        self.checkpoint = str(checkpoint)
        self.device = torch.device(device)
        self.model, self.info = load_classifier(checkpoint, map_location="cpu")
        self.model = self.model.to(self.device)
        self.resolution = int(self.model.config.resolution)

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> dict[str, Tensor | None]:
        t = _check_batch(images)
        x = t.to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            x = F.interpolate(
                x, size=(self.resolution, self.resolution), mode="bilinear", antialias=True, align_corners=False
            )
        f = self.model.features(x)
        return {k: (None if v is None else v.float().cpu()) for k, v in f.items()}

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "checkpoint": self.checkpoint,
            "resolution": self.resolution,
            "config": self.info.get("config"),
            "held_out_accuracy": self.info.get("accuracy"),
            "note": "features of a small classifier trained on the data set; FD_classifier etc. are not FID",
        }


def build_feature_extractor(
    spec: str | FeatureExtractor,
    *,
    inception_weights: str | os.PathLike | None = None,
    device: Any = "cpu",
) -> FeatureExtractor:
    """``"inception"`` -> :class:`InceptionFeatures`; ``"classifier:PATH"`` -> :class:`ClassifierFeatures`;
    an extractor instance is returned as is."""
    if isinstance(spec, FeatureExtractor):
        return spec
    s = str(spec).strip()
    if s.lower() == "inception":
        return InceptionFeatures(inception_weights, device=device)
    if s.lower().startswith("classifier:"):
        path = s.split(":", 1)[1]
        if not path:
            raise EvaluationError("--features classifier:CKPT needs a checkpoint path after 'classifier:'")
        p = Path(path).expanduser()
        if p.is_dir():
            raise EvaluationError(
                f"classifier checkpoint {path!r} is a directory, expected a classifier checkpoint file "
                "(from `patchforcing train-classifier`)"
            )
        if not p.is_file():
            raise EvaluationError(f"classifier checkpoint {path!r} does not exist")
        return ClassifierFeatures(Path(path).expanduser(), device=device)
    raise EvaluationError(f"unknown features {spec!r}; expected 'inception' or 'classifier:CKPT'")
