"""Does a text-to-image run follow its prompts? Category accuracy and FD_classifier per sampler.

For a T2I run on a captioned, labelled ``.npz`` (the Google emoji set: 9 categories), this takes
the run's held-out captions (the trainer's validation split), a category-balanced set of them
(the same number per category), generates ``--per-prompt`` images per caption with each sampler
at the same NFE and CFG scale (shared noise per sample index), classifies them with a
``patchforcing train-classifier`` network trained on the real images, and reports:

* the share of images whose predicted category is their prompt's category, its chance level
  (1/K for a balanced set) and a Wilson 95 % interval;
* FD_classifier of the generated images against the held-out real images of the same captions'
  categories (all real images), next to the real-vs-real floor (two disjoint real sets of the
  same size);
* a prompt grid per sampler (``OUT/<sampler>.png``) and ``OUT/results.json``.

    python benchmarks/t2i_emoji.py RUN --classifier CLF.pt --data ../shared/datasets/emoji-google-64.npz \\
        --nfe 20 --cfg 3 --per-prompt 8 --out t2i-eval/
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from _common import cpu_model
from patchforcing import load_model
from patchforcing.data.captions import CaptionedNpzDataset
from patchforcing.encoders.text import load_text_encoder_for
from patchforcing.evaluation.category import category_accuracy
from patchforcing.evaluation.features import ClassifierFeatures
from patchforcing.evaluation.frechet import frechet_distance_from_features
from patchforcing.sampling.generate import GenerationSpec, sample_indices
from patchforcing.training.config import load_config
from patchforcing.training.trainer import split_train_val
from patchforcing.viz import prompt_grid, to_uint8_images


def balanced_prompts(ds: CaptionedNpzDataset, indices: list[int], cap: int) -> tuple[list[str], list[int]]:
    """The first ``n`` held-out captions of every category, ``n`` = min(cap, smallest category)."""
    by_cat: dict[int, list[int]] = {}
    for i in indices:
        by_cat.setdefault(int(ds.labels[i]), []).append(i)
    n = min(cap, min(len(v) for v in by_cat.values()))
    chosen = [i for c in sorted(by_cat) for i in by_cat[c][:n]]
    return [ds.captions[i] for i in chosen], [int(ds.labels[i]) for i in chosen]


def features(clf: ClassifierFeatures, images_uint8: np.ndarray) -> np.ndarray:
    out = [clf(images_uint8[s : s + 256])["pool"].numpy() for s in range(0, len(images_uint8), 256)]
    return np.concatenate(out)


def check_exact_nfe(names: list[str], nfe: int, cfg: float) -> None:
    """Exit with a message naming the budgets that every sampler meets exactly, unless ``nfe`` is one."""
    from patchforcing.conditioning import ClassLabels
    from patchforcing.sampling.api import plan_run
    from patchforcing.sampling.guidance import GuidedModel
    from patchforcing.sampling.samplers import make_sampler, make_time_grid

    # planning only (no network call): the NFE of a run depends on the sampler, its grid and the guidance
    guided = GuidedModel(None, ClassLabels(torch.zeros(1, dtype=torch.long), 1), cfg_scale=cfg)
    reach = {n: {plan_run(make_sampler(n), make_time_grid(k), guided)[1] for k in range(1, 400)} for n in names}
    if all(nfe in r for r in reach.values()):
        return
    common = sorted(set.intersection(*reach.values()))
    sys.exit(
        f"--exact-nfe: not every sampler of {names} can spend exactly {nfe} NFE; budgets they all meet: {common[:8]}"
    )


def paired_differences(per_image, names: list[str], f_real: np.ndarray, replicates: int) -> dict[str, dict]:
    """Accuracy and FD of every other sampler minus the first, with paired percentile-bootstrap 95 %
    intervals (image ``i`` of every sampler comes from the same prompt and noise)."""
    from patchforcing.analysis.stats import paired_bootstrap_difference

    def fd(f: np.ndarray) -> float:
        return frechet_distance_from_features(f, f_real)

    base_ok, base_f = per_image[names[0]]
    out = {}
    for name in names[1:]:
        ok, f = per_image[name]
        row = {}
        for key, a, b, stat in (("accuracy", ok, base_ok, np.mean), ("fd", f, base_f, fd)):
            iv = paired_bootstrap_difference(a, b, stat, replicates=replicates, method="percentile")
            row[key] = [iv.estimate, iv.low, iv.high]
        out[name] = row
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a T2I run directory")
    p.add_argument("--classifier", required=True, help="train-classifier checkpoint trained on the real images")
    p.add_argument("--data", required=True, help="the captioned, labelled .npz the run trained on")
    p.add_argument("--samplers", default="euler_pf,dual_loop,look_ahead")
    p.add_argument("--nfe", type=int, default=20)
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--per-prompt", type=int, default=8)
    p.add_argument("--cap", type=int, default=8, help="held-out captions per category (at most)")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--exact-nfe",
        action="store_true",
        help="fail unless every sampler spends exactly --nfe (the budget is otherwise an upper bound)",
    )
    p.add_argument("--bootstrap", type=int, default=1000, help="replicates of the paired differences")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)

    cfg = load_config(Path(args.run) / "config.yaml")
    ds = CaptionedNpzDataset(args.data, resolution=cfg.data.resolution)
    _, val = split_train_val(ds, cfg.data.val_size)
    prompts, cats = balanced_prompts(ds, list(val.indices), args.cap)
    k = args.per_prompt
    categories = np.repeat(np.asarray(cats), k)
    print(f"{len(prompts)} held-out prompts ({len(prompts) // len(set(cats))} per category), {k} images each")

    model = load_model(args.run).eval()
    enc = load_text_encoder_for(args.run, model=model, device="cpu")
    clf = ClassifierFeatures(args.classifier)

    real = to_uint8_images(torch.stack([ds[i][0] for i in range(len(ds))]))
    n = len(categories)
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(real))
    real_a, real_b = real[perm[:n]], real[perm[n : 2 * n]]
    f_real_all = features(clf, real)
    floor = frechet_distance_from_features(features(clf, real_a), features(clf, real_b))
    acc_real = category_accuracy(real_a, ds.labels[perm[:n]], clf)

    results = {
        "cpu": cpu_model(),
        "run": str(args.run),
        "nfe": args.nfe,
        "cfg": args.cfg,
        "prompts": len(prompts),
        "images_per_sampler": n,
        "fd_floor_real_vs_real": floor,
        "real_accuracy": acc_real.accuracy,
        "samplers": {},
    }
    names = args.samplers.split(",")
    if args.exact_nfe:
        check_exact_nfe(names, args.nfe, args.cfg)
    per_image: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # sampler -> (correct (n,), features (n, d))
    for name in names:
        spec = GenerationSpec(
            num_samples=n, batch_size=64, seed=0, sampler=name, nfe=args.nfe, cfg_scale=args.cfg,
            prompts=prompts, samples_per_prompt=k,
        )  # fmt: skip
        t0 = time.perf_counter()
        images, _, res = sample_indices(model, spec, range(n), device=torch.device("cpu"), encoder=enc)
        seconds = time.perf_counter() - t0
        u8 = to_uint8_images(images)
        acc = category_accuracy(u8, categories, clf)
        f_gen = features(clf, u8)
        fd = frechet_distance_from_features(f_gen, f_real_all)
        per_image[name] = ((acc.predicted == categories).astype(np.float64), f_gen)
        results["samplers"][name] = {
            "nfe": res.nfe,
            "steps": res.steps,
            "accuracy": acc.accuracy,
            "ci95": list(acc.ci95),
            "chance": acc.chance,
            "chance_uniform": acc.chance_uniform,
            "fd_classifier": fd,
            "seconds": seconds,
        }
        rows = list(range(0, len(prompts), max(1, len(prompts) // 9)))[:9]
        sel = torch.cat([images[r * k : r * k + min(k, 6)] for r in rows])
        prompt_grid(
            sel, [prompts[r] for r in rows], out / f"{name}.png", title=f"{name} · {res.nfe} NFE · CFG {args.cfg:g}"
        )
        print(
            f"{name:12s} NFE {res.nfe:3d}  accuracy {acc.accuracy:.3f} [{acc.ci95[0]:.3f}, {acc.ci95[1]:.3f}] "
            f"(chance {acc.chance_uniform:.3f})  FD_classifier {fd:.2f} (floor {floor:.2f})  {seconds:.0f} s"
        )
    results["paired_vs_" + names[0]] = paired_differences(per_image, names, f_real_all, args.bootstrap)
    for other, d in results["paired_vs_" + names[0]].items():
        print(
            f"{other} - {names[0]}: accuracy {d['accuracy'][0]:+.3f} [{d['accuracy'][1]:+.3f}, {d['accuracy'][2]:+.3f}]  "
            f"FD {d['fd'][0]:+.2f} [{d['fd'][1]:+.2f}, {d['fd'][2]:+.2f}]  (paired bootstrap, 95 %)"
        )
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"real images: accuracy {acc_real.accuracy:.3f}; wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
