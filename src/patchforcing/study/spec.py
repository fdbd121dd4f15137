"""What a study compares: arms (model family x training timestep sampler), seeds, samplers, NFE.

An *arm* is a training recipe that differs from the study's base config **only** in the model
family (PFT or SiT, same size and patch) and the per-patch timestep sampler of the objective
(with what those imply: SiT has no uncertainty head, so its uncertainty weight is 0).
:func:`arm_config` builds the config of one (arm, seed) and :func:`check_fair` refuses a set of
configs that differ in anything else (data and its order, batch, steps, optimiser, EMA, precision,
backbone size ...). Arm names:

==================  =======  ======================  =============================================
name                family   timestep sampler        what it is
==================  =======  ======================  =============================================
``sit``             SiT      ``uniform``             the baseline: one t per image
``pft``             PFT      ``ltg``                 Patch Forcing (LTG, the paper's default)
``pft-srm``         PFT      ``srm``                 Spatial Reasoning Models' mean-controlled sampler
``pft-truncnorm``   PFT      ``truncated_gaussian``  plain truncated Gaussian (max ~ U(0, 1))
``pft-gaussian``    PFT      ``gaussian``            Gaussian around a U(0, 1) mean
``pft-uniform``     PFT      ``per_patch_uniform``   naive diffusion forcing (t_i ~ U(0, 1))
==================  =======  ======================  =============================================

and generally ``pft-<timestep sampler>`` / ``sit-<sampler>`` (``-`` or ``_``; SiT arms take only
one-time-per-image samplers: ``uniform``, ``logit_normal``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..flow.timesteps import TIMESTEP_SAMPLERS
from ..models.registry import FAMILIES, parse_model_name
from ..sampling import SAMPLERS, SAMPLING_PRECISIONS, make_sampler
from ..sampling.cache import SELECTIONS, TokenCache
from ..training.config import ExperimentConfig, ObjectiveSection, apply_overrides, config_to_dict

__all__ = [
    "StudyError",
    "Arm",
    "CacheVariant",
    "StudySpec",
    "parse_arm",
    "parse_arms",
    "parse_int_list",
    "parse_float_list",
    "parse_name_list",
    "arm_config",
    "check_fair",
    "run_id",
    "ARM_ALIASES",
    "PER_IMAGE_TIMESTEP_SAMPLERS",
    "FAIRNESS_FREE_KEYS",
    "CACHE_SAMPLERS",
    "CACHE_REFRESH",
]


class StudyError(ValueError):
    """A study that cannot run as asked (bad arm, sampler, NFE list, unfair configs, ...)."""


#: short names of timestep samplers in arm names
ARM_ALIASES: dict[str, str] = {
    "truncnorm": "truncated_gaussian",
    "truncgauss": "truncated_gaussian",
    "uniform": "per_patch_uniform",  # for PFT arms: per-patch uniform (SiT's `uniform` is its default)
    "lognorm": "logit_normal",
}
#: timestep samplers that draw one time per image (the only ones a SiT can be trained with)
PER_IMAGE_TIMESTEP_SAMPLERS: tuple[str, ...] = ("uniform", "logit_normal")
#: config keys in which the arms (and seeds) of a study may differ; everything else must be equal
FAIRNESS_FREE_KEYS: tuple[str, ...] = (
    "name",
    "model.name",  # the family only: size and patch are checked separately
    "objective.timestep_sampler",
    "objective.timestep_options",
    "objective.uncertainty_weight",
    "sample.sampler",
    "sample.options",
    "train.seed",
)
#: the samplers ``cache_samplers`` defaults to (those of them the study samples)
CACHE_SAMPLERS: tuple[str, ...] = ("euler_pf", "look_ahead")
#: default refresh period of the cached variants (as ``patchforcing sample --cache-refresh``)
CACHE_REFRESH = 4


@dataclass(frozen=True)
class Arm:
    """One training recipe of a study: ``family`` (``"PFT"`` / ``"SiT"``) and the objective's
    ``timestep_sampler``; ``name`` is how the study refers to it (``"pft-srm"``)."""

    name: str
    family: str
    timestep_sampler: str

    @property
    def is_pft(self) -> bool:
        return FAMILIES[self.family][1]  # has an uncertainty head (and per-patch times)


def parse_arm(name: str) -> Arm:
    """``"sit"``, ``"pft"``, ``"pft-srm"``, ``"pft-truncated_gaussian"``, ... -> :class:`Arm`."""
    text = str(name).strip().lower()
    if not text:
        raise StudyError("empty arm name")
    family_text, _, rest = text.partition("-")
    family = next((f for f in FAMILIES if f.lower() == family_text), None)
    if family is None:
        raise StudyError(f"arm {name!r}: the name must start with one of {[f.lower() for f in FAMILIES]}")
    is_pft = FAMILIES[family][1]
    if not rest:
        sampler = "ltg" if is_pft else "uniform"
    else:
        key = rest.replace("-", "_")
        if not is_pft and key == "uniform":
            sampler = "uniform"
        else:
            sampler = ARM_ALIASES.get(key, key)
    if sampler not in TIMESTEP_SAMPLERS:
        raise StudyError(
            f"arm {name!r}: unknown timestep sampler {rest!r}; known: {', '.join(TIMESTEP_SAMPLERS)} "
            f"(aliases: {', '.join(f'{k}={v}' for k, v in ARM_ALIASES.items())})"
        )
    if not is_pft and sampler not in PER_IMAGE_TIMESTEP_SAMPLERS:
        raise StudyError(
            f"arm {name!r}: a SiT takes one time per image; its timestep sampler must be one of "
            f"{list(PER_IMAGE_TIMESTEP_SAMPLERS)}, not {sampler!r}"
        )
    return Arm(name=text, family=family, timestep_sampler=sampler)


def parse_name_list(text: str | Sequence[str], what: str) -> list[str]:
    """``"a,b,c"`` (or a list) -> ``["a", "b", "c"]``; empty items or duplicates are refused."""
    items = text.split(",") if isinstance(text, str) else list(text)
    names = [str(s).strip() for s in items]
    if not names or any(not n for n in names):
        raise StudyError(f"{what} {text!r}: give a comma-separated list without empty items")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise StudyError(f"{what} {text!r}: listed twice: {', '.join(dup)}")
    return names


def parse_arms(text: str | Sequence[str]) -> list[Arm]:
    """``"sit,pft,pft-srm"`` -> arms (each name once; two names for the same recipe are refused)."""
    arms = [parse_arm(n) for n in parse_name_list(text, "--arms")]
    seen: dict[tuple[str, str], str] = {}
    for a in arms:
        key = (a.family, a.timestep_sampler)
        if key in seen:
            raise StudyError(f"--arms: {seen[key]!r} and {a.name!r} are the same recipe")
        seen[key] = a.name
    return arms


def _parse_numbers(text: str | Sequence[Any], what: str, kind: type, example: str) -> list[Any]:
    """The comma-separated ``kind`` values of ``text`` (a string or a sequence), in the order given."""
    names = parse_name_list(text if isinstance(text, str) else [str(v) for v in text], what)
    try:
        return [kind(v) for v in names]
    except ValueError:
        noun = "positive integers" if kind is int else "numbers"
        raise StudyError(f"{what} {text!r}: give comma-separated {noun}, e.g. {example}") from None


def parse_int_list(text: str | Sequence[int], what: str) -> list[int]:
    """``"10,20,40"`` -> ``[10, 20, 40]`` (positive, distinct, kept in increasing order)."""
    values = _parse_numbers(text, what, int, "10,20,40")
    if any(v < 1 for v in values):
        raise StudyError(f"{what} {text!r}: every value must be >= 1")
    return sorted(values)


def parse_float_list(text: str | Sequence[float], what: str) -> list[float]:
    """``"0.5,0.25"`` -> ``[0.5, 0.25]`` (numbers, in the order given; ranges are checked by the user)."""
    return _parse_numbers(text, what, float, "0.5,0.25")


@dataclass(frozen=True)
class CacheVariant:
    """A token-cached version of a PFT sampler: ``sampler`` with
    ``TokenCache(active, refresh_every, select)``.

    ``name`` is the study's (and the sample files') name of the variant:
    ``<sampler>+cache<active>`` for the uncertainty selection, ``<sampler>+cache<active>-random``
    for the random control (``euler_pf+cache0.5``, ``look_ahead+cache0.25-random``); ``active`` is
    written with ``%g`` (``1.0`` -> ``cache1``). The refresh period is the study's, one for all
    variants, and is not part of the name."""

    sampler: str
    active: float
    select: str
    refresh_every: int = CACHE_REFRESH

    @property
    def name(self) -> str:
        return f"{self.sampler}+cache{self.active:g}" + ("" if self.select == "uncertainty" else f"-{self.select}")

    def token_cache(self, seed: int) -> TokenCache:
        """The :class:`~patchforcing.sampling.cache.TokenCache` of the variant (``seed``: of the random choice)."""
        return TokenCache(active=self.active, refresh_every=self.refresh_every, select=self.select, seed=int(seed))


def run_id(arm: Arm, seed: int) -> str:
    """The name of an (arm, seed) run directory: ``"pft-srm-s0"``."""
    return f"{arm.name}-s{seed}"


@dataclass
class StudySpec:
    """A study: which arms to train (each with ``seeds`` training seeds), which samplers to run
    on the PFT arms (SiT arms use ``euler``), at which NFE budgets, and how to evaluate.

    Attributes:
        arms: the recipes (:func:`parse_arms`); the first SiT arm (else the first arm) is the
            baseline of the arm comparisons.
        seeds: number of training seeds; run ``j`` uses ``train.seed = base seed + j``.
        nfe: NFE budgets per image; every sampler gets the largest step count that fits.
        samplers: samplers of the PFT arms; the first of ``euler_pf`` / ``euler`` / the first listed
            is the baseline of the sampler comparisons.
        sampler_options: per sampler name, its options (e.g. ``{"look_ahead": {"quantile": 0.4}}``).
        num_samples: samples per (run, sampler, NFE); sample ``i`` has the same noise and label in
            every run, sampler and NFE (its noise from ``(sample_seed, i)``).
        sample_seed: the seed of the shared noise.
        batch_size: sampling batch (memory only: results do not depend on it).
        features: ``"classifier"`` (train a small classifier on the training split, offline),
            ``"classifier:PATH"`` (an existing one) or ``"inception"`` (needs torch-fidelity).
        inception_weights: a local Inception weights file for ``features="inception"``.
        classifier_epochs, classifier_width: the classifier trained for ``"classifier"``.
        bootstrap: bootstrap replicates of every interval; confidence: their level.
        k: neighbourhood size of precision/recall.
        grid_size: samples per picture in the sample grids.
        cache_active: token caching: the shares of tokens a cached call recomputes, each in
            ``(0, 1]``; empty (default): no cached variants, the study as without caching.
        cache_refresh: a full call every this many calls in every cached variant (default 4).
        cache_select: the selections of the cached variants: ``"uncertainty"`` (the difficulty
            head) and/or ``"random"`` (the control).
        cache_samplers: the samplers given cached variants; ``None`` (default): those of
            :attr:`samplers` among ``euler_pf`` and ``look_ahead``. Each (sampler, active, select)
            is a :class:`CacheVariant`, sampled on the PFT arms only (SiT arms stay dense ``euler``)
            from the same noise and labels as the dense cells.
        sample_precision: the network's precision in every cell, ``"fp32"`` (default) or ``"bf16"``
            (autocast, :func:`~patchforcing.sample`; ~2x faster sampling on a CPU with AVX-512 BF16,
            with FDs equal to fp32's within their intervals, ``benchmarks/RESULTS.md``).
    """

    arms: list[Arm]
    seeds: int = 1
    nfe: list[int] = field(default_factory=lambda: [20])
    samplers: list[str] = field(default_factory=lambda: ["euler_pf", "dual_loop", "look_ahead", "random_context"])
    sampler_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    num_samples: int = 1000
    sample_seed: int = 0
    batch_size: int = 64
    features: str = "classifier"
    inception_weights: str | None = None
    classifier_epochs: int = 10
    classifier_width: int = 32
    bootstrap: int = 1000
    confidence: float = 0.95
    k: int = 3
    grid_size: int = 16
    cache_active: list[float] = field(default_factory=list)
    cache_refresh: int = CACHE_REFRESH
    cache_select: list[str] = field(default_factory=lambda: ["uncertainty"])
    cache_samplers: list[str] | None = None
    sample_precision: str = "fp32"

    def __post_init__(self) -> None:
        if not self.arms:
            raise StudyError("a study needs at least one arm")
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise StudyError(f"arms listed twice: {names}")
        for what in ("seeds", "num_samples", "batch_size", "bootstrap", "classifier_epochs", "k", "grid_size"):
            v = getattr(self, what)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise StudyError(f"{what} must be a positive integer, got {v!r}")
        if self.num_samples <= self.k:
            raise StudyError(f"num_samples ({self.num_samples}) must exceed k ({self.k}) for precision/recall")
        if not 0.5 <= float(self.confidence) < 1.0:
            raise StudyError(f"confidence must lie in [0.5, 1), got {self.confidence!r}")
        if not self.nfe or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.nfe):
            raise StudyError(f"nfe must be a non-empty list of positive integers, got {self.nfe!r}")
        self.nfe = sorted(set(self.nfe))
        if not self.samplers:
            raise StudyError("a study needs at least one sampler")
        for s in self.samplers:
            if s not in SAMPLERS:
                raise StudyError(f"unknown sampler {s!r}; available: {', '.join(SAMPLERS)}")
        unknown = sorted(set(self.sampler_options) - set(SAMPLERS))
        if unknown:
            raise StudyError(f"options for unknown sampler(s) {unknown}")
        for s in self.samplers_of_any():
            try:
                make_sampler(s, **self.options_of(s))
            except ValueError as e:
                raise StudyError(f"sampler {s!r}: {e}") from None
        f = str(self.features).strip()
        if not (f == "classifier" or f == "inception" or (f.startswith("classifier:") and len(f) > len("classifier:"))):
            raise StudyError(f"features must be 'classifier', 'classifier:PATH' or 'inception', got {self.features!r}")
        self._check_cache()
        if self.sample_precision not in SAMPLING_PRECISIONS:
            raise StudyError(
                f"sample_precision (--sample-precision) must be one of {', '.join(SAMPLING_PRECISIONS)}, "
                f"got {self.sample_precision!r}"
            )

    def _check_cache(self) -> None:
        self.cache_active = list(self.cache_active)
        for a in self.cache_active:
            if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 < float(a) <= 1.0:
                raise StudyError(
                    f"cache_active (--cache-active): {a!r} is not a share of tokens; every share must be a number in (0, 1]"
                )
        self.cache_active = [float(a) for a in self.cache_active]
        r = self.cache_refresh
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise StudyError(f"cache_refresh (--cache-refresh) must be a positive integer, got {r!r}")
        self.cache_select = list(self.cache_select)
        if not self.cache_select:
            raise StudyError("cache_select (--cache-select) needs at least one selection (uncertainty, random)")
        for sel in self.cache_select:
            if sel not in SELECTIONS:
                raise StudyError(
                    f"cache_select (--cache-select): unknown selection {sel!r}; choose from {', '.join(SELECTIONS)}"
                )
        if not self.cache_active:
            if self.cache_samplers:
                raise StudyError("cache_samplers needs cache_active (the shares of tokens recomputed)")
            return
        if self.cache_samplers is None:
            self.cache_samplers = [s for s in self.samplers if s in CACHE_SAMPLERS]
            if not self.cache_samplers:
                raise StudyError(
                    f"token caching: none of {', '.join(CACHE_SAMPLERS)} is among the samplers "
                    f"({', '.join(self.samplers)}); name the samplers to cache (--cache-samplers)"
                )
        self.cache_samplers = list(self.cache_samplers)
        if not self.cache_samplers:
            raise StudyError("cache_samplers is empty: name at least one sampler to cache")
        for s in self.cache_samplers:
            if s not in self.samplers:
                raise StudyError(
                    f"cache_samplers (--cache-samplers): {s!r} is not among the study's samplers ({', '.join(self.samplers)}); "
                    "a cached variant is compared with the dense sampler, so add it to --samplers"
                )
        names = [v.name for v in self.cache_variants()]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise StudyError(f"cached variants listed twice: {', '.join(dup)} (check the active shares)")

    # ---- derived ----------------------------------------------------------------------------

    @property
    def seed_offsets(self) -> list[int]:
        return list(range(self.seeds))

    def samplers_for(self, arm: Arm) -> list[str]:
        """The samplers an arm is sampled with: ``euler`` for a SiT, :attr:`samplers` for a PFT."""
        return list(self.samplers) if arm.is_pft else ["euler"]

    def cache_variants(self) -> list[CacheVariant]:
        """Every cached variant: per cache sampler, per active share, per selection (in that order)."""
        return [
            CacheVariant(s, a, sel, self.cache_refresh)
            for s in (self.cache_samplers or [])
            for a in self.cache_active
            for sel in self.cache_select
        ]

    def cache_variants_for(self, arm: Arm) -> list[CacheVariant]:
        """The cached variants an arm is sampled with: all for a PFT, none for a SiT."""
        return self.cache_variants() if arm.is_pft else []

    def samplers_of_any(self) -> list[str]:
        out: list[str] = []
        for arm in self.arms:
            out += [s for s in self.samplers_for(arm) if s not in out]
        return out

    def options_of(self, sampler: str) -> dict[str, Any]:
        """The options a sampler runs with (only those it takes; the rest keep their defaults)."""
        valid = {f.name for f in dataclasses.fields(SAMPLERS[sampler])}
        return {k: v for k, v in self.sampler_options.get(sampler, {}).items() if k in valid}

    @property
    def baseline_arm(self) -> Arm:
        return next((a for a in self.arms if not a.is_pft), self.arms[0])

    @property
    def baseline_sampler(self) -> str:
        return next((s for s in ("euler_pf", "euler") if s in self.samplers), self.samplers[0])

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["arms"] = [dataclasses.asdict(a) for a in self.arms]
        if not self.cache_active:  # a study without caching keeps the record it always had
            for k in ("cache_active", "cache_refresh", "cache_select", "cache_samplers"):
                d.pop(k)
        if self.sample_precision == "fp32":  # likewise for the default precision
            d.pop("sample_precision")
        return d


# --------------------------------------------------------------------------------------------
# configs of the arms, and the fairness check
# --------------------------------------------------------------------------------------------


def _model_name(base: str, family: str) -> str:
    parse_model_name(base)  # a valid preset name
    _, rest = base.split("-", 1)
    return f"{family}-{rest}"


def arm_config(base: ExperimentConfig, arm: Arm, seed_offset: int = 0) -> ExperimentConfig:
    """The config of one (arm, seed): ``base`` with the arm's model family and timestep sampler,
    ``train.seed = base.train.seed + seed_offset`` and the name ``<base name>-<arm>-s<seed>``.

    A PFT arm keeps the base's uncertainty weight when the base is a PFT config (else the default
    0.01); a SiT arm has none (0). The base's timestep options are kept only by the arm that uses
    the base's timestep sampler (other samplers take their defaults). Training-time sample grids use
    ``euler_pf`` (PFT) or ``euler`` (SiT)."""
    base_family = base.model.name.split("-", 1)[0]
    base_is_pft = FAMILIES.get(next((f for f in FAMILIES if f.lower() == base_family.lower()), ""), (False, False))[1]
    if arm.is_pft:
        weight = base.objective.uncertainty_weight if base_is_pft else ObjectiveSection().uncertainty_weight
        if weight <= 0:
            weight = ObjectiveSection().uncertainty_weight
        sampler = "euler_pf"
    else:
        weight, sampler = 0.0, "euler"
    same_sampler = arm.timestep_sampler == base.objective.timestep_sampler
    seed = base.train.seed + int(seed_offset)
    overrides = [
        f"name={base.name}-{arm.name}-s{seed}",
        f"model.name={_model_name(base.model.name, arm.family)}",
        f"objective.timestep_sampler={arm.timestep_sampler}",
        f"objective.uncertainty_weight={weight}",
        f"sample.sampler={sampler}",
        "sample.options={}",
        f"train.seed={seed}",
    ]
    if not same_sampler:
        overrides.append("objective.timestep_options={}")
    return apply_overrides(base, overrides)


def _flat(cfg: ExperimentConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in config_to_dict(cfg).items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            out[k] = v
    return out


def check_fair(configs: Iterable[ExperimentConfig]) -> None:
    """Refuse configs that differ in anything but the arm's recipe and the seed.

    Every config must have the same data (and data order: ``data.seed``), batch, steps, optimiser,
    EMA, loop and precision settings and the same backbone size and patch (``model.name`` minus the
    family; ``model.depth`` etc.). Raises :class:`StudyError` naming the keys that differ."""
    configs = list(configs)
    if len(configs) < 2:
        return
    flats = [_flat(c) for c in configs]
    ref = flats[0]
    problems = []
    for key in ref:
        if key in FAIRNESS_FREE_KEYS:
            continue
        values = {repr(f[key]) for f in flats}
        if len(values) > 1:
            problems.append(f"{key} ({', '.join(sorted(values))})")
    backbones = {c.model.name.split("-", 1)[1] for c in configs}
    if len(backbones) > 1:
        problems.append(f"backbone size/patch ({', '.join(sorted(backbones))})")
    if problems:
        raise StudyError("the arms are not comparable: they differ in " + "; ".join(problems))
