"""Study recipe search: FD_classifier against CPU minutes of training, for SiT and PFT alike.

Each *recipe* is a set of dotted overrides of a base config (``emoji32`` by default: model size
and patch, learning rate, batch, ...). For every recipe the script runs ``patchforcing study``
itself (:func:`patchforcing.study.run_study`) with the SiT and PFT arms, ``--seeds`` training seeds
(one by default), the dense
baseline samplers (``euler`` / ``euler_pf``) at one NFE budget, and extends the training through a
list of step marks: each mark resumes the runs of the previous one (the trainer's exact resume;
the schedule is warm-up then constant, so a run stopped at a mark equals a shorter run) and
re-samples them. Every point is therefore an ordinary study cell: FD in the features of one
classifier trained on the training split (the same classifier for every recipe, so the FDs are
comparable), with the study's bootstrap interval, against the held-out images, next to the
real-vs-real floor; its x coordinate is the run's measured training time.

    python benchmarks/recipe_search.py --out studies/recipe --steps 300,700 \\
        --recipe base: --recipe lr2e-3:optim.lr=2e-3 --recipe b32:optim.batch_size=32@600,1400
    python benchmarks/recipe_search.py --out studies/recipe --report-only      # table + figure again

Writes ``OUT/<recipe>/`` (one study folder per recipe, resumable), ``OUT/recipe_search.json``,
``OUT/fd_vs_minutes.png``, ``OUT/grids/<recipe>-<steps>.png`` (the samples of every point: same noise
and labels for both arms) and prints a Markdown table. Training times are wall-clock seconds of the
trainer on this machine (the study records them per run), so compare recipes measured in one
invocation on one machine; the header names the CPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from _common import markdown_header
from inference_step import machine_info
from patchforcing.analysis.stats import welch_interval
from patchforcing.study import StudySpec, parse_arms, parse_int_list, run_study
from patchforcing.training.config import load_config
from patchforcing.utils.io import read_json, write_json_atomic


def parse_recipe(text: str) -> tuple[str, list[str], list[int] | None]:
    """``"name:key=value,key=value[@steps,steps]"`` -> ``(name, [overrides], step marks or None)``
    (``"name:"`` is the base config; without ``@`` the recipe uses ``--steps``)."""
    name, sep, rest = text.partition(":")
    if not sep or not name or any(c in name for c in "/\\ "):
        raise argparse.ArgumentTypeError(f"--recipe {text!r}: expected NAME:KEY=VALUE[,KEY=VALUE...][@STEPS,...]")
    rest, at, marks_text = rest.partition("@")
    try:
        marks = parse_int_list(marks_text, "--recipe steps") if at else None
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--recipe {text!r}: {e}") from None
    overrides = [o for o in rest.split(",") if o]
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise argparse.ArgumentTypeError(f"--recipe {text!r}: {bad} are not KEY=VALUE")
    return name, overrides, marks


def points_of(study_json: dict, recipe: str) -> list[dict]:
    """One point per (arm) of a finished study: steps, training minutes, FD with interval, floor.
    With several seeds the FD is the study's mean over seeds with its seed interval, ``fd_by_seed``
    the per-seed values, and minutes and images/s are means over the arm's runs."""
    floor = study_json["floor"]["fd"]
    timing = study_json["timing"]["runs"]
    out = []
    for row in study_json["table"]:
        runs = [r for r, v in study_json["runs"].items() if v["arm"] == row["arm"]]
        run = runs[0]
        seconds = float(np.mean([timing[r]["train_seconds"] for r in runs]))
        rates = [timing[r]["images_per_sec"] for r in runs if timing[r].get("images_per_sec")]
        out.append(
            {
                "recipe": recipe,
                "arm": row["arm"],
                "model": study_json["runs"][run]["model"],
                "sampler": row["sampler"],
                "nfe": row["nfe"],
                "steps": study_json["runs"][run]["steps"],
                "train_minutes": seconds / 60.0,
                "images_per_sec": float(np.mean(rates)) if rates else None,
                "minutes_by_seed": [timing[r]["train_seconds"] / 60.0 for r in runs],
                "fd": row["fd"],
                "fd_by_seed": row.get("fd_by_seed", [row["fd"]]),
                "low": row["low"],
                "high": row["high"],
                "floor": floor,
                "x_floor": row["fd"] / floor if floor > 0 else None,
                "precision": row["precision"],
                "recall": row["recall"],
            }
        )
    return out


def figure(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), constrained_layout=True)
    keys = sorted({(p["recipe"], p["arm"]) for p in points})
    colours = {r: f"C{i}" for i, r in enumerate(sorted({k[0] for k in keys}))}
    for recipe, arm in keys:
        ps = sorted((p for p in points if p["recipe"] == recipe and p["arm"] == arm), key=lambda p: p["steps"])
        x = [p["train_minutes"] for p in ps]
        y = [p["fd"] for p in ps]
        err = [[p["fd"] - p["low"] for p in ps], [p["high"] - p["fd"] for p in ps]]
        ax.errorbar(
            x,
            y,
            yerr=err,
            marker="o" if arm != "sit" else "s",
            linestyle="-" if arm != "sit" else "--",
            color=colours[recipe],
            capsize=3,
            label=f"{recipe} · {arm}",
        )
    floor = points[0]["floor"]
    ax.axhline(floor, color="black", linestyle=":", label=f"real-vs-real floor ({floor:.3g})")
    ax.axhline(5 * floor, color="grey", linestyle=":", label="5x the floor")
    ax.set_yscale("log")
    ax.set_xlabel("training wall-clock (minutes, this CPU)")
    ax.set_ylabel("FD_classifier (log)")
    ax.set_title("Recipe search: FD against training minutes (solid PFT, dashed SiT)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def markdown(points: list[dict]) -> str:
    seeds = any(len(p.get("fd_by_seed", [])) > 1 for p in points)
    lines = [
        "| recipe | arm | model | steps | train min | images/s | FD_classifier [95 %] | x floor | precision | recall |"
        + (" FD by seed |" if seeds else ""),
        "|---|---|---|---:|---:|---:|---|---:|---:|---:|" + ("---|" if seeds else ""),
    ]
    for p in sorted(points, key=lambda p: (p["recipe"], p["arm"], p["steps"])):
        ips = f"{p['images_per_sec']:.0f}" if p["images_per_sec"] else "-"
        lines.append(
            f"| {p['recipe']} | {p['arm']} | {p['model']} | {p['steps']} | {p['train_minutes']:.1f} | {ips} | "
            f"{p['fd']:.3f} [{p['low']:.3f}, {p['high']:.3f}] | {p['x_floor']:.1f}x | "
            f"{p['precision']:.2f} | {p['recall']:.2f} |"
            + (" " + ", ".join(f"{v:.3f}" for v in p.get("fd_by_seed", [p["fd"]])) + " |" if seeds else "")
        )
    return "\n".join(lines)


def comparisons(points: list[dict], confidence: float = 0.95) -> str:
    """Every recipe against the first one, per arm, at the same number of training images (steps x batch):
    the difference of the mean FDs over seeds with its Welch interval (``*``: excludes 0), and the ratio of
    the mean training minutes. Empty without seeds or without a second recipe."""
    with_seeds = [p for p in points if len(p.get("fd_by_seed", [])) > 1 and p.get("batch_size")]
    recipes = list(dict.fromkeys(p["recipe"] for p in with_seeds))
    if len(recipes) < 2:
        return ""
    lines = [
        f"| recipe - {recipes[0]} | arm | images seen | steps | FD difference [{confidence:.0%} Welch] | minutes ratio |",
        "|---|---|---:|---|---|---:|",
    ]
    base = {(p["arm"], p["steps"] * p["batch_size"]): p for p in with_seeds if p["recipe"] == recipes[0]}
    for p in sorted(with_seeds, key=lambda p: (p["recipe"], p["arm"], p["steps"])):
        ref = base.get((p["arm"], p["steps"] * p["batch_size"]))
        if p["recipe"] == recipes[0] or ref is None:
            continue
        iv = welch_interval(p["fd_by_seed"], ref["fd_by_seed"], confidence)
        mark = " *" if iv.excludes_zero else ""
        lines.append(
            f"| {p['recipe']} | {p['arm']} | {p['steps'] * p['batch_size']:,} | {p['steps']} vs {ref['steps']} | "
            f"{iv.estimate:+.3f} [{iv.low:+.3f}, {iv.high:+.3f}]{mark} | {p['train_minutes'] / ref['train_minutes']:.2f} |"
        )
    return "\n".join(lines) if len(lines) > 2 else ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default="emoji32", help="base preset or YAML (default emoji32)")
    ap.add_argument("--recipe", action="append", type=parse_recipe, help="NAME:KEY=VALUE,...[@STEPS,...] (repeatable)")
    ap.add_argument("--steps", default="300,700", help="comma-separated step marks (each resumes the last)")
    ap.add_argument("--arms", default="sit,pft")
    ap.add_argument("--seeds", type=int, default=1, help="training seeds per recipe (the study's --seeds)")
    ap.add_argument("--nfe", type=int, default=20)
    ap.add_argument("--num-samples", type=int, default=512)
    ap.add_argument("--classifier-epochs", type=int, default=30)
    ap.add_argument("--bootstrap", type=int, default=300)
    ap.add_argument("--out", type=Path, default=Path("studies/recipe"))
    ap.add_argument("--report-only", action="store_true", help="only collect the finished points, table and figure")
    args = ap.parse_args(argv)
    recipes = args.recipe or [("base", [], None)]
    marks = parse_int_list(args.steps, "--steps")
    arms = parse_arms(args.arms)
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "recipe_search.json"
    points: list[dict] = read_json(results_path)["points"] if results_path.is_file() else []
    if not args.report_only:
        shared_clf = args.out / "classifier.pt"
        for name, overrides, own_marks in recipes:
            folder = args.out / name
            for steps in own_marks or marks:
                if any(p["recipe"] == name and p["steps"] == steps for p in points):
                    continue
                folder.mkdir(parents=True, exist_ok=True)
                if shared_clf.is_file() and not (folder / "classifier.pt").is_file():
                    shutil.copy2(shared_clf, folder / "classifier.pt")  # one classifier: comparable FDs
                base = load_config(args.config, [*overrides, f"train.max_steps={steps}", "train.progress=false"])
                spec = StudySpec(
                    arms=arms,
                    seeds=args.seeds,
                    nfe=[args.nfe],
                    samplers=["euler_pf"],
                    num_samples=args.num_samples,
                    classifier_epochs=args.classifier_epochs,
                    bootstrap=args.bootstrap,
                )
                print(f"== recipe {name} ({' '.join(overrides) or 'base'}), {steps} steps", flush=True)
                run_study(base, spec, folder, progress=False)
                if not shared_clf.is_file():
                    shutil.copy2(folder / "classifier.pt", shared_clf)
                grid = folder / "figures" / f"grid_nfe{args.nfe}.png"
                if grid.is_file():  # the next mark overwrites the study's grid: keep this one
                    (args.out / "grids").mkdir(exist_ok=True)
                    shutil.copy2(grid, args.out / "grids" / f"{name}-{steps}.png")
                new = points_of(json.loads((folder / "study.json").read_text()), name)
                for p in new:
                    p["overrides"] = overrides
                    p["batch_size"] = base.optim.batch_size
                points = [p for p in points if not (p["recipe"] == name and p["steps"] == steps)] + new
                write_json_atomic(results_path, {"points": points})
    if not points:
        print("no finished points yet", file=sys.stderr)
        return 1
    for p in points:  # (points written before batch_size was recorded)
        p.setdefault("batch_size", load_config(args.config, p.get("overrides", [])).optim.batch_size)
    figure(points, args.out / "fd_vs_minutes.png")
    cmd = "python benchmarks/recipe_search.py " + " ".join(sys.argv[1:] if argv is None else argv)
    header = markdown_header(
        "Study recipe search: FD against training minutes (issue 12)", cmd, machine_info(torch.device("cpu"))
    )
    print("\n".join(header))
    print(markdown(points))
    table = comparisons(points)
    if table:
        print("\n" + table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
