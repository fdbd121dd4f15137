"""The statistics of a study: one interval per table cell and the two kinds of differences.

Two sources of error are kept apart and, where both apply, combined in quadrature
(:func:`~patchforcing.analysis.stats.combined_interval`):

* *sampling noise* (which samples were drawn, which real images form the reference): the
  bootstrap, :func:`~patchforcing.analysis.stats.centered_interval` of the replicates (the
  expected FD at this sample count). Replicate ``r`` resamples the same sample indices in every
  cell (sample ``i`` has the same noise and label everywhere) and the same reference images, so
  the replicates of a difference are the differences of the replicates (a *paired* bootstrap);
  with several seeds the replicates are averaged over the seeds first.
* *training-seed spread* (another seed trains another model): a Student-t interval over the
  seeds (per-seed values, or per-seed differences paired by seed), from two seeds on.

* **Cell** (arm x sampler x NFE): the FD (mean over seeds) with the bootstrap interval, combined
  with the seed interval from two seeds on.
* **Sampler difference** (a PFT arm's sampler minus its baseline sampler, ``euler_pf``, at the
  same NFE): paired bootstrap (combined with the seed spread of the per-seed differences from two
  seeds on). Significant (mark †) when the interval excludes 0.
* **Arm difference** (an arm minus the baseline arm, ``sit`` with ``euler``, at the same NFE):
  arms are separately trained models, so the seed spread must be measured: from two seeds on,
  the seed interval of the per-seed differences combined with the paired bootstrap; significant
  (mark *) when it excludes 0. With one seed the bootstrap interval is shown, but the difference
  is **not** tested.

Marks are per comparison at the chosen confidence, without correction for the number of
comparisons; the report says how many were made.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..analysis.stats import Interval, centered_interval, combined_interval, t_interval
from ..training.config import ExperimentConfig, config_to_dict
from .spec import StudySpec

__all__ = ["summarize", "SAMPLER_TEST", "SAMPLER_TEST_SEEDS", "ARM_TEST_SEEDS", "ARM_TEST_ONE_SEED"]

SAMPLER_TEST = "paired bootstrap over the shared samples"
SAMPLER_TEST_SEEDS = "paired bootstrap over the shared samples, combined with the spread over training seeds"
ARM_TEST_SEEDS = "spread over training seeds (Student t, paired by seed) combined with the paired bootstrap"
ARM_TEST_ONE_SEED = "paired bootstrap over the samples only (1 training seed: not a significance test)"
INTERVAL_ONE_SEED = "bootstrap over the samples and the reference"
INTERVAL_SEEDS = "bootstrap over the samples and the reference, combined with the spread over training seeds"


def _interval(values: list[float], replicates: list[np.ndarray], conf: float, nonnegative: bool = True) -> Interval:
    """Mean of ``values`` (one per seed) with the bootstrap interval of the seed-mean replicates,
    combined with the seeds' Student-t interval from two values on; an FD (``nonnegative``) is
    never below 0, so its lower bound is clipped there (differences are not)."""
    est = float(np.mean(values))
    iv = centered_interval(est, np.mean(replicates, axis=0), conf)
    if len(values) >= 2:
        iv = combined_interval(est, iv, t_interval(values, conf))
    if nonnegative and iv.low < 0:
        iv = Interval(iv.estimate, 0.0, iv.high, iv.confidence)
    return iv


def _difference(cs: list[dict[str, Any]], bs: list[dict[str, Any]], conf: float) -> Interval:
    return _interval(
        [c["fd"] - b["fd"] for c, b in zip(cs, bs)],
        [c["replicates"] - b["replicates"] for c, b in zip(cs, bs)],
        conf,
        nonnegative=False,
    )


def _iv(iv: Interval) -> dict[str, Any]:
    return {"estimate": iv.estimate, "low": iv.low, "high": iv.high}


def _mean(values: list[Any]) -> float | None:
    v = [float(x) for x in values if x is not None]
    return float(np.mean(v)) if v else None


def summarize(
    *,
    spec: StudySpec,
    base: ExperimentConfig,
    cells: list[dict[str, Any]],
    floor: Mapping[str, Any],
    runs: Mapping[str, Any],
    features: Mapping[str, Any],
    real: Mapping[str, Any],
    timing: Mapping[str, Any],
) -> dict[str, Any]:
    """Everything ``study.json`` holds: settings, per-run and per-cell numbers, the table rows with
    their intervals and differences, the floor, notes. ``cells`` carry ``fd``, ``precision``,
    ``recall`` and their bootstrap ``replicates`` (dropped from the output)."""
    conf = spec.confidence
    by = {(c["arm"], c["seed"], c["sampler"], c["nfe_budget"]): c for c in cells}
    seeds = sorted({c["seed"] for c in cells})
    one_seed = len(seeds) == 1
    base_arm, base_sampler = spec.baseline_arm, spec.baseline_sampler
    ref_sampler = spec.samplers_for(base_arm)[0]
    floor_iv = _interval([floor["fd"]], [floor["replicates"]], conf)

    rows: list[dict[str, Any]] = []
    n_sampler_tests = n_arm_tests = 0
    for arm in spec.arms:
        for sampler in spec.samplers_for(arm):
            for nfe in spec.nfe:
                cs = [by[(arm.name, s, sampler, nfe)] for s in seeds]
                iv = _interval([c["fd"] for c in cs], [c["replicates"] for c in cs], conf)
                row: dict[str, Any] = {
                    "arm": arm.name,
                    "sampler": sampler,
                    "nfe_budget": nfe,
                    "nfe": sorted({c["nfe"] for c in cs if c["nfe"] is not None}),
                    "steps": sorted({c["steps"] for c in cs if c["steps"] is not None}),
                    "fd": iv.estimate,
                    "low": iv.low,
                    "high": iv.high,
                    "interval": INTERVAL_ONE_SEED if one_seed else INTERVAL_SEEDS,
                    "fd_by_seed": [c["fd"] for c in cs],
                    "fd_over_floor": iv.estimate / floor["fd"] if floor["fd"] > 0 else None,
                    "precision": _mean([c.get("precision") for c in cs]),
                    "recall": _mean([c.get("recall") for c in cs]),
                }
                if arm.is_pft and sampler != base_sampler and base_sampler in spec.samplers_for(arm):
                    bs = [by[(arm.name, s, base_sampler, nfe)] for s in seeds]
                    div = _difference(cs, bs, conf)
                    row["vs_sampler"] = {
                        "baseline": base_sampler,
                        **_iv(div),
                        "by_seed": [c["fd"] - b["fd"] for c, b in zip(cs, bs)],
                        "significant": div.excludes_zero,
                        "test": SAMPLER_TEST if one_seed else SAMPLER_TEST_SEEDS,
                    }
                    n_sampler_tests += 1
                if arm.name != base_arm.name:
                    bs = [by[(base_arm.name, s, ref_sampler, nfe)] for s in seeds]
                    aiv = _difference(cs, bs, conf)
                    if not one_seed:
                        n_arm_tests += 1
                    row["vs_arm"] = {
                        "baseline": f"{base_arm.name} · {ref_sampler}",
                        **_iv(aiv),
                        "by_seed": [c["fd"] - b["fd"] for c, b in zip(cs, bs)],
                        "significant": None if one_seed else aiv.excludes_zero,
                        "test": ARM_TEST_ONE_SEED if one_seed else ARM_TEST_SEEDS,
                    }
                rows.append(row)

    out_cells = [
        {k: v for k, v in c.items() if k not in ("replicates", "settings")}
        | {"model_sha256": (c.get("settings") or {}).get("model_sha256")}
        for c in cells
    ]
    notes = _notes(spec, rows, floor, floor_iv, one_seed, len(seeds), n_sampler_tests, n_arm_tests)
    return {
        "version": 1,
        "spec": spec.to_dict(),
        "config": config_to_dict(base),
        "seeds": seeds,
        "baseline_arm": base_arm.name,
        "baseline_arm_sampler": ref_sampler,
        "baseline_sampler": base_sampler,
        "features": dict(features),
        "real": dict(real),
        "floor": {
            "fd": floor["fd"],
            "low": floor_iv.low,
            "high": floor_iv.high,
            "precision": floor.get("precision"),
            "recall": floor.get("recall"),
            "n": floor.get("n"),
        },
        "runs": dict(runs),
        "cells": out_cells,
        "table": rows,
        "comparisons": {"sampler": n_sampler_tests, "arm": n_arm_tests},
        "notes": notes,
        "timing": dict(timing),
    }


def _notes(spec, rows, floor, floor_iv, one_seed, n_seeds, n_sampler_tests, n_arm_tests) -> list[str]:
    notes = []
    best = min(rows, key=lambda r: r["fd"])
    ratio = best["fd"] / floor["fd"] if floor["fd"] > 0 else float("inf")
    notes.append(
        f"Best cell: {best['arm']} · {best['sampler']} at {best['nfe_budget']} NFE, FD {best['fd']:.4g}, "
        f"{ratio:.1f}x the real-vs-real floor ({floor['fd']:.4g})."
    )
    if ratio > 5:
        notes.append(
            "Every cell is more than 5x the floor: the models are far from the data, and differences measured at "
            "this quality need not carry over to well-trained models."
        )
    sig = [r for r in rows if r.get("vs_sampler", {}).get("significant")]
    better = [r for r in sig if r["vs_sampler"]["estimate"] < 0]
    if n_sampler_tests:
        notes.append(
            f"Sampler differences ({SAMPLER_TEST}): {len(sig)} of {n_sampler_tests} significant at "
            f"{spec.confidence:.0%} ({len(better)} lower FD than {spec.baseline_sampler}, {len(sig) - len(better)} higher)."
        )
    if one_seed:
        notes.append(
            "One training seed: the spread over training seeds is not measured, so no arm difference is marked "
            "significant; the arm intervals shown cover sampling noise only. Use --seeds 3 or more to test arms."
        )
    elif n_arm_tests:
        sig_a = [r for r in rows if r.get("vs_arm", {}).get("significant")]
        notes.append(
            f"Arm differences ({ARM_TEST_SEEDS}, {n_seeds} seeds): {len(sig_a)} of {n_arm_tests} significant at "
            f"{spec.confidence:.0%}."
        )
    total = n_sampler_tests + (0 if one_seed else n_arm_tests)
    if total:
        notes.append(
            f"Marks are per comparison ({total} comparisons), not corrected for multiplicity: about "
            f"{(1 - spec.confidence) * total:.1f} false marks are expected by chance."
        )
    return notes
