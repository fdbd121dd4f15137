"""Autoencoders between images and the space a model is trained in (SD VAE latents or pixels).

Conventions (the SD VAE's, used everywhere in this package):

* images are ``(B, 3, H, W)`` float in ``[-1, 1]``;
* :meth:`Autoencoder.encode_posterior` returns the *unscaled* posterior ``N(mean, std^2)`` of the
  latent, each ``(B, c, H / f, W / f)`` (``c`` = :attr:`~Autoencoder.latent_channels`, ``f`` =
  :attr:`~Autoencoder.downsample`; ``4`` and ``8`` for the SD VAE);
* models are trained on, and sample, *scaled* latents: :meth:`AutoencoderSpec.scale` maps an
  unscaled latent ``z`` to ``(z - shift) * scale_factor / std`` with either a scalar ``shift`` and
  ``std = 1`` (SD VAE: ``shift = 0``, ``scale_factor = 0.18215``) or per-channel ``shift = mean_c``
  and ``std = std_c`` (statistics stored with the latents); :meth:`AutoencoderSpec.unscale` is its
  inverse, and :meth:`Autoencoder.decode` takes scaled latents.

An :class:`AutoencoderSpec` (kind, weights source, scaling) is small plain data: it is stored in
the latent index, in training checkpoints and in exported models, so whatever made or trained on
latents always decodes with the same autoencoder and scaling.

Kinds: ``"kl"`` (diffusers ``AutoencoderKL``: SD VAE ft-EMA / ft-MSE), ``"tiny"`` (diffusers
``AutoencoderTiny``, TAESD: fast previews; its latents are already scaled, std 0) and
``"identity"`` (pixel-space models) and ``"flux2"`` (diffusers ``AutoencoderKLFlux2``, the FLUX.2
VAE: 32 latent channels, factor 8; its latents are normalised by the batch-norm statistics stored
in the VAE, per channel *and* position in a 2x2 patch, see :attr:`AutoencoderSpec.stats_patch_size`).
The diffusers ones need ``pip install 'patchforcing[vae]'``.

Public API: :class:`AutoencoderSpec`, :class:`Autoencoder`, :class:`IdentityAutoencoder`,
:class:`DiffusersAutoencoder`, :class:`AutoencoderError`, :func:`load_autoencoder`,
:func:`autoencoder_spec_from_checkpoint`, :func:`load_autoencoder_for`,
:func:`decode_to_images`, :data:`SD_VAE_EMA`, :data:`SD_VAE_SCALE`.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .checkpoints import TRAIN_FORMAT, find_checkpoint, read_safetensors_metadata, safe_torch_load
from .utils.hub import HubError, probe_hub_file
from .utils.io import is_offline, looks_local

__all__ = [
    "AUTOENCODER_KINDS",
    "SD_VAE_EMA",
    "SD_VAE_SCALE",
    "AutoencoderError",
    "AutoencoderSpec",
    "Autoencoder",
    "IdentityAutoencoder",
    "DiffusersAutoencoder",
    "load_autoencoder",
    "detect_kind",
    "autoencoder_spec_from_checkpoint",
    "load_autoencoder_for",
    "decode_to_images",
]

#: concrete autoencoder kinds (``"auto"`` is also accepted where a source is given: see :func:`detect_kind`)
AUTOENCODER_KINDS: tuple[str, ...] = ("identity", "kl", "tiny", "flux2")
#: hub id of the SD VAE the released PFT checkpoints were trained with
SD_VAE_EMA = "stabilityai/sd-vae-ft-ema"
#: latent scale factor of the SD VAE (ft-EMA and ft-MSE alike)
SD_VAE_SCALE = 0.18215

_DIFFUSERS_CLASS = {"kl": "AutoencoderKL", "tiny": "AutoencoderTiny", "flux2": "AutoencoderKLFlux2"}
#: kinds whose ``encode`` returns a diagonal Gaussian posterior (``latent_dist``)
_POSTERIOR_KINDS = ("kl", "flux2")
_KIND_OF_CLASS = {v: k for k, v in _DIFFUSERS_CLASS.items()}


class AutoencoderError(ValueError):
    """An autoencoder that cannot be loaded (missing weights, offline, unknown kind, bad spec)."""


# --------------------------------------------------------------------------------------------
# the spec: which autoencoder, and how its latents are scaled
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AutoencoderSpec:
    """Which autoencoder, where its weights are, and the latent scaling (plain, serialisable).

    Attributes:
        kind: ``"identity"``, ``"kl"``, ``"tiny"`` or ``"flux2"``.
        source: hub id (``"stabilityai/sd-vae-ft-ema"``) or local directory of a diffusers model
            (``None`` for identity).
        scale_factor: multiplies the (shifted) latent; ``None`` = not resolved yet (the VAE's
            ``config.scaling_factor`` fills in at :func:`load_autoencoder`).
        shift_factor: scalar shift subtracted first (``None`` = the VAE's, else 0).
        latents_mean, latents_std: per-channel statistics (both or neither); when set they
            replace ``shift_factor`` and divide by ``std_c``: ``(z - mean_c) * scale_factor / std_c``.
        stats_patch_size: ``p = 1`` (default): one mean/std per channel. ``p > 1``: ``C * p * p``
            values, one per channel and position ``(dy, dx)`` in each ``p x p`` patch of the latent
            grid, channel-major (index ``c * p * p + dy * p + dx``) -- the layout of the FLUX.2 VAE's
            batch-norm statistics, which it keeps for its 2x2-patchified latents: with ``p = 2``,
            ``scale`` equals the FLUX.2 pipeline's ``(patchify(z) - bn_mean) / bn_std`` mapped back
            to the ``(C, h, w)`` grid (``h``, ``w`` must then be multiples of ``p``).
    """

    kind: str = "identity"
    source: str | None = None
    scale_factor: float | None = None
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    stats_patch_size: int = 1

    def __post_init__(self) -> None:
        if self.kind not in AUTOENCODER_KINDS:
            raise AutoencoderError(f"autoencoder kind must be one of {', '.join(AUTOENCODER_KINDS)}; got {self.kind!r}")
        if self.kind != "identity" and not self.source:
            raise AutoencoderError(f"an autoencoder of kind {self.kind!r} needs a source (hub id or local directory)")
        for name in ("latents_mean", "latents_std"):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, tuple(float(x) for x in v))
        if (self.latents_mean is None) != (self.latents_std is None):
            raise AutoencoderError("latents_mean and latents_std must be given together")
        if self.latents_mean is not None:
            if len(self.latents_mean) != len(self.latents_std) or not self.latents_mean:
                raise AutoencoderError(
                    f"latents_mean ({len(self.latents_mean)}) and latents_std "
                    f"({len(self.latents_std)}) must have one value per channel"
                )
            if not all(s > 0 and math.isfinite(s) for s in self.latents_std):
                raise AutoencoderError(f"latents_std must be positive, got {list(self.latents_std)}")
        if self.scale_factor is not None and not (self.scale_factor > 0 and math.isfinite(self.scale_factor)):
            raise AutoencoderError(f"scale_factor must be a positive number, got {self.scale_factor!r}")
        p = self.stats_patch_size
        if isinstance(p, bool) or not isinstance(p, int) or p < 1:
            raise AutoencoderError(f"stats_patch_size must be a positive integer, got {p!r}")
        if p > 1 and (self.latents_mean is None or len(self.latents_mean) % (p * p)):
            raise AutoencoderError(
                f"stats_patch_size={p} needs per-channel statistics with a multiple of {p * p} values "
                f"(channels x {p}x{p}), got {None if self.latents_mean is None else len(self.latents_mean)}"
            )

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def sd_vae(cls, source: str = SD_VAE_EMA) -> AutoencoderSpec:
        """The SD VAE (ft-EMA by default) with its scalar scaling 0.18215."""
        return cls(kind="kl", source=source, scale_factor=SD_VAE_SCALE, shift_factor=0.0)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> AutoencoderSpec:
        """Inverse of :meth:`to_dict`; ``None`` or ``{}`` is the identity."""
        if not d:
            return cls()
        known = {"kind", "source", "scale_factor", "shift_factor", "latents_mean", "latents_std", "stats_patch_size"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise AutoencoderError(f"autoencoder spec has unknown keys {unknown} (known: {sorted(known)})")
        return cls(**{k: d[k] for k in known if k in d})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (tuples as lists); ``stats_patch_size`` only when not 1, so
        the dicts of every other spec are what they always were."""
        d = {
            "kind": self.kind,
            "source": self.source,
            "scale_factor": self.scale_factor,
            "shift_factor": self.shift_factor,
            "latents_mean": list(self.latents_mean) if self.latents_mean is not None else None,
            "latents_std": list(self.latents_std) if self.latents_std is not None else None,
        }
        if self.stats_patch_size != 1:
            d["stats_patch_size"] = self.stats_patch_size
        return d

    def with_overrides(self, **changes: Any) -> AutoencoderSpec:
        """A copy with the given fields replaced; ``None`` values leave a field unchanged, and
        setting per-channel statistics or a scalar shift clears the other form (new statistics are
        per channel, ``stats_patch_size = 1``, unless it is given too)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if "latents_mean" in changes or "latents_std" in changes:
            changes.setdefault("shift_factor", 0.0)
            changes.setdefault("stats_patch_size", 1)
        elif "shift_factor" in changes:
            changes.update(latents_mean=None, latents_std=None, stats_patch_size=1)
        return replace(self, **changes)

    # ---- scaling ------------------------------------------------------------------------------

    @property
    def per_channel(self) -> bool:
        return self.latents_mean is not None

    @property
    def resolved(self) -> bool:
        """Whether the scaling is fully known (no ``None`` left to fill from the VAE config)."""
        return self.kind == "identity" or self.scale_factor is not None

    def _affine(self, z: Tensor) -> tuple[Tensor | float, Tensor | float]:
        """``(shift, multiplier)`` broadcastable to ``z`` of shape ``(..., C, h, w)``."""
        if self.kind == "identity" and self.scale_factor is None and not self.per_channel:
            return 0.0, 1.0
        if self.scale_factor is None:
            raise AutoencoderError(f"the scaling of {self.source!r} is not resolved yet; load the autoencoder first")
        if self.per_channel:
            c, p = z.shape[-3], self.stats_patch_size
            if c * p * p != len(self.latents_mean):
                raise AutoencoderError(
                    f"latents have {c} channels but the per-channel scaling has {len(self.latents_mean)} values"
                    + (f" ({p}x{p} per channel)" if p > 1 else "")
                )
            mean = torch.tensor(self.latents_mean, dtype=z.dtype, device=z.device).view(c, p, p)
            std = torch.tensor(self.latents_std, dtype=z.dtype, device=z.device).view(c, p, p)
            if p > 1:  # statistics per (channel, dy, dx): tile them over the latent grid
                h, w = z.shape[-2:]
                if h % p or w % p:
                    raise AutoencoderError(
                        f"latents of {h}x{w} do not divide into the {p}x{p} patches of the scaling statistics"
                    )
                mean, std = mean.repeat(1, h // p, w // p), std.repeat(1, h // p, w // p)
            return mean, self.scale_factor / std
        return float(self.shift_factor or 0.0), float(self.scale_factor)

    def scale(self, z: Tensor) -> Tensor:
        """Unscaled latents ``(..., C, h, w)`` -> the model's space: ``(z - shift) * multiplier``."""
        shift, mult = self._affine(z)
        return (z - shift) * mult

    def unscale(self, z: Tensor) -> Tensor:
        """Inverse of :meth:`scale`: the model's latents -> the autoencoder's decoder input."""
        shift, mult = self._affine(z)
        return z / mult + shift


# --------------------------------------------------------------------------------------------
# the interface and its implementations
# --------------------------------------------------------------------------------------------


class Autoencoder(nn.Module):
    """Images <-> scaled latents, with the posterior exposed for training.

    Subclasses implement :meth:`encode_posterior` and :meth:`_decode_unscaled`; everything else
    (scaling, sampling the posterior, chunked decoding) is shared.

    Attributes:
        spec: the resolved :class:`AutoencoderSpec`.
        latent_channels: ``c``; downsample: spatial factor ``f`` (latent side = image side / f).
    """

    spec: AutoencoderSpec
    latent_channels: int
    downsample: int

    def encode_posterior(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, 3, H, W)`` in [-1, 1] -> unscaled posterior ``(mean, std)``, each ``(B, c, H/f, W/f)``."""
        raise NotImplementedError

    def _decode_unscaled(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        p = next(self.parameters(), None)
        return p.dtype if p is not None else torch.float32

    def scale(self, z: Tensor) -> Tensor:
        """Unscaled -> scaled latents (see :meth:`AutoencoderSpec.scale`)."""
        return self.spec.scale(z)

    def unscale(self, z: Tensor) -> Tensor:
        """Scaled -> unscaled latents."""
        return self.spec.unscale(z)

    def latent_size(self, image_size: int) -> int:
        """Latent side for an image side (``256 -> 32`` for the SD VAE)."""
        if image_size % self.downsample:
            raise AutoencoderError(
                f"image size {image_size} is not a multiple of the autoencoder's downsampling factor {self.downsample}"
            )
        return image_size // self.downsample

    @torch.no_grad()
    def encode(self, images: Tensor, generator: torch.Generator | None = None, sample: bool = True) -> Tensor:
        """Images -> *scaled* latents ``(B, c, h, w)``: a posterior sample (``sample=True``, noise
        from ``generator``) or the posterior mean."""
        mean, std = self.encode_posterior(images)
        z = mean
        if sample:
            eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + std * eps
        return self.scale(z)

    @torch.no_grad()
    def decode(self, latents: Tensor, batch_size: int = 16) -> Tensor:
        """*Scaled* latents ``(B, c, h, w)`` (any device/dtype) -> images ``(B, 3, h*f, w*f)``
        float32 in ``[-1, 1]`` (clamped), on the latents' device; decoded ``batch_size`` at a time."""
        if latents.dim() != 4 or latents.shape[1] != self.latent_channels:
            raise AutoencoderError(f"latents must be (B, {self.latent_channels}, h, w), got {tuple(latents.shape)}")
        out = []
        for chunk in latents.split(max(1, int(batch_size))):
            z = self.unscale(chunk.to(self.device, torch.float32))
            x = self._decode_unscaled(z.to(self.dtype))
            out.append(x.float().clamp(-1, 1).to(latents.device))
        return torch.cat(out) if out else latents.new_zeros(0, 3, *(s * self.downsample for s in latents.shape[-2:]))

    def forward(self, latents: Tensor) -> Tensor:  # decode, so the module can be used as ``decode``
        return self.decode(latents)


class IdentityAutoencoder(Autoencoder):
    """Pixel space: the "latent" is the image itself, with zero posterior std.

    Args:
        channels: image channels (3).
        spec: an identity spec (a scalar scaling may be given, e.g. to whiten pixels).
    """

    def __init__(self, channels: int = 3, spec: AutoencoderSpec | None = None):
        super().__init__()
        self.spec = spec or AutoencoderSpec()
        if self.spec.kind != "identity":
            raise AutoencoderError(f"IdentityAutoencoder needs an identity spec, got kind {self.spec.kind!r}")
        self.latent_channels = int(channels)
        self.downsample = 1

    def encode_posterior(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return images, torch.zeros_like(images)

    def _decode_unscaled(self, z: Tensor) -> Tensor:
        return z


class DiffusersAutoencoder(Autoencoder):
    """A diffusers ``AutoencoderKL`` / ``AutoencoderKLFlux2`` (posterior mean/std) or
    ``AutoencoderTiny`` (std 0).

    Args:
        vae: the diffusers model (moved/cast by the caller; put in eval mode here).
        spec: a *resolved* spec (see :func:`load_autoencoder`).
    """

    def __init__(self, vae: nn.Module, spec: AutoencoderSpec):
        super().__init__()
        if spec.kind not in _DIFFUSERS_CLASS:
            kinds = ", ".join(_DIFFUSERS_CLASS)
            raise AutoencoderError(f"DiffusersAutoencoder handles kinds {kinds}, got {spec.kind!r}")
        if not spec.resolved:
            raise AutoencoderError("DiffusersAutoencoder needs a resolved spec (scale_factor set)")
        self.vae = vae.eval().requires_grad_(False)
        self.spec = spec
        cfg = vae.config
        self.latent_channels = int(cfg.latent_channels)
        blocks = cfg.block_out_channels if spec.kind in _POSTERIOR_KINDS else cfg.encoder_block_out_channels
        self.downsample = 2 ** (len(blocks) - 1)

    @torch.no_grad()
    def encode_posterior(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = images.to(self.device, self.dtype)
        if self.spec.kind in _POSTERIOR_KINDS:
            dist = self.vae.encode(x).latent_dist
            return dist.mean.float(), dist.std.float()
        z = self.vae.encode(x).latents.float()
        return z, torch.zeros_like(z)

    def _decode_unscaled(self, z: Tensor) -> Tensor:
        return self.vae.decode(z).sample


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def _local_model_dir(source: str) -> tuple[Path, str | None] | None:
    """``(directory, subfolder)`` when ``source`` is a local diffusers model folder (the VAE's own
    folder, or a pipeline folder with a ``vae/`` sub-folder); ``None`` when it is not local."""
    path = Path(source).expanduser()
    if not path.is_dir():
        return None
    if (path / "config.json").is_file():
        return path, None
    if (path / "vae" / "config.json").is_file():
        return path, "vae"
    raise AutoencoderError(
        f"{str(path)!r} is a directory without a diffusers config.json (nor vae/config.json); "
        "expected the folder written by `hf download <vae repo> --local-dir DIR` or save_pretrained"
    )


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _looks_local(source: str) -> bool:
    """Whether ``source`` is meant as a local path, never a hub id: anything but ``owner/name``,
    and whatever :func:`~patchforcing.utils.io.looks_local` calls local (a file extension, a
    leading ``.``, ``/`` or ``~``)."""
    return _HUB_ID.match(source) is None or source.endswith((".", "/")) or looks_local(source)


def _missing_message(source: str, why: str) -> str:
    repo = source if not _looks_local(source) else SD_VAE_EMA
    return (
        f"cannot load the VAE {source!r}: {why}. Download it once with\n"
        f"    hf download {repo} --local-dir DIR    (older huggingface_hub: huggingface-cli download "
        f"{repo} --local-dir DIR)\n"
        f"and pass --vae DIR (patchforcing encode) or autoencoder.source=DIR (patchforcing train)"
    )


def detect_kind(source: str) -> str:
    """``"kl"``, ``"tiny"`` or ``"flux2"`` from a local model folder's ``config.json`` (``_class_name``);
    for a hub id ``"flux2"`` when it names FLUX.2, ``"tiny"`` for TAESD, else ``"kl"`` (the SD VAE family)."""
    local = _local_model_dir(source)
    if local is None:
        if "taesd" in source.lower():
            return "tiny"
        if re.search(r"flux\.?2", source.lower()):
            return "flux2"
        return "kl"
    path, sub = local
    cfg_path = path / (sub or "") / "config.json"
    try:
        cls_name = json.loads(cfg_path.read_text()).get("_class_name")
    except (OSError, ValueError) as err:
        raise AutoencoderError(f"cannot read {cfg_path}: {err}") from None
    if cls_name not in _KIND_OF_CLASS:
        raise AutoencoderError(f"{cfg_path} describes a {cls_name!r}; supported: {', '.join(_KIND_OF_CLASS)}")
    return _KIND_OF_CLASS[cls_name]


def _import_diffusers():
    try:
        import diffusers
    except ImportError:
        raise AutoencoderError(
            "the VAE needs diffusers: pip install 'patchforcing[vae]' (or pip install diffusers)"
        ) from None
    return diffusers


def _flux2_bn_stats(vae: nn.Module) -> dict[str, Any]:
    """The FLUX.2 VAE's latent statistics: its batch norm's running mean and
    ``sqrt(running_var + eps)`` over the ``C * p * p`` channels of 2x2-patchified latents."""
    bn = vae.bn
    p = tuple(vae.config.patch_size)
    if len(p) != 2 or p[0] != p[1]:
        raise AutoencoderError(f"FLUX.2 VAE with a non-square patch size {p} is not supported")
    std = torch.sqrt(bn.running_var.double() + float(vae.config.batch_norm_eps))
    return {
        "latents_mean": tuple(bn.running_mean.double().tolist()),
        "latents_std": tuple(std.tolist()),
        "stats_patch_size": int(p[0]),
    }


def load_autoencoder(
    spec: AutoencoderSpec | Mapping[str, Any] | str,
    *,
    kind: str = "auto",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    channels: int = 3,
) -> Autoencoder:
    """Load an autoencoder and resolve its scaling.

    Args:
        spec: an :class:`AutoencoderSpec` (or its dict), or just a source: a hub id such as
            ``"stabilityai/sd-vae-ft-ema"`` or a local directory (a diffusers VAE folder, or a
            pipeline folder with ``vae/``). Offline (``HF_HUB_OFFLINE=1``) or for a local path
            nothing is downloaded (``local_files_only``); a hub id is otherwise fetched once
            into the Hugging Face cache.
        kind: for a plain source: ``"auto"`` (from the folder's config.json), ``"kl"``, ``"tiny"``, ``"flux2"``.
        device, dtype: where the VAE runs (fp32 default; the SD VAE is not reliable in fp16).
        channels: image channels of the identity autoencoder.

    Returns:
        an :class:`Autoencoder` in eval mode whose ``spec`` is resolved: ``scale_factor`` and
        ``shift_factor`` left ``None`` take the VAE config's ``scaling_factor``/``shift_factor``
        (0.18215 / 0 for the SD VAE; per-channel ``latents_mean``/``latents_std`` of the config
        are used when the config has them and the spec does not say otherwise). FLUX.2
        (``"flux2"``): scale 1 and the VAE's batch-norm statistics ``running_mean`` and
        ``sqrt(running_var + batch_norm_eps)`` per channel and 2x2 patch position
        (``stats_patch_size = 2``), exactly the FLUX.2 pipeline's latent normalisation.

    Raises:
        AutoencoderError: missing weights (the message names the ``hf download`` command and
            where to pass the folder), no diffusers, unknown kind.
    """
    if isinstance(spec, str):
        k = detect_kind(spec) if kind == "auto" else kind
        spec = AutoencoderSpec(kind=k, source=spec)
    elif not isinstance(spec, AutoencoderSpec):
        spec = AutoencoderSpec.from_dict(spec)
    if spec.kind == "identity":
        return IdentityAutoencoder(channels, spec)

    source = str(spec.source)
    local = _local_model_dir(source)
    if local is None and _looks_local(source):
        raise AutoencoderError(_missing_message(source, "no such directory"))
    diffusers = _import_diffusers()
    cls = getattr(diffusers, _DIFFUSERS_CLASS[spec.kind])
    kwargs: dict[str, Any] = {"low_cpu_mem_usage": False, "torch_dtype": dtype}
    unreachable: str | None = None
    if local is not None:
        target, sub = str(local[0]), local[1]
        kwargs["local_files_only"] = True
    else:
        target, sub = source, None
        kwargs["local_files_only"] = is_offline()
        if not kwargs["local_files_only"]:
            try:  # one quick request instead of diffusers' retries on a machine without network
                probe_hub_file(source, "config.json")
            except HubError as err:  # the cache may still have it: load from there, or say why not
                kwargs["local_files_only"] = True
                unreachable = f"not a local directory; tried hub repo {source!r}: {err}"
    if sub:
        kwargs["subfolder"] = sub
    try:
        with warnings.catch_warnings():  # diffusers passes deprecated hub arguments: not the user's concern
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
            vae = cls.from_pretrained(target, **kwargs)
    except (OSError, ValueError) as err:
        if unreachable is not None:
            why = unreachable
        elif kwargs["local_files_only"] and local is None:
            why = "offline and not in the Hugging Face cache"
        else:
            why = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        raise AutoencoderError(_missing_message(source, why)) from None
    except Exception as err:  # network errors of huggingface_hub/requests/httpx: report plainly
        raise AutoencoderError(_missing_message(source, f"{type(err).__name__}: {err}")) from None
    if type(vae).__name__ != cls.__name__:
        raise AutoencoderError(f"{source!r} holds a {type(vae).__name__}, not a {cls.__name__} (kind {spec.kind!r})")

    cfg = vae.config
    resolved = spec
    if spec.scale_factor is None:
        resolved = replace(resolved, scale_factor=float(getattr(cfg, "scaling_factor", 1.0) or 1.0))
    cfg_mean, cfg_std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if spec.kind == "flux2" and spec.shift_factor is None and not spec.per_channel:
        resolved = replace(resolved, shift_factor=0.0, **_flux2_bn_stats(vae))
    elif spec.shift_factor is None and not spec.per_channel:
        if cfg_mean is not None and cfg_std is not None:
            resolved = replace(resolved, shift_factor=0.0, latents_mean=tuple(cfg_mean), latents_std=tuple(cfg_std))
        else:
            resolved = replace(resolved, shift_factor=float(getattr(cfg, "shift_factor", 0.0) or 0.0))
    p = resolved.stats_patch_size
    if resolved.per_channel and len(resolved.latents_mean) != int(cfg.latent_channels) * p * p:
        each = f" ({p}x{p} values each)" if p > 1 else ""
        raise AutoencoderError(
            f"per-channel scaling has {len(resolved.latents_mean)} values but {source!r} "
            f"has {cfg.latent_channels} latent channels{each}"
        )
    return DiffusersAutoencoder(vae.to(device=device), resolved)


# --------------------------------------------------------------------------------------------
# checkpoints -> the autoencoder they decode with
# --------------------------------------------------------------------------------------------


def autoencoder_spec_from_checkpoint(source: str | os.PathLike) -> AutoencoderSpec | None:
    """The autoencoder a checkpoint was trained with, or ``None`` when it does not say.

    Understands exported ``.safetensors`` files (metadata ``extra["autoencoder"]``), run
    directories, directories with ``model.safetensors`` and training checkpoints (key
    ``"autoencoder"``); in these, no recorded autoencoder means pixel space (the identity spec).
    The authors' released ``.ckpt`` files do not say (``None``): they were trained on SD-VAE
    latents, see :func:`load_autoencoder_for`.
    """
    path = Path(source)
    if path.is_dir():
        path = find_checkpoint(path)
    if path.suffix == ".safetensors":  # ours (exported)
        return AutoencoderSpec.from_dict(read_safetensors_metadata(path).get("autoencoder"))
    obj = safe_torch_load(path)
    if isinstance(obj, Mapping) and obj.get("format") == TRAIN_FORMAT:  # ours (training)
        return AutoencoderSpec.from_dict(obj.get("autoencoder"))
    return None


def load_autoencoder_for(
    checkpoint: str | os.PathLike | None = None,
    vae: str | None = None,
    *,
    model: nn.Module | None = None,
    device: torch.device | str = "cpu",
) -> Autoencoder:
    """The autoencoder that turns a checkpoint's samples into images.

    Args:
        checkpoint: an exported ``.safetensors``, run directory, training checkpoint or the
            authors' released ``.ckpt`` (which stores no autoencoder: the SD VAE with scale
            0.18215 is assumed for a 4-channel model).
        vae: where the VAE weights are (hub id or local directory); replaces the stored source
            (e.g. a local copy of ``stabilityai/sd-vae-ft-ema`` on an offline machine).
        model: the loaded model, to check that its channels fit the autoencoder.
        device: where the autoencoder runs.
    """
    spec = autoencoder_spec_from_checkpoint(checkpoint) if checkpoint is not None else None
    in_channels = getattr(model, "in_channels", None)
    if spec is None:
        if in_channels is not None and in_channels != 4:
            spec = AutoencoderSpec()
        else:  # the released PFT/SiT checkpoints: SD-VAE latents, scale 0.18215 (docs/method.md section 6)
            spec = AutoencoderSpec.sd_vae(vae or SD_VAE_EMA)
    if vae is not None:
        if spec.kind == "identity":
            raise AutoencoderError(f"{checkpoint} is a pixel-space model; it needs no VAE (got vae={vae!r})")
        spec = replace(spec, source=vae)
    ae = load_autoencoder(spec, device=device, channels=in_channels or 3)
    if in_channels is not None and in_channels != ae.latent_channels:
        raise AutoencoderError(
            f"the model has {in_channels} input channels but the autoencoder "
            f"{spec.source or 'identity'} has {ae.latent_channels}"
        )
    return ae


def decode_to_images(
    latents: Tensor,
    autoencoder: Autoencoder | AutoencoderSpec | Mapping[str, Any] | str | os.PathLike,
    batch_size: int = 16,
) -> Tensor:
    """Samples (e.g. ``pf.sample(...).x``, scaled latents ``(B, c, h, w)``) -> images
    ``(B, 3, H, W)`` in ``[-1, 1]``.

    ``autoencoder``: a loaded :class:`Autoencoder`, a spec (or its dict, e.g. an exported
    model's ``extra["autoencoder"]``), or a checkpoint path whose stored spec is used.
    """
    if isinstance(autoencoder, Autoencoder):
        ae = autoencoder
    elif isinstance(autoencoder, (AutoencoderSpec, Mapping)):
        ae = load_autoencoder(autoencoder, device=latents.device, channels=latents.shape[1])
    else:
        ae = load_autoencoder_for(autoencoder, device=latents.device)
    return ae.decode(latents, batch_size=batch_size)
