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
* **Context difference** (``random_context`` minus ``look_ahead`` of the same PFT arm at the same
  NFE, when both are sampled): the paper's "PFT-random" control against the uncertainty rule it
  replaces, at the same calls and context times. Paired as a sampler difference; significant (mark
  ‡) when the interval excludes 0. Positive: random context is worse, as the paper reports.
* **Arm difference** (an arm minus the baseline arm, ``sit`` with ``euler``, at the same NFE):
  arms are separately trained models, so the seed spread must be measured: from two seeds on,
  the seed interval of the per-seed differences combined with the paired bootstrap; significant
  (mark *) when it excludes 0. With one seed the bootstrap interval is shown, but the difference
  is **not** tested.

Marks are per comparison at the chosen confidence, without correction for the number of
comparisons; the report says how many were made.

**Token caching** (only when the study has cached variants, :class:`~patchforcing.study.spec.CacheVariant`):
per PFT arm, every cell (dense samplers and cached variants, seeds pooled as above) with its
GFLOP per image, and

* the cached cell minus the dense cell of the same sampler at the same NFE (paired bootstrap:
  same noise and labels);
* the cached cell minus the best (lowest-FD) dense cell of no more GFLOP per image;
* the cached cell minus its dense sampler's curve at the same GFLOP per image (log-linear
  interpolation in FLOPs between the neighbouring NFE budgets, per seed and per replicate): the
  question "is caching better at equal FLOPs" (:func:`dense_curve_weights`);
* uncertainty minus random selection at the same sampler, share and NFE;
* the Pareto front of (GFLOP per image, FD) over the arm's cells (:func:`pareto_front`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..analysis.stats import Interval, centered_interval, combined_interval, t_interval
from ..training.config import ExperimentConfig, config_to_dict
from .spec import StudySpec

__all__ = [
    "summarize",
    "cell_name",
    "pareto_front",
    "dense_curve_weights",
    "SAMPLER_TEST",
    "SAMPLER_TEST_SEEDS",
    "ARM_TEST_SEEDS",
    "ARM_TEST_ONE_SEED",
    "CONTEXT_RULE",
    "CONTEXT_CONTROL",
]

#: the uncertainty-chosen context sampler and its random-context control (compared directly)
CONTEXT_RULE, CONTEXT_CONTROL = "look_ahead", "random_context"

SAMPLER_TEST = "paired bootstrap over the shared samples"
SAMPLER_TEST_SEEDS = "paired bootstrap over the shared samples, combined with the spread over training seeds"
ARM_TEST_SEEDS = "spread over training seeds (Student t, paired by seed) combined with the paired bootstrap"
ARM_TEST_ONE_SEED = "paired bootstrap over the samples only (1 training seed: not a significance test)"
INTERVAL_ONE_SEED = "bootstrap over the samples and the reference"
INTERVAL_SEEDS = "bootstrap over the samples and the reference, combined with the spread over training seeds"


def cell_name(cell: Mapping[str, Any]) -> str:
    """What a cell is sampled with: its cached variant's name (``"euler_pf+cache0.5"``), else its sampler."""
    return cell.get("variant") or cell["sampler"]


def pareto_front(points: Sequence[tuple[float | None, float | None]]) -> list[bool | None]:
    """Which ``(cost, value)`` points are on the front (lower is better in both): no *other* point
    dominates it, i.e. has a cost ``<=`` and a value ``<=`` with at least one of them strictly lower.

    Ties: identical points are all on the front (neither dominates the other); a point with the
    same value as a cheaper one, or the same cost as a better one, is not. A point with an unknown
    (``None`` / non-finite) cost or value is ``None`` and dominates nothing."""

    def known(v: float | None) -> bool:
        return v is not None and math.isfinite(v)

    out: list[bool | None] = []
    for i, (c, v) in enumerate(points):
        if not (known(c) and known(v)):
            out.append(None)
            continue
        out.append(
            not any(
                j != i and known(cj) and known(vj) and cj <= c and vj <= v and (cj < c or vj < v)
                for j, (cj, vj) in enumerate(points)
            )
        )
    return out


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


def _paired(cs: list[dict[str, Any]], bs: list[dict[str, Any]], conf: float) -> dict[str, Any]:
    """Cells ``cs`` minus cells ``bs`` of the same arm (one per seed): a sampler comparison, paired
    over the shared samples (and by seed)."""
    div = _difference(cs, bs, conf)
    return {
        **_iv(div),
        "by_seed": [c["fd"] - b["fd"] for c, b in zip(cs, bs)],
        "significant": div.excludes_zero,
        "test": SAMPLER_TEST if len(cs) == 1 else SAMPLER_TEST_SEEDS,
    }


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
    by = {(c["arm"], c["seed"], cell_name(c), c["nfe_budget"]): c for c in cells}
    seeds = sorted({c["seed"] for c in cells})
    one_seed = len(seeds) == 1
    base_arm, base_sampler = spec.baseline_arm, spec.baseline_sampler
    ref_sampler = spec.samplers_for(base_arm)[0]
    floor_iv = _interval([floor["fd"]], [floor["replicates"]], conf)

    rows: list[dict[str, Any]] = []
    n_sampler_tests = n_arm_tests = n_context_tests = 0
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
                    row["vs_sampler"] = _paired(cs, [by[(arm.name, s, base_sampler, nfe)] for s in seeds], conf)
                    row["vs_sampler"]["baseline"] = base_sampler
                    n_sampler_tests += 1
                if arm.is_pft and sampler == CONTEXT_CONTROL and CONTEXT_RULE in spec.samplers_for(arm):
                    row["vs_context"] = _paired(cs, [by[(arm.name, s, CONTEXT_RULE, nfe)] for s in seeds], conf)
                    row["vs_context"]["baseline"] = CONTEXT_RULE
                    n_context_tests += 1
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
    tests = {"sampler": n_sampler_tests, "arm": n_arm_tests, "context": n_context_tests}
    notes = _notes(spec, rows, floor, one_seed, len(seeds), tests)
    cache = _cache_summary(spec, by, seeds, conf) if spec.cache_variants() else None
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
        "comparisons": tests,
        "notes": notes,
        "timing": dict(timing),
        **({"cache": cache} if cache is not None else {}),
    }


def _notes(spec, rows, floor, one_seed, n_seeds, tests: Mapping[str, int]) -> list[str]:
    n_sampler_tests, n_arm_tests, n_context_tests = tests["sampler"], tests["arm"], tests["context"]
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
    if n_context_tests:
        sig_c = [r for r in rows if r.get("vs_context", {}).get("significant")]
        worse = [r for r in sig_c if r["vs_context"]["estimate"] > 0]
        notes.append(
            f"Random context against {CONTEXT_RULE} (the paper's PFT-random control; {_test(one_seed)}): "
            f"{len(sig_c)} of {n_context_tests} significant at {spec.confidence:.0%} ({len(worse)} with random "
            f"context worse, the paper's direction; {len(sig_c) - len(worse)} with it better)."
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
    total = n_sampler_tests + n_context_tests + (0 if one_seed else n_arm_tests)
    if total:
        notes.append(
            f"Marks are per comparison ({total} comparisons), not corrected for multiplicity: about "
            f"{(1 - spec.confidence) * total:.1f} false marks are expected by chance."
        )
    return notes


def _test(one_seed: bool) -> str:
    return SAMPLER_TEST if one_seed else SAMPLER_TEST_SEEDS


def _cache_summary(
    spec: StudySpec, by: Mapping[tuple, dict[str, Any]], seeds: list[int], conf: float
) -> dict[str, Any]:
    """FD against compute: the rows (every PFT cell with its GFLOP per image, its difference from
    the dense same sampler and from the best dense cell of no more FLOPs, its Pareto flag), the
    uncertainty-vs-random comparisons and the notes (see the module docstring)."""
    one_seed = len(seeds) == 1
    rows: list[dict[str, Any]] = []
    selection: list[dict[str, Any]] = []
    curve_jobs: list[tuple[dict[str, Any], list, list]] = []  # (row, its cells, the arm's dense cells)
    for arm in spec.arms:
        if not arm.is_pft:
            continue
        arm_rows: list[dict[str, Any]] = []
        pooled: list[list[dict[str, Any]]] = []
        entries = [(s, None) for s in spec.samplers_for(arm)] + [(v.name, v) for v in spec.cache_variants_for(arm)]
        for name, v in entries:
            for nfe in spec.nfe:
                cs = [by[(arm.name, sd, name, nfe)] for sd in seeds]
                iv = _interval([c["fd"] for c in cs], [c["replicates"] for c in cs], conf)
                row: dict[str, Any] = {
                    "arm": arm.name,
                    "variant": name,
                    "sampler": name if v is None else v.sampler,
                    "cached": v is not None,
                    "active": None if v is None else v.active,
                    "select": None if v is None else v.select,
                    "refresh_every": None if v is None else v.refresh_every,
                    "nfe_budget": nfe,
                    "nfe": sorted({c["nfe"] for c in cs if c["nfe"] is not None}),
                    "gflops_per_image": _mean([c.get("gflops_per_image") for c in cs]),
                    "dense_gflops_per_image": _mean(
                        [c.get("dense_gflops_per_image", c.get("gflops_per_image")) for c in cs]
                    ),
                    "fd": iv.estimate,
                    "low": iv.low,
                    "high": iv.high,
                }
                g, dg = row["gflops_per_image"], row["dense_gflops_per_image"]
                # a cached cell whose calls were all full (active 1, or too few calls) is the dense cell
                row["partial"] = None if v is None or g is None or dg is None else bool(g < dg)
                if v is not None:
                    bs = [by[(arm.name, sd, v.sampler, nfe)] for sd in seeds]
                    div = _difference(cs, bs, conf)
                    row["vs_dense"] = {
                        "baseline": v.sampler,
                        **_iv(div),
                        "significant": div.excludes_zero,
                        "test": _test(one_seed),
                    }
                arm_rows.append(row)
                pooled.append(cs)
        for r, on in zip(arm_rows, pareto_front([(r["gflops_per_image"], r["fd"]) for r in arm_rows])):
            r["pareto"] = on
        dense = [(r, cs) for r, cs in zip(arm_rows, pooled) if not r["cached"] and r["gflops_per_image"] is not None]
        for r, cs in zip(arm_rows, pooled):
            if not r["cached"] or r["gflops_per_image"] is None:
                continue
            cheaper = [(d, dcs) for d, dcs in dense if d["gflops_per_image"] <= r["gflops_per_image"]]
            if not cheaper:
                r["vs_best_cheaper_dense"] = None
                continue
            d, dcs = min(cheaper, key=lambda p: p[0]["fd"])
            div = _difference(cs, dcs, conf)
            r["vs_best_cheaper_dense"] = {
                "baseline": f"{d['variant']} @ {d['nfe_budget']} NFE",
                "baseline_gflops_per_image": d["gflops_per_image"],
                **_iv(div),
                "significant": div.excludes_zero,
                "test": _test(one_seed),
            }
        for r, cs in zip(arm_rows, pooled):
            if r["cached"]:
                r["vs_dense_curve"] = _vs_dense_curve(r, cs, dense, one_seed, conf)
                if r["vs_dense_curve"] is not None and r["partial"]:
                    curve_jobs.append((r, cs, dense))
        rows += arm_rows
        for v in spec.cache_variants_for(arm):
            if v.select != "random":
                continue
            twin = next(
                (
                    u
                    for u in spec.cache_variants_for(arm)
                    if (u.sampler, u.active, u.select) == (v.sampler, v.active, "uncertainty")
                ),
                None,
            )
            if twin is None:
                continue
            for nfe in spec.nfe:
                us = [by[(arm.name, sd, twin.name, nfe)] for sd in seeds]
                rs = [by[(arm.name, sd, v.name, nfe)] for sd in seeds]
                div = _difference(us, rs, conf)
                partial = next(
                    r["partial"]
                    for r in rows
                    if (r["variant"], r["nfe_budget"]) == (twin.name, nfe) and r["arm"] == arm.name
                )
                selection.append(
                    {
                        "arm": arm.name,
                        "partial": partial,
                        "sampler": v.sampler,
                        "active": v.active,
                        "nfe_budget": nfe,
                        "uncertainty": twin.name,
                        "random": v.name,
                        **_iv(div),
                        "significant": div.excludes_zero,
                        "test": _test(one_seed),
                    }
                )
    # the equal-FLOP verdict is a family of comparisons: also test each at the Bonferroni level
    corrected = 1 - (1 - conf) / max(len(curve_jobs), 1)
    for r, cs, dense in curve_jobs:
        strict = _vs_dense_curve(r, cs, dense, one_seed, corrected)
        r["vs_dense_curve"]["significant_corrected"] = strict["significant"]
        r["vs_dense_curve"]["corrected_confidence"] = corrected
    return {
        "refresh_every": spec.cache_refresh,
        "rows": rows,
        "selection": selection,
        "notes": _cache_notes(spec, rows, selection),
    }


def dense_curve_weights(g: float, costs: Sequence[float]) -> tuple[int, int, float] | None:
    """Where cost ``g`` falls on a dense sampler's curve of ``costs`` (GFLOP per image of its NFE
    budgets): ``(i, j, w)`` with ``costs[i] <= g <= costs[j]`` the nearest neighbours and ``w`` the
    log-linear weight of ``j`` (``w = ln(g / costs[i]) / ln(costs[j] / costs[i])``; ``i == j``,
    ``w = 0`` at an exact match). ``None`` when ``g`` lies outside the curve (no extrapolation)."""
    order = sorted(range(len(costs)), key=lambda k: costs[k])
    for a, b in zip(order, order[1:] + order[-1:]):
        if costs[a] == g:
            return a, a, 0.0
        if costs[a] < g < costs[b]:
            return a, b, math.log(g / costs[a]) / math.log(costs[b] / costs[a])
    return None


def _vs_dense_curve(r, cs, dense, one_seed: bool, conf: float) -> dict[str, Any] | None:
    """The cached cell minus its dense sampler's curve at the same GFLOP per image, the curve
    interpolated log-linearly in FLOPs between the two neighbouring NFE budgets, per seed and per
    bootstrap replicate (the replicates share their draws, so the difference stays paired)."""
    if r["gflops_per_image"] is None:
        return None
    same = [(d, dcs) for d, dcs in dense if d["variant"] == r["sampler"]]
    where = dense_curve_weights(r["gflops_per_image"], [d["gflops_per_image"] for d, _ in same])
    if where is None:
        return None
    i, j, w = where
    (di, ics), (dj, jcs) = same[i], same[j]
    curve = [
        {"fd": (1 - w) * a["fd"] + w * b["fd"], "replicates": (1 - w) * a["replicates"] + w * b["replicates"]}
        for a, b in zip(ics, jcs)
    ]
    div = _difference(cs, curve, conf)
    between = f"{di['nfe_budget']} NFE" if i == j else f"{di['nfe_budget']} and {dj['nfe_budget']} NFE"
    return {
        "baseline": f"{r['sampler']} between {between}" if i != j else f"{r['sampler']} @ {between}",
        "weight": w,
        "curve_fd": float(np.mean([c["fd"] for c in curve])),
        **_iv(div),
        "significant": div.excludes_zero,
        "test": _test(one_seed),
    }


def _at(r: Mapping[str, Any]) -> str:
    return f"{r['arm']} · {r['variant']} @ {r['nfe_budget']} NFE"


def _cache_notes(spec: StudySpec, rows: list[dict[str, Any]], selection: list[dict[str, Any]]) -> list[str]:
    """Plain sentences the cache rows support (computed, per comparison, no more)."""
    conf = f"{spec.confidence:.0%}"
    cached = [r for r in rows if r["cached"]]
    if not any(r["pareto"] is not None for r in cached):
        return ["The model's FLOPs are unknown: no FD-against-compute comparison is possible."]
    notes = []
    same = [r for r in cached if r["partial"] is False]
    if same:
        notes.append(
            f"{len(same)} cached cell(s) made no partial call (all tokens active, or too few calls for a refresh "
            f"period of {spec.cache_refresh}): they are the dense cells at the same cost and are left out below "
            f"({', '.join(_at(r) for r in same)})."
        )
    cached = [r for r in cached if r["partial"]]
    selection = [c for c in selection if c["partial"]]
    if not cached:
        return notes
    on = [r for r in cached if r["pareto"]]
    notes.append(
        f"Pareto front of (GFLOP per image, FD) over each arm's cells: {len(on)} of {len(cached)} cached cells are on it"
        + (f" ({', '.join(_at(r) for r in on)})." if on else ".")
    )
    tested = [r for r in cached if r.get("vs_best_cheaper_dense")]
    better = [
        r for r in tested if r["vs_best_cheaper_dense"]["significant"] and r["vs_best_cheaper_dense"]["estimate"] < 0
    ]
    worse = [
        r for r in tested if r["vs_best_cheaper_dense"]["significant"] and r["vs_best_cheaper_dense"]["estimate"] > 0
    ]
    if tested:
        s = (
            f"Against the best dense cell of no more GFLOP per image: {len(better)} of {len(tested)} cached cells have a "
            f"significantly lower FD, {len(worse)} a significantly higher one ({conf}, paired bootstrap)"
        )
        if better:
            b = min(better, key=lambda r: r["vs_best_cheaper_dense"]["estimate"])
            d = b["vs_best_cheaper_dense"]
            s += f"; the largest gain: {_at(b)} vs {d['baseline']}, ΔFD {d['estimate']:+.4g} [{d['low']:.4g}, {d['high']:.4g}]"
        notes.append(
            s + ". This comparison gives the cached cell more FLOPs than its dense baseline whenever the NFE grid is "
            "coarse; the equal-FLOP verdict is the next one."
        )
    curve = [r for r in cached if r.get("vs_dense_curve")]
    if curve:
        d_of = [r["vs_dense_curve"] for r in curve]
        lo = [r for r, d in zip(curve, d_of) if d["significant"] and d["estimate"] < 0]
        hi = [r for r, d in zip(curve, d_of) if d["significant"] and d["estimate"] > 0]
        strict = [r for r, d in zip(curve, d_of) if d.get("significant_corrected") and d["estimate"] < 0]
        s = (
            f"At equal FLOPs (each cached cell against its dense sampler's curve at the same GFLOP per image, "
            f"interpolated log-linearly in FLOPs between the neighbouring NFE budgets; paired): {len(lo)} of "
            f"{len(curve)} cached cells have a significantly lower FD, {len(hi)} a significantly higher one ({conf}, "
            f"uncorrected; about {(1 - spec.confidence) * len(curve):.1f} false marks expected by chance)"
        )
        if strict:
            b = min(strict, key=lambda r: r["vs_dense_curve"]["estimate"])
            d = b["vs_dense_curve"]
            s += (
                f"; {len(strict)} stay significant after a Bonferroni correction over these {len(curve)} comparisons, "
                f"the largest gain {_at(b)}, ΔFD {d['estimate']:+.4g} [{d['low']:.4g}, {d['high']:.4g}]. By this "
                "comparison a cached setting is better at equal FLOPs here (one study)."
            )
        else:
            s += (
                f"; none stays significant after a Bonferroni correction over these {len(curve)} comparisons. No cached "
                "setting is shown to be better at equal FLOPs: the dense samplers stay the default."
            )
        notes.append(s)
    else:
        notes.append(
            "No cached cell's cost lies within its dense sampler's range of costs, so caching is not compared at "
            "equal FLOPs (add NFE budgets)."
        )
    if selection:
        lo = [c for c in selection if c["significant"] and c["estimate"] < 0]
        hi = [c for c in selection if c["significant"] and c["estimate"] > 0]
        mean = sum(c["estimate"] for c in selection) / len(selection)
        notes.append(
            f"Uncertainty against random selection (same sampler, share and NFE; paired): {len(lo)} of {len(selection)} "
            f"comparisons significantly lower FD with the difficulty head, {len(hi)} significantly higher "
            f"(mean ΔFD {mean:+.4g})."
        )
    n = len(tested) + len(curve) + len(selection) + len(cached)
    notes.append(
        f"{n} cache comparisons at {conf} (vs the dense same sampler, vs the best cheaper dense cell, vs the dense "
        f"curve at equal FLOPs, uncertainty vs random), not corrected for multiplicity: about {(1 - spec.confidence) * n:.1f} false marks are expected by chance."
    )
    return notes
