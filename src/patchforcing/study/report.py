"""``study.md`` (the paper-style table and the differences) and the figures of a study."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..viz import COLORS, Series, line_chart, sampler_comparison
from ..viz.style import render, resolve, rgb01, save
from .compare import cell_name
from .spec import FAMILIES, StudySpec

__all__ = [
    "write_report",
    "write_figures",
    "write_flops_figure",
    "metric_name",
    "check_commands",
    "SAMPLER_MARK",
    "ARM_MARK",
    "CONTEXT_MARK",
]

SAMPLER_MARK = "†"
ARM_MARK = "*"
CONTEXT_MARK = "‡"
_MARKERS = ("o", "s", "D", "^", "x")


def metric_name(summary: dict[str, Any]) -> str:
    return "FID" if summary["features"].get("name") == "inception" else "FD_classifier"


def _num(v: Any, digits: int = 4) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.{digits}g}"


def _ci(lo: Any, hi: Any) -> str:
    return f"[{_num(lo)}, {_num(hi)}]" if lo is not None and hi is not None and np.isfinite(lo) else "[n/a]"


def _marks(row: dict[str, Any]) -> str:
    m = ""
    if row.get("vs_sampler", {}).get("significant"):
        m += SAMPLER_MARK
    if row.get("vs_arm", {}).get("significant"):
        m += ARM_MARK
    if row.get("vs_context", {}).get("significant"):
        m += CONTEXT_MARK
    return f" {m}" if m else ""


def write_report(out: Path, s: dict[str, Any]) -> Path:
    """Write ``out/study.md`` from :func:`~patchforcing.study.compare.summarize`'s output."""
    spec, cfg, metric = s["spec"], s["config"], metric_name(s)
    nfes = spec["nfe"]
    arms = [a["name"] for a in spec["arms"]]
    steps = sorted({r["steps"] for r in s["runs"].values()})
    model = cfg["model"]["name"].split("-", 1)[1]
    conf = f"{spec['confidence']:.0%}"
    fl = s["floor"]
    acc = s["features"].get("held_out_accuracy")
    lines = [
        f"# Patch Forcing study: {cfg['name']}",
        "",
        f"{len(arms)} arm(s) ({', '.join(arms)}) x {len(s['seeds'])} training seed(s) ({', '.join(map(str, s['seeds']))}), "
        f"backbone {model}, {'/'.join(map(str, steps))} steps of batch {cfg['optim']['batch_size']} each "
        f"(AdamW lr {cfg['optim']['lr']:g}, warm-up {cfg['optim']['warmup_steps']}, EMA {cfg['ema']['decay']:g}, "
        f"precision {cfg['train']['precision']}); data `{cfg['data']['kind']}`"
        + (f" `{cfg['data']['path']}`" if cfg["data"].get("path") else "")
        + f" at {cfg['data']['resolution']} px. Every arm has the same data order, batch, steps, optimiser and EMA;"
        " arms differ only in the model family and the training timestep sampler.",
        "",
        f"Samples: {spec['num_samples']} per cell, without guidance; sample *i* has the same noise and label in every "
        f"arm, seed, sampler and NFE (sample seed {spec['sample_seed']}; labels follow the training set's class "
        "frequencies). SiT arms are sampled with `euler`, PFT arms with each listed sampler; every sampler gets the "
        "largest step count that fits the NFE budget.",
        "",
        f"Features: {s['features'].get('name')}"
        + (f" (held-out accuracy {acc:.3f})" if acc is not None else "")
        + f"; reference: {s['real']['reference_images']} held-out real images (never trained on). "
        f"**Real-vs-real floor**: {fl['n']} real training images with the samples' labels score "
        f"{metric} {_num(fl['fd'])} {_ci(fl['low'], fl['high'])}.",
        "",
        f"## {metric} (lower is better), {conf} intervals",
        "",
        "| arm | sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
        "|---|---|" + "---:|" * len(nfes),
    ]
    table = {(r["arm"], r["sampler"], r["nfe_budget"]): r for r in s["table"]}
    pairs = list(dict.fromkeys((r["arm"], r["sampler"]) for r in s["table"]))  # (arm, sampler) in table order
    for a, sm in pairs:
        cells = [
            f"{_num(table[(a, sm, n)]['fd'])} {_ci(table[(a, sm, n)]['low'], table[(a, sm, n)]['high'])}"
            + _marks(table[(a, sm, n)])
            for n in nfes
        ]
        lines.append(f"| {a} | {sm} | " + " | ".join(cells) + " |")
    one_seed = len(s["seeds"]) == 1
    lines += [
        "",
        f"Intervals: {s['table'][0]['interval']} ({spec['bootstrap']} bootstrap replicates; the bootstrap part is "
        "centred on the expected FD at this sample count). "
        f"{SAMPLER_MARK}: differs from `{s['baseline_sampler']}` of the same arm at the same NFE (paired bootstrap over "
        f"the shared samples{'' if one_seed else ', combined with the seed spread'}; the {conf} interval of the "
        "difference excludes 0). "
        f"{ARM_MARK}: differs from `{s['baseline_arm']} · {s['baseline_arm_sampler']}` at the same NFE "
        + (
            "(needs >= 2 training seeds: not tested here)."
            if one_seed
            else "(spread over training seeds combined with the paired bootstrap)."
        )
        + (
            f" {CONTEXT_MARK}: `random_context` differs from `look_ahead` of the same arm at the same NFE (paired "
            f"bootstrap{'' if one_seed else ', combined with the seed spread'})."
            if any("vs_context" in r for r in s["table"])
            else ""
        ),
        "",
        "Steps (NFE actually used) per sampler and budget: "
        + "; ".join(
            f"{sm} @ {n}: {'/'.join(map(str, r['steps']))} ({'/'.join(map(str, r['nfe']))})"
            for (sm, n), r in {(r["sampler"], r["nfe_budget"]): r for r in s["table"]}.items()
        )
        + ".",
        "",
        "## Differences",
        "",
    ]
    srows = [r for r in s["table"] if "vs_sampler" in r]
    if srows:
        lines += [
            f"### Samplers against `{s['baseline_sampler']}` (same arm, same NFE; paired bootstrap over the shared samples)",
            "",
            f"| arm | sampler | NFE | Δ{metric} | {conf} interval | significant |",
            "|---|---|---:|---:|---|---|",
        ]
        for r in srows:
            d = r["vs_sampler"]
            lines.append(
                f"| {r['arm']} | {r['sampler']} | {r['nfe_budget']} | {d['estimate']:+.4g} | {_ci(d['low'], d['high'])} | "
                f"{'yes' if d['significant'] else 'no'} |"
            )
        lines.append("")
    crows = [r for r in s["table"] if "vs_context" in r]
    if crows:
        lines += [
            "### Random context against look-ahead (same arm, NFE, calls and context times; paired: the paper's "
            "PFT-random control)",
            "",
            f"| arm | NFE | Δ{metric} (random − look_ahead) | {conf} interval | significant |",
            "|---|---:|---:|---|---|",
        ]
        for r in crows:
            d = r["vs_context"]
            lines.append(
                f"| {r['arm']} | {r['nfe_budget']} | {d['estimate']:+.4g} | {_ci(d['low'], d['high'])} | "
                f"{'yes' if d['significant'] else 'no'} |"
            )
        lines += ["", "Positive: random context is worse than uncertainty-chosen context (the paper's finding).", ""]
    arows = [r for r in s["table"] if "vs_arm" in r]
    if arows:
        lines += [
            f"### Arms against `{s['baseline_arm']} · {s['baseline_arm_sampler']}` (same NFE)",
            "",
            f"| arm | sampler | NFE | Δ{metric} | {conf} interval | per seed | significant |",
            "|---|---|---:|---:|---|---|---|",
        ]
        for r in arows:
            d = r["vs_arm"]
            sig = "not tested (1 seed)" if d["significant"] is None else ("yes" if d["significant"] else "no")
            per_seed = ", ".join(f"{v:+.3g}" for v in d["by_seed"])
            lines.append(
                f"| {r['arm']} | {r['sampler']} | {r['nfe_budget']} | {d['estimate']:+.4g} | {_ci(d['low'], d['high'])} | "
                f"{per_seed} | {sig} |"
            )
        lines += ["", f"Test: {arows[0]['vs_arm']['test']}.", ""]
    if s.get("cache"):
        lines += _cache_section(s, metric, conf)
    lines += [
        f"## Precision and recall (k = {spec['k']}, against the held-out reference)",
        "",
        "| arm | sampler | " + " | ".join(f"NFE {n} P / R" for n in nfes) + " |",
        "|---|---|" + "---:|" * len(nfes),
    ]
    for a, sm in pairs:
        cells = [f"{_num(table[(a, sm, n)]['precision'], 3)} / {_num(table[(a, sm, n)]['recall'], 3)}" for n in nfes]
        lines.append(f"| {a} | {sm} | " + " | ".join(cells) + " |")
    lines += [
        f"| real (floor) | - | {_num(fl['precision'], 3)} / {_num(fl['recall'], 3)} |" + " |" * (len(nfes) - 1),
        "",
    ]
    lines += [
        "## Runs",
        "",
        "| run | model | timestep sampler | steps | training min | images/s | final EMA val loss |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for rid, r in s["runs"].items():
        t = s["timing"]["runs"].get(rid, {})
        secs, ips = t.get("train_seconds"), t.get("images_per_sec")
        vl = r.get("val_loss_by_t")
        lines.append(
            f"| {rid} | {r['model']} | {r['timestep_sampler']} | {r['steps']} | "
            f"{_num(secs / 60 if secs else None, 3)} | {_num(ips, 3)} | {_num(float(np.mean(vl)) if vl else None)} |"
        )
    lines += _check_section(s, metric)
    lines += ["", "## What this shows, and what it does not", ""]
    lines += [f"- {n}" for n in s["notes"]]
    lines += [
        f"- {metric} is computed in {'Inception' if metric == 'FID' else 'a small classifier'}'s feature space "
        + (
            ""
            if metric == "FID"
            else "trained on this data; it is comparable only with numbers from the same classifier, never with published FIDs"
        )
        + ".",
        "",
        "## Files",
        "",
        "`study.json` (every number), `figures/fd_vs_nfe.png`, `figures/val_loss_vs_t.png`, "
        "`figures/grid_nfe<N>.png` (the first samples of every arm and sampler: same noise and labels), "
        "`runs/` (one run directory per arm and seed), `samples/` (the scored `.npz` files)"
        + (", `figures/fd_vs_flops.png` (FD against GFLOP per image)." if s.get("cache") else "."),
    ]
    path = out / "study.md"
    path.write_text("\n".join(lines) + "\n")
    return path


#: the sampler options ``patchforcing sample`` takes, by flag
_OPTION_FLAGS = {
    "quantile": "--quantile",
    "n_inner": "--n-inner",
    "context_ratio": "--context-ratio",
    "early_t": "--early-t",
}


def _features_flags(spec: dict[str, Any]) -> str:
    features = spec["features"]
    if features == "classifier":
        return "--features classifier:classifier.pt"
    if features.startswith("classifier:"):  # the commands run in the study folder: an absolute path
        return f"--features classifier:{Path(features.split(':', 1)[1]).resolve()}"
    if features == "inception" and spec.get("inception_weights"):
        return f"--features inception --inception-weights {Path(spec['inception_weights']).resolve()}"
    return f"--features {features}"


def check_commands(s: dict[str, Any]) -> list[dict[str, Any]]:
    """Commands that check cells of a study outside it, run from the study folder: for the first run
    of the baseline arm and of the first PFT arm, the reference sampler at the first NFE budget.

    Each entry: ``cell`` (the scored ``.npz``, relative to the study folder), ``fd`` (its value in the
    table), ``eval`` (``patchforcing eval`` of that file against ``real/reference.npz`` in the study's
    features: gives ``fd``), ``sample`` (``patchforcing sample`` of the run's checkpoint with the cell's
    sampler, NFE, seed, count, batch, precision, sampler options and the study's labels
    ``real/labels.txt``: remakes the file, ``out`` its path) and ``eval_sample`` (the same score of the
    remade file). Token-cached cells are not listed (their commands take the ``--cache-*`` flags)."""
    spec = s["spec"]
    nfe = spec["nfe"][0]
    dense = [c for c in s["cells"] if "variant" not in c and c["nfe_budget"] == nfe]
    pft = [a["name"] for a in spec["arms"] if FAMILIES[a["family"]][1]]
    other = [a["name"] for a in spec["arms"] if not FAMILIES[a["family"]][1]]
    wanted = (other[:1] + pft[:1]) or [spec["arms"][0]["name"]]
    feats = _features_flags(spec)
    out: list[dict[str, Any]] = []
    for arm in wanted:
        cs = sorted((c for c in dense if c["arm"] == arm), key=lambda c: (c["seed"], c["sampler"] != "euler_pf"))
        if not cs:
            continue
        c = cs[0]
        check = f"check/{c['run']}-{c['sampler']}-nfe{nfe}.npz"
        opts = "".join(
            f" {_OPTION_FLAGS[k]} {v}" for k, v in sorted((c.get("options") or {}).items()) if k in _OPTION_FLAGS
        )
        precision = spec.get("sample_precision", "fp32")
        sample = (
            f"patchforcing sample runs/{c['run']} --sampler {c['sampler']} --nfe {nfe}{opts} "
            f"--num-samples {spec['num_samples']} --batch-size {spec['batch_size']} --seed {spec['sample_seed']}"
            + (f" --precision {precision}" if precision != "fp32" else "")
            + f' --classes "$(cat real/labels.txt)" --out {check}'
        )
        ev = "patchforcing eval {} --ref real/reference.npz " + feats + " --metrics fid"
        out.append(
            {
                "cell": c["path"],
                "fd": c["fd"],
                "eval": ev.format(c["path"]),
                "sample": sample,
                "out": check,
                "eval_sample": ev.format(check),
            }
        )
    return out


def _check_section(s: dict[str, Any], metric: str) -> list[str]:
    """The "Check a cell outside the study" section of ``study.md``."""
    checks = check_commands(s)
    if not checks:
        return []
    lines = [
        "",
        "## Check a cell outside the study",
        "",
        "The held-out reference is `real/reference.npz` and the samples' labels are `real/labels.txt`, so the "
        "ordinary commands reproduce any cell (run them in this folder; a cell is one seed's FD, the table's "
        "value for that seed): `eval` scores the study's file, `sample` remakes it from the run's checkpoint "
        "(the same noise, labels and batches: the same images), and its `eval` gives the same number.",
        "",
    ]
    for c in checks:
        lines += [
            f"`{c['cell']}`: {metric} {_num(c['fd'])}",
            "",
            "```",
            c["eval"],
            c["sample"],
            c["eval_sample"],
            "```",
            "",
        ]
    return lines[:-1]


def _cache_section(s: dict[str, Any], metric: str, conf: str) -> list[str]:
    """The "FD against compute (token caching)" section of ``study.md``."""
    c = s["cache"]
    lines = [
        "## FD against compute (token caching)",
        "",
        f"Every PFT cell (dense samplers and their token-cached variants `<sampler>+cache<A>`: a share A of the "
        f"tokens recomputed at most calls, a full call every {c['refresh_every']} calls, the tokens chosen by the "
        "difficulty head; `-random`: the same with random tokens, the control) with its network cost. GFLOP per "
        "image: matmul FLOPs actually spent (`token_flops`), seeds pooled as in the main table. Cached cells use "
        "the same noise and labels as the dense cells, so their differences are paired. "
        f"Δ vs dense: the cached cell minus the dense same sampler at the same NFE ({conf} interval; "
        f"{SAMPLER_MARK}: it excludes 0). "
        "Pareto: no other cell of the arm is at least as good in both (GFLOP per image and FD) and better in one.",
        "",
    ]
    for arm in dict.fromkeys(r["arm"] for r in c["rows"]):
        rows = [r for r in c["rows"] if r["arm"] == arm]
        lines += [
            f"### {arm}",
            "",
            f"| cell | NFE | GFLOP / image | {metric} | {conf} interval | Δ vs dense | {conf} interval | Pareto |",
            "|---|---:|---:|---:|---|---:|---|---|",
        ]
        for r in rows:
            d = r.get("vs_dense")
            delta = (
                f"{d['estimate']:+.4g}{' ' + SAMPLER_MARK if d['significant'] else ''} | {_ci(d['low'], d['high'])}"
                if d
                else "- | -"
            )
            front = "n/a" if r["pareto"] is None else ("yes" if r["pareto"] else "no")
            lines.append(
                f"| {r['variant']} | {r['nfe_budget']} | {_num(r['gflops_per_image'])} | {_num(r['fd'])} | "
                f"{_ci(r['low'], r['high'])} | {delta} | {front} |"
            )
        lines.append("")
    cheaper = [r for r in c["rows"] if r.get("vs_best_cheaper_dense")]
    if cheaper:
        lines += [
            "### Cached cells against the best dense cell of no more GFLOP per image",
            "",
            f"| arm | cell | NFE | GFLOP / image | dense cell | its GFLOP / image | Δ{metric} | {conf} interval | significant |",
            "|---|---|---:|---:|---|---:|---:|---|---|",
        ]
        for r in cheaper:
            d = r["vs_best_cheaper_dense"]
            lines.append(
                f"| {r['arm']} | {r['variant']} | {r['nfe_budget']} | {_num(r['gflops_per_image'])} | {d['baseline']} | "
                f"{_num(d['baseline_gflops_per_image'])} | {d['estimate']:+.4g} | {_ci(d['low'], d['high'])} | "
                f"{'yes' if d['significant'] else 'no'} |"
            )
        lines.append("")
    curve = [r for r in c["rows"] if r.get("vs_dense_curve")]
    if curve:
        lines += [
            "### Cached cells against their dense sampler at equal FLOPs",
            "",
            "The dense sampler's FD at the cached cell's GFLOP per image, interpolated log-linearly in FLOPs between "
            "its two neighbouring NFE budgets (per seed and per bootstrap replicate, so the difference stays paired); "
            "cells outside the dense range are not compared. Corrected: significant at the Bonferroni level over "
            "the comparisons of this table (cells whose calls were all full excluded).",
            "",
            f"| arm | cell | NFE | GFLOP / image | dense curve | its {metric} there | Δ{metric} | {conf} interval | "
            "significant | corrected |",
            "|---|---|---:|---:|---|---:|---:|---|---|---|",
        ]
        for r in curve:
            d = r["vs_dense_curve"]
            strict = d.get("significant_corrected")
            lines.append(
                f"| {r['arm']} | {r['variant']} | {r['nfe_budget']} | {_num(r['gflops_per_image'])} | {d['baseline']} | "
                f"{_num(d['curve_fd'])} | {d['estimate']:+.4g} | {_ci(d['low'], d['high'])} | "
                f"{'yes' if d['significant'] else 'no'} | {'-' if strict is None else ('yes' if strict else 'no')} |"
            )
        lines.append("")
    if c["selection"]:
        lines += [
            "### Uncertainty against random selection (same sampler, share and NFE)",
            "",
            f"| arm | sampler | active | NFE | Δ{metric} (uncertainty - random) | {conf} interval | significant |",
            "|---|---|---:|---:|---:|---|---|",
        ]
        for d in c["selection"]:
            lines.append(
                f"| {d['arm']} | {d['sampler']} | {d['active']:g} | {d['nfe_budget']} | {d['estimate']:+.4g} | "
                f"{_ci(d['low'], d['high'])} | {'yes' if d['significant'] else 'no'} |"
            )
        lines.append("")
    lines += [f"- {n}" for n in c["notes"]]
    lines += ["", "Figure: `figures/fd_vs_flops.png`.", ""]
    return lines


def write_flops_figure(path: Path, s: dict[str, Any]) -> Path | None:
    """``FD`` against GFLOP per image: one line per (arm, cell) over the NFE list (dense solid,
    cached dashed, random-selection dotted; colour: arm and sampler, marker: the active share),
    the floor as a horizontal line, the Pareto-front cells ringed. ``None`` (nothing drawn) when
    no cell has a known cost."""
    rows = [r for r in s["cache"]["rows"] if r["gflops_per_image"] is not None and np.isfinite(r["fd"])]
    if not rows:
        return None
    metric = metric_name(s)
    pairs = list(dict.fromkeys((r["arm"], r["sampler"]) for r in rows))  # colour: (arm, sampler)
    shares = [None] + sorted({r["active"] for r in rows if r["cached"]}, reverse=True)  # marker: the share
    st = resolve(None)
    with st.context():
        fig = st.figure(720, 520, f"{metric} against compute")
        xs = [r["gflops_per_image"] for r in rows]
        ax = fig.add_subplot(xlabel="GFLOP per image", ylabel=metric)
        ax.set_title(
            f"a point per NFE · dashed: cached · dotted: random tokens · ringed: Pareto · grey: floor {s['floor']['fd']:.3g}",
            loc="left",
            fontsize="medium",
            color=st.muted,
        )
        if min(xs) > 0 and max(xs) / min(xs) >= 4:
            ax.set_xscale("log")
        ax.axhline(s["floor"]["fd"], color=st.muted, linewidth=0.9, zorder=1)
        for arm, variant in dict.fromkeys((r["arm"], r["variant"]) for r in rows):
            line = sorted(
                (r for r in rows if (r["arm"], r["variant"]) == (arm, variant)), key=lambda r: r["nfe_budget"]
            )
            first = line[0]
            style = ":" if first["select"] == "random" else ("--" if first["cached"] else "-")
            color = rgb01(COLORS[pairs.index((arm, first["sampler"])) % len(COLORS)])
            ax.plot(
                [r["gflops_per_image"] for r in line],
                [r["fd"] for r in line],
                linestyle=style,
                color=color,
                marker=_MARKERS[shares.index(first["active"]) % len(_MARKERS)],
                markersize=5,
                label=f"{arm} · {variant}",
            )
        front = [r for r in rows if r["pareto"]]
        if front:
            ax.scatter(
                [r["gflops_per_image"] for r in front],
                [r["fd"] for r in front],
                s=150,
                facecolors="none",
                edgecolors=st.fg,
                linewidths=1.2,
                zorder=4,
                label="Pareto front",
            )
        fig.legend(loc="outside lower left", ncols=2)
        save(render(fig), path)
    return path


def write_figures(out: Path, s: dict[str, Any], spec: StudySpec) -> list[Path]:
    """``figures/fd_vs_nfe.png``, ``figures/val_loss_vs_t.png``, ``figures/grid_nfe<N>.png`` and, with
    cached variants, ``figures/fd_vs_flops.png``."""
    figs = out / "figures"
    metric = metric_name(s)
    paths = []
    samplers = spec.samplers_of_any()
    series = []
    for i, arm in enumerate(spec.arms):
        for sm in spec.samplers_for(arm):
            rows = sorted(
                (r for r in s["table"] if r["arm"] == arm.name and r["sampler"] == sm), key=lambda r: r["nfe_budget"]
            )
            series.append(
                Series(
                    [r["nfe_budget"] for r in rows],
                    [r["fd"] for r in rows],
                    f"{arm.name} · {sm}",
                    color=COLORS[samplers.index(sm) % len(COLORS)],
                    marker=_MARKERS[i % len(_MARKERS)],
                )
            )
    p = figs / "fd_vs_nfe.png"
    values = [v for se in series for v in se.y if v is not None and np.isfinite(v)] + [s["floor"]["fd"]]
    lo, hi = min(values), max(values)
    ylog = lo > 0 and hi / lo > 10
    ylim = (lo / 1.2, hi * 1.2) if ylog else (lo - 0.05 * (hi - lo + 1e-12), hi + 0.05 * (hi - lo + 1e-12))
    line_chart(
        series,
        title=f"{metric} against NFE",
        subtitle=f"{spec.num_samples} samples per point; grey line: real-vs-real floor {s['floor']['fd']:.3g}",
        xlabel="NFE per image",
        ylabel=metric,
        hlines=[s["floor"]["fd"]],
        xlog=len(spec.nfe) > 1 and max(spec.nfe) / min(spec.nfe) >= 4,
        ylog=ylog,
        ylim=ylim,
        size=(720, 480),
        path=p,
    )
    paths.append(p)

    val = []
    for i, arm in enumerate(spec.arms):
        curves = [r["val_loss_by_t"] for r in s["runs"].values() if r["arm"] == arm.name and r.get("val_loss_by_t")]
        if curves:
            y = np.mean(np.asarray(curves, dtype=np.float64), axis=0)
            x = (np.arange(len(y)) + 0.5) / len(y)
            val.append(Series(x, y, arm.name, color=COLORS[i % len(COLORS)], marker=_MARKERS[i % len(_MARKERS)]))
    if val:
        p = figs / "val_loss_vs_t.png"
        line_chart(
            val,
            title="EMA validation loss against t",
            subtitle="held-out images, every patch at the same t (mean over seeds)",
            xlabel="t (0 = noise, 1 = data)",
            ylabel="flow-matching loss",
            path=p,
        )
        paths.append(p)

    if s.get("cache"):
        p = write_flops_figure(figs / "fd_vs_flops.png", s)
        if p is not None:
            paths.append(p)

    first_seed = s["seeds"][0]
    for nfe in spec.nfe:
        grids, labels = {}, {}
        for c in s["cells"]:
            if c["seed"] == first_seed and c["nfe_budget"] == nfe:
                with np.load(out / c["path"], allow_pickle=False) as z:
                    key = f"{c['arm']} · {cell_name(c)}"
                    grids[key] = z["arr_0"][: spec.grid_size]
                    labels[key] = f"{c['arm']}\n{cell_name(c)} · {c['steps']} steps"
        if grids:
            p = figs / f"grid_nfe{nfe}.png"
            sampler_comparison(grids, p, labels=labels, title=f"{nfe} NFE: same noise and labels in every panel")
            paths.append(p)
    return paths
