"""The files of an analysis (``analysis.json`` and four kinds of PNG) and the terminal table."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..utils.io import write_json_atomic
from ..viz import COLORS, Series, histogram_chart, hstack, line_chart, scatter_density

__all__ = ["format_table", "write_report"]

_NAN = float("nan")


def _nan(values: list) -> list[float]:
    return [_NAN if v is None else v for v in values]


def _correlation_png(result: dict[str, Any], path: Path, where: str) -> None:
    s, corr, ref = result["settings"], result["correlation"], result["reference"]["pearson_r"]
    series = [
        Series(corr["t"], _nan(corr["pearson_r"]), "Pearson R (this model)", COLORS[0], "o", "solid"),
        Series(corr["t"], _nan(corr["spearman_r"]), "Spearman rank correlation", COLORS[4], "s", "dashed"),
        Series([float(k) for k in ref], list(ref.values()), "paper, ImageNet 256 (Pearson R)", COLORS[3], "x", None),
    ]
    ymin = min([0.0] + [v for v in corr["pearson_r"] + corr["spearman_r"] if v is not None])
    grid = f"{s['patch_grid'][0]}x{s['patch_grid'][1]}"
    line_chart(
        series,
        title="Does the predicted uncertainty track the actual error?",
        subtitle=(
            f"Correlation over all {grid} {where} of {s['num_images']} held-out images, every patch at the "
            "same t.\nUncertainty: mean exp(logvar) of a patch. Error: mean (v - u)^2 of the patch."
        ),
        xlabel="time t of every patch (0 = noise, 1 = data)",
        ylabel="correlation of uncertainty and error",
        xlim=(0.0, 1.0),
        ylim=(ymin - 0.05 if ymin < 0 else -0.05, 1.0),
        hlines=[0.0],
        path=path,
    )


def _scatter_png(result: dict[str, Any], path: Path, j: int, unc: np.ndarray, err: np.ndarray, latent: bool) -> None:
    s, corr = result["settings"], result["correlation"]
    t = corr["t"][j]
    r, rs = corr["pearson_r"][j], corr["spearman_r"][j]
    notes = [
        f"Pearson R = {r:.3f}" if r is not None else "Pearson R: undefined (constant)",
        f"Spearman = {rs:.3f}" if rs is not None else "Spearman: undefined",
        f"{unc.size:,} patches",
    ]
    ref = result["reference"]["pearson_r"].get(f"{t:.1f}") if abs(t * 10 - round(t * 10)) < 1e-9 else None
    if ref is not None:
        notes.append(f"paper (ImageNet): R = {ref}")
    scatter_density(
        unc.ravel(),
        err.ravel(),
        title=f"Predicted uncertainty vs actual error at t = {t:.2f}",
        subtitle=f"One dot per {'latent patch' if latent else 'patch'} ({s['num_images']} images x "
        f"{s['num_patches']}), log scales",
        xlabel="predicted uncertainty: mean exp(logvar) of the patch",
        ylabel="actual error: mean (v - u)^2 of the patch",
        diagonal="predicted = actual (a calibrated head)",
        notes=notes,
        path=path,
    )


def _legend_texts(s: dict[str, Any]) -> tuple[str, str]:
    return (
        "no context: every patch at t",
        f"with context: {100 * s['context_share']:.0f}% of the patches at t_ctx ({s['context_rule']})",
    )


def _context_png(result: dict[str, Any], path: Path) -> None:
    c, ts = result["context"], result["context"]["t"]
    without, with_ = _legend_texts(result["settings"])
    tc_note = ", ".join(f"{a:.1f}->{b:.2f}" for a, b in zip(ts, c["t_context"]))

    def chart(key: str, title: str, subtitle: str, ylabel: str, ylog: bool) -> Any:
        return line_chart(
            [
                Series(ts, c[f"{key}_without"], without, COLORS[0], "o", "solid"),
                Series(ts, c[f"{key}_with"], with_, COLORS[1], "s", "solid"),
            ],
            title=title,
            subtitle=subtitle,
            xlabel="time t of the measured patches",
            ylabel=ylabel,
            xlim=(0.0, 1.0),
            ylog=ylog,
            size=(600, 430),
        )

    left = chart(
        "loss",
        "Loss of the non-context patches",
        "flow-matching MSE, measured only on the patches that stay at t",
        "validation loss (MSE of v)",
        False,
    )
    right = chart(
        "uncertainty",
        "Predicted uncertainty of the non-context patches",
        "mean exp(logvar) per patch, log scale" + (f";\nt -> t_ctx: {tc_note}" if len(tc_note) < 60 else ""),
        "mean predicted uncertainty",
        True,
    )
    hstack([left, right], gap=16, path=path)


def _histogram_png(result: dict[str, Any], path: Path) -> None:
    h, ts = result["histogram"], result["correlation"]["t"]
    without, with_ = _legend_texts(result["settings"])
    w0, w1 = np.asarray(h["without"], dtype=np.float64), np.asarray(h["with"], dtype=np.float64)
    histogram_chart(
        h["edges"],
        {without: 100 * w0 / max(w0.sum(), 1), with_: 100 * w1 / max(w1.sum(), 1)},
        title="Uncertainty of the non-context patches, with and without clean context",
        subtitle=f"all t pooled ({', '.join(f'{t:g}' for t in ts)}); {result['settings']['num_images']} images; "
        "log-spaced bins",
        xlabel="predicted uncertainty: mean exp(logvar) of the patch (log scale)",
        ylabel="share of patches (%)",
        vlines=[
            (h["median_without"], f"median without: {h['median_without']:.3g}"),
            (h["median_with"], f"median with: {h['median_with']:.3g}"),
        ],
        size=(700, 460),
        path=path,
    )


def write_report(
    result: dict[str, Any], out: Path, unc0: np.ndarray, err0: np.ndarray, scatter_t: Sequence[float]
) -> dict[str, str]:
    """Write the PNGs and ``analysis.json`` (with ``files``) to ``out``; returns name -> file name.

    ``unc0`` / ``err0``: ``(T, n, N)`` per-patch uncertainty and error with every patch at ``t``.
    """
    out.mkdir(parents=True, exist_ok=True)
    latent = not result["settings"]["space"].startswith("pixels")
    ts = result["correlation"]["t"]
    files = {"correlation": "correlation.png"}
    _correlation_png(result, out / files["correlation"], "latent patches" if latent else "patches")
    for j in sorted({min(range(len(ts)), key=lambda q: abs(ts[q] - float(w))) for w in scatter_t}):
        name = f"scatter_t{ts[j]:.2f}"
        files[name] = f"{name}.png"
        _scatter_png(result, out / files[name], j, unc0[j], err0[j], latent)
    files["context"] = "context.png"
    _context_png(result, out / files["context"])
    files["histogram"] = "uncertainty_hist.png"
    _histogram_png(result, out / files["histogram"])
    result["files"] = files
    write_json_atomic(out / "analysis.json", result)
    files["json"] = "analysis.json"
    return files


def format_table(result: dict[str, Any]) -> str:
    """A short text table of the numbers (for the terminal)."""
    c, x = result["correlation"], result["context"]
    lines = [f"{'t':>5} {'R':>7} {'Spearman':>9} {'loss':>10} {'loss+ctx':>10} {'unc':>10} {'unc+ctx':>10}"]
    for j, t in enumerate(c["t"]):
        r, rs = c["pearson_r"][j], c["spearman_r"][j]
        lines.append(
            f"{t:5.2f} {'n/a' if r is None else f'{r:.3f}':>7} {'n/a' if rs is None else f'{rs:.3f}':>9} "
            f"{x['loss_without'][j]:10.4g} {x['loss_with'][j]:10.4g} "
            f"{x['uncertainty_without'][j]:10.4g} {x['uncertainty_with'][j]:10.4g}"
        )
    ref = ", ".join(f"R = {v} at t = {k}" for k, v in result["reference"]["pearson_r"].items())
    lines.append(
        f"paper (ImageNet 256): {ref}; loss/unc: non-context patches, +ctx: "
        f"{100 * result['settings']['context_share']:.0f}% of patches at {result['settings']['context_rule']}"
    )
    return "\n".join(lines)
