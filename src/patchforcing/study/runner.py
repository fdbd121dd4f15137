"""``run_study``: train every (arm, seed), sample every run with every sampler at every NFE, score, report.

The study folder::

    OUT/
      study.md, study.json            the table (FD per arm x sampler x NFE with 95 % intervals), all numbers
      figures/fd_vs_nfe.png           FD against NFE, one line per (arm, sampler), the floor dashed
      figures/val_loss_vs_t.png       EMA validation loss per segment of t, one line per arm
      figures/grid_nfe<N>.png         the first samples of every (arm, sampler): same noise and labels
      runs/<arm>-s<seed>/             ordinary run directories (`patchforcing train` layout; resumable)
      samples/<arm>-s<seed>/<sampler>-nfe<N>.npz (+ .json, .npz.parts/)   ADM .npz samples
      samples/<arm>-s<seed>/<sampler>+cache<A>[-random]-nfe<N>.npz   token-cached variants (PFT arms)
      figures/fd_vs_flops.png         FD against GFLOP per image (only with cached variants)
      classifier.pt                   the feature classifier (features "classifier")
      real/reference.npz, floor.npz   the held-out reference and the floor's images (uint8 NHWC arr_0)
      real/labels.txt                 the samples' labels (``patchforcing sample --classes``)
      eval/                           cached features
      study-settings.json             the spec and base config of the last invocation

Every step is resumable: a finished run (its ``study-run.json`` shows ``train.max_steps`` with
the same config) is skipped, an unfinished one continues from its ``last.pt`` (exactly: the
trainer's resume), finished sample files whose settings match are reused (changed settings, e.g.
a run trained further, are re-sampled), features are cached by what they depend on. Killing a
study and running the same command again therefore gives the same ``study.json`` (timings aside).

Fairness is asserted, not assumed: :func:`~patchforcing.study.spec.check_fair` on the configs
and :func:`check_shared_inputs` on the sampling specs (same seed, labels and count everywhere).

Under torchrun every rank trains (DDP) and samples its share; the group is then closed and rank 0
alone reads the real images, trains the classifier and scores, so no collective waits on that work.
"""

from __future__ import annotations

import csv
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..autoencoders import load_autoencoder_for
from ..checkpoints import load_model
from ..evaluation import train_classifier
from ..evaluation.classifier import load_classifier
from ..sampling.generate import GenerationSpec, ShardSettingsError, generate, model_sha256, sampling_settings
from ..training.config import ExperimentConfig, config_to_dict, save_config
from ..training.distributed import DistEnv, init_distributed, shutdown_distributed
from ..training.trainer import Trainer
from ..utils.io import RunLock, atomic_write, ensure_writable_dir, read_json, write_json_atomic
from .compare import cell_name, summarize
from .data import RealSets, check_held_out, data_identity, real_sets, sample_labels, write_real_sets
from .evaluate import bootstrap_fd, cached_features, fd, image_features, make_extractor, pr
from .report import write_figures, write_report
from .spec import Arm, CacheVariant, StudyError, StudySpec, arm_config, check_fair, run_id

__all__ = [
    "StudyRun",
    "plan_runs",
    "check_study",
    "generation_spec",
    "check_shared_inputs",
    "gflops_per_image",
    "run_study",
    "STUDY_FORMAT",
]

STUDY_FORMAT = "patchforcing-study"
_RUN_INFO = "study-run.json"


@dataclass
class StudyRun:
    """One (arm, seed) of a study: its config and run directory."""

    arm: Arm
    seed_offset: int
    cfg: ExperimentConfig
    dir: Path

    @property
    def id(self) -> str:
        return run_id(self.arm, self.cfg.train.seed)


def plan_runs(base: ExperimentConfig, spec: StudySpec, out: Path) -> list[StudyRun]:
    """The runs of a study, checked to be comparable (:func:`check_fair`)."""
    runs = [
        StudyRun(arm, j, cfg, out / "runs" / run_id(arm, cfg.train.seed))
        for arm in spec.arms
        for j in spec.seed_offsets
        for cfg in [arm_config(base, arm, j)]
    ]
    check_fair(r.cfg for r in runs)
    return runs


def generation_spec(
    spec: StudySpec, classes: list[int], sampler: str, nfe: int, variant: CacheVariant | None = None
) -> GenerationSpec:
    """The sampling spec of one (sampler, NFE) cell: the study's seed, labels (sample ``i`` gets
    ``classes[i % len(classes)]``) and count, always.

    With a cached ``variant`` (of ``sampler``): the same spec plus the variant's token cache
    (its random choice seeded by the study's sample seed)."""
    return GenerationSpec(
        num_samples=spec.num_samples,
        batch_size=spec.batch_size,
        seed=spec.sample_seed,
        sampler=sampler,
        nfe=nfe,
        classes=list(classes),
        options=spec.options_of(sampler),
        cache=None if variant is None else variant.token_cache(spec.sample_seed),
        precision=spec.sample_precision,
    )


def gflops_per_image(info: dict[str, Any], key: str = "token_flops") -> float | None:
    """GFLOP per image of a sample file's ``.json`` record: ``info[key]`` (``"token_flops"``
    spent, ``"full_flops"`` the same calls done densely) over the images that run made
    (``images_generated_this_run``, the FLOPs being those of that run; ``num_samples`` when the
    record has no count), divided by 1e9. ``None`` when the model's cost is unknown."""
    flops = info.get(key)
    made = info.get("images_generated_this_run", info.get("num_samples"))
    if flops is None or not made:
        return None
    return float(flops) / float(made) / 1e9


def check_shared_inputs(specs: list[GenerationSpec]) -> None:
    """Every cell gets the same noise and labels: same seed, label rule, classes and count.

    Raises:
        StudyError: naming what differs (a bug in the study, never a user error)."""
    keys = ("seed", "labels", "classes", "num_samples", "cfg_scale", "guidance_interval", "precision")
    for s in specs[1:]:
        diff = [k for k in keys if getattr(s, k) != getattr(specs[0], k)]
        if diff:
            raise StudyError(f"internal error: sampling cells differ in {diff}; their noise or labels would differ")


def check_study(base: ExperimentConfig, spec: StudySpec) -> None:
    """What can be checked before any training: held-out images exist, the features can be made.

    Raises:
        StudyError: naming the problem."""
    check_held_out(base)
    if spec.features == "classifier" and (base.data.kind == "latents" or base.autoencoder.online):
        raise StudyError(
            "features 'classifier' trains a classifier on pixel images, but this config trains on latents; "
            "give --features classifier:PATH or --features inception"
        )
    if spec.features.startswith("classifier:") and not Path(spec.features.split(":", 1)[1]).expanduser().is_file():
        raise StudyError(f"--features {spec.features}: no such classifier checkpoint")
    if spec.features == "inception":
        make_extractor("inception", None, spec.inception_weights, "cpu")  # torch-fidelity and weights present


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------


def _release(trainer: Trainer, env: DistEnv) -> None:
    if env.distributed:  # keep the process group for the next run; free the models, release the lock
        trainer.ddp = trainer.forward = trainer.model = trainer.ema = trainer.optimizer = None
        trainer._release_lock()
    else:
        trainer.close()


def _train(run: StudyRun, env: DistEnv, log: Callable[[str], None]) -> dict[str, Any]:
    """Train (or continue, or skip) one run; returns its ``study-run.json`` record."""
    info_path = run.dir / _RUN_INFO
    last = run.dir / "checkpoints" / "last.pt"
    want = config_to_dict(run.cfg)
    info = read_json(info_path) if info_path.is_file() else {}
    if last.is_file() and info.get("config") == want and info.get("step") == run.cfg.train.max_steps:
        log(f"  {run.id}: finished ({info['step']} steps), skipped")
        return info
    resume = last.is_file()
    if not resume and run.dir.exists() and env.is_main:  # killed before its first checkpoint: nothing to keep
        log(f"  {run.id}: removing an unfinished run without a checkpoint")
        shutil.rmtree(run.dir)
    _barrier(env)
    log(f"  {run.id}: {'continuing' if resume else 'training'} {run.cfg.model.name} -> {run.dir}")
    t0 = time.perf_counter()
    trainer = Trainer(run.cfg, run.dir, resume=resume, env=env)
    try:
        result = trainer.fit()
    finally:
        _release(trainer, env)
    seconds = float(info.get("train_seconds", 0.0)) + time.perf_counter() - t0
    if result.interrupted:
        raise KeyboardInterrupt(
            f"training of {run.id} stopped at step {result.step} (checkpoint kept); run the same command to continue"
        )
    info = {"run": run.id, "step": result.step, "train_seconds": seconds, "config": want}
    if env.is_main:
        write_json_atomic(info_path, info)
    return info


# --------------------------------------------------------------------------------------------
# features: the classifier, the real images, the samples
# --------------------------------------------------------------------------------------------


def _classifier(spec: StudySpec, out: Path, real: RealSets, base: ExperimentConfig, log) -> Path | None:
    """The study's classifier (trained on the training split, never on the reference), if any."""
    if spec.features != "classifier":
        return None
    if real.classifier_data is None:
        raise StudyError(
            "features 'classifier' trains a classifier on the training images, but this data has no pixel images "
            "with >= 2 classes (latent data?); give --features classifier:PATH or --features inception"
        )
    path = out / "classifier.pt"
    want = {"data": data_identity(base), "split": "train", "val_size": base.data.val_size}
    if path.is_file():
        _, info = load_classifier(path)
        t = info.get("train") or {}
        same = (
            t.get("data") == want
            and t.get("epochs") == spec.classifier_epochs
            and (info.get("config") or {}).get("width") == spec.classifier_width
        )
        if same:
            log(f"  classifier: {path} (held-out accuracy {info.get('accuracy')})")
            return path
    log(f"  classifier: training on {len(real.classifier_data)} training images ({spec.classifier_epochs} epochs)")
    res = train_classifier(
        real.classifier_data,
        path,
        epochs=spec.classifier_epochs,
        width=spec.classifier_width,
        seed=0,
        data_spec=want,
        log=None,
    )
    log(f"  classifier: held-out accuracy {res.accuracy:.3f} ({res.num_val} images, {res.seconds:.0f} s)")
    return path


def _decoder(run_dir: Path, model: torch.nn.Module, device: torch.device):
    ae = load_autoencoder_for(run_dir, None, model=model, device=device)
    if ae.spec.kind == "identity":
        return None, None
    return ae.decode, ae.spec.to_dict()


def _val_by_t(run_dir: Path) -> list[float] | None:
    """The EMA validation loss per t-segment of the run's last validation (``metrics.csv``)."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return None
    last = None
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("val_seg0"):
                last = row
    if last is None:
        return None
    segs = sorted((k for k in last if k.startswith("val_seg") and last[k]), key=lambda k: int(k[7:]))
    return [float(last[k]) for k in segs]


def _images_per_sec(run_dir: Path) -> float | None:
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        values = [float(r["images_per_sec"]) for r in csv.DictReader(f) if r.get("images_per_sec")]
    return float(np.median(values)) if values else None


def _silent(message: str) -> None:
    del message


def _barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


# --------------------------------------------------------------------------------------------
# the study
# --------------------------------------------------------------------------------------------


def run_study(
    base: ExperimentConfig,
    spec: StudySpec,
    out: str | Path,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
    after_run: Callable[[StudyRun], None] | None = None,
) -> Path:
    """Run (or continue) a study in ``out``; returns the path of ``study.md``.

    Args:
        base: the base config (a preset with overrides); the arms change only model family and
            timestep sampler (:func:`~patchforcing.study.spec.arm_config`).
        spec: arms, seeds, samplers, NFE budgets, evaluation settings.
        progress: progress bars of training and sampling.
        after_run: called after each (arm, seed) run is trained or skipped (e.g. to stop a test).
    Raises:
        StudyError: an invalid or unfair study, before any training.
        KeyboardInterrupt: a run was interrupted (its checkpoint is kept; rerun to continue).
    """
    out = Path(out)
    check_study(base, spec)
    runs = plan_runs(base, spec, out)  # refuses unfair arms before anything is written
    env = init_distributed(base.train.device)
    if not env.is_main:  # one report per study, from rank 0
        log = _silent
    ensure_writable_dir(out, "study directory")
    lock = RunLock(out, ".study.lock").acquire() if env.is_main else None  # one study process per folder
    device = env.device
    t_start = time.perf_counter()
    try:
        if env.is_main:
            write_json_atomic(
                out / "study-settings.json",
                {"format": STUDY_FORMAT, "spec": spec.to_dict(), "config": config_to_dict(base)},
            )
            atomic_write(out / "base-config.yaml", lambda tmp: save_config(base, tmp))
        labels = sample_labels(base, spec.sample_seed)  # every rank, before training: no images decoded
        if spec.features == "classifier" and labels.num_classes < 2:
            raise StudyError(
                f"features 'classifier' trains a classifier on the training labels, but this data has "
                f"{labels.num_classes} class(es); give --features classifier:PATH or --features inception"
            )
        log(f"[1/4] training {len(runs)} run(s): {', '.join(r.id for r in runs)}")
        infos: dict[str, dict[str, Any]] = {}
        for run in runs:
            infos[run.id] = _train(run, env, log)
            if after_run is not None:
                after_run(run)
        steps = {i["step"] for i in infos.values()}
        if len(steps) > 1:
            raise StudyError(f"the runs were trained for different numbers of steps: {sorted(steps)}")

        log(f"[2/4] sampling {spec.num_samples} images per run, sampler and NFE ({', '.join(map(str, spec.nfe))})")
        gspecs = {(s, n): generation_spec(spec, labels.classes, s, n) for s in spec.samplers_of_any() for n in spec.nfe}
        gspecs |= {
            (v.name, n): generation_spec(spec, labels.classes, v.sampler, n, v)
            for v in spec.cache_variants()
            for n in spec.nfe
        }
        check_shared_inputs(list(gspecs.values()))
        cells: list[dict[str, Any]] = []
        t_sample = time.perf_counter()
        for run in runs:
            model = load_model(run.dir, map_location="cpu").to(device).eval()
            decode, decode_meta = _decoder(run.dir, model, device)
            meta = {"model_sha256": model_sha256(model), "run": run.id, "decode": decode_meta}
            variants = [(s, None) for s in spec.samplers_for(run.arm)]
            variants += [(v.name, v) for v in spec.cache_variants_for(run.arm)]
            for name, variant in variants:
                for nfe in spec.nfe:
                    gs = gspecs[(name, nfe)]
                    path = out / "samples" / run.id / f"{name}-nfe{nfe}.npz"
                    info = _sample(model, gs, path, decode, meta, env, device, progress, log, run.id, name)
                    cell = {
                        "run": run.id,
                        "arm": run.arm.name,
                        "seed": run.cfg.train.seed,
                        "sampler": gs.sampler,
                        "nfe_budget": nfe,
                        "nfe": info.get("nfe"),
                        "steps": info.get("steps"),
                        "options": info.get("options"),
                        "path": str(path.relative_to(out)),
                        "settings": info.get("settings"),
                        "gflops_per_image": gflops_per_image(info),
                    }
                    if variant is not None:
                        cell |= {
                            "variant": name,
                            "cache": gs.cache.options(),
                            "dense_gflops_per_image": gflops_per_image(info, "full_flops"),
                        }
                    cells.append(cell)
            del model
        sample_seconds = time.perf_counter() - t_sample

        # Rank 0 alone reads the real images, trains the classifier and scores (minutes to hours at
        # ImageNet scale): the other ranks leave now, and the group is closed so that no collective
        # waits on rank 0 past the backend's timeout.
        if env.distributed:
            shutdown_distributed()
        if not env.is_main:
            return out / "study.md"
        log(f"[3/4] real images: held-out reference and floor (data: {base.data.kind})")
        real = real_sets(base, spec.num_samples, spec.sample_seed, device=device, labels=labels)
        write_real_sets(out / "real", real, spec.num_samples)
        clf = _classifier(spec, out, real, base, log)
        log("[4/4] scoring: features, Fréchet distances, bootstrap intervals, report")
        extractor = make_extractor(spec.features, clf, spec.inception_weights, device)
        fmeta = extractor.describe()
        if clf is not None:  # the weights' content (a torch file's bytes also depend on its temporary name)
            fmeta["weights_sha256"] = model_sha256(extractor.model)
        if clf is not None and Path(clf).resolve().parent == out.resolve():
            fmeta["checkpoint"] = Path(clf).name  # the study's own classifier: relative to the study folder
        real_meta = {"features": fmeta, "data": data_identity(base), "real": real.describe(), "seed": spec.sample_seed}
        ref_f = cached_features(
            out / "eval" / "reference.npz",
            real_meta | {"set": "reference"},
            lambda: image_features(real.reference, extractor),
        )
        floor_f = cached_features(
            out / "eval" / "floor.npz", real_meta | {"set": "floor"}, lambda: image_features(real.floor, extractor)
        )
        feats: dict[int, np.ndarray] = {}
        for i, c in enumerate(cells):
            meta = {"features": fmeta, "settings": c["settings"], "num_samples": spec.num_samples}
            p = out / c["path"]
            feats[i] = cached_features(
                out / "eval" / c["run"] / f"{cell_name(c)}-nfe{c['nfe_budget']}.npz",
                meta,
                lambda p=p: image_features(p, extractor),
            )
        for i, c in enumerate(cells):
            c["fd"] = fd(feats[i], ref_f)
            c.update({k: v for k, v in pr(feats[i], ref_f, spec.k).items()})
        floor = {"fd": fd(floor_f, ref_f), **pr(floor_f, ref_f, spec.k), "n": int(len(floor_f))}
        sets = {("floor",): floor_f} | {("cell", i): feats[i] for i in feats}
        t_boot = time.perf_counter()
        reps = bootstrap_fd(sets, ref_f, spec.bootstrap, seed=spec.sample_seed)
        boot_seconds = time.perf_counter() - t_boot
        for i, c in enumerate(cells):
            c["replicates"] = reps[("cell", i)]
        floor["replicates"] = reps[("floor",)]

        accuracy = None
        if clf is not None:
            accuracy = load_classifier(clf)[1].get("accuracy")
        run_rows = {
            r.id: {
                "arm": r.arm.name,
                "family": r.arm.family,
                "timestep_sampler": r.arm.timestep_sampler,
                "model": r.cfg.model.name,
                "seed": r.cfg.train.seed,
                "steps": infos[r.id]["step"],
                "val_loss_by_t": _val_by_t(r.dir),
            }
            for r in runs
        }
        timing = {
            "runs": {
                r.id: {"train_seconds": infos[r.id].get("train_seconds"), "images_per_sec": _images_per_sec(r.dir)}
                for r in runs
            },
            "sampling_seconds_this_invocation": sample_seconds,
            "bootstrap_seconds": boot_seconds,
            "total_seconds_this_invocation": time.perf_counter() - t_start,
        }
        summary = summarize(
            spec=spec,
            base=base,
            cells=cells,
            floor=floor,
            runs=run_rows,
            features=fmeta | {"held_out_accuracy": accuracy},
            real=real.describe(),
            timing=timing,
        )
        summary["format"] = STUDY_FORMAT
        write_json_atomic(out / "study.json", _jsonable(summary))
        write_figures(out, summary, spec)
        md = write_report(out, summary)
        log(f"done: {md}")
        return md
    finally:
        if lock is not None:
            lock.release()
        if env.distributed:
            shutdown_distributed()


def _sample(
    model, gs, path: Path, decode, meta, env: DistEnv, device, progress: bool, log, rid: str, name: str | None = None
) -> dict:
    """Generate one cell (or reuse it when its file matches the settings); returns its ``.json`` record."""
    settings = sampling_settings(model, gs, decode=decode, meta=meta)
    info_path = path.with_suffix(".json")
    if path.is_file() and info_path.is_file():
        info = read_json(info_path)
        if info.get("settings") == settings and info.get("num_samples") == gs.num_samples:
            return info
    log(f"  {rid}: {name or gs.sampler} at {gs.nfe} NFE -> {path}")
    kwargs = dict(
        decode=decode,
        rank=env.rank,
        world_size=env.world_size,
        device=device,
        barrier=(lambda: dist.barrier()) if env.distributed else None,
        progress=progress,
        meta=meta,
    )
    try:
        generate(model, gs, path, **kwargs)
    except ShardSettingsError:  # samples of an earlier state (e.g. a run trained further): redo them
        log(f"  {rid}: {path.name} was made with other settings; re-sampling it")
        generate(model, gs, path, overwrite=True, **kwargs)
    _barrier(env)
    return read_json(info_path)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [_jsonable(v) for v in obj.tolist()]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
