"""``patchforcing <command>``: argument parsing only; each command calls one library function.

Errors a user can fix (a bad config, a missing file, a checkpoint that does not fit) are
printed as one clear message with exit status 2, never as a stack trace.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["main", "build_parser"]


def _cmd_train(args: argparse.Namespace) -> int:
    from .training.config import load_config
    from .training.trainer import train

    overrides = list(args.overrides)
    for flag, key in (("max_steps", "train.max_steps"), ("ckpt_every", "train.ckpt_every"), ("seed", "train.seed")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    cfg = load_config(args.config, overrides)
    out = Path(args.out) if args.out else Path("runs") / cfg.name
    result = train(cfg, out, resume=args.resume)
    if result.last_checkpoint is not None:
        state = "interrupted" if result.interrupted else "finished"
        print(f"{state} at step {result.step}; checkpoint: {result.last_checkpoint}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .checkpoints import export_run

    path = export_run(args.run, args.out, use_ema=not args.raw)
    print(f"wrote {path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    run_demo(args.out, overrides, nfe=args.nfe, num_eval=args.num_eval)
    return 0


def _sampler_options(args: argparse.Namespace) -> dict:
    opts = {}
    for name in ("p", "n_inner", "context_ratio", "early_t"):
        value = getattr(args, name, None)
        if value is not None:
            opts[name] = value
    return opts


def _cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from .autoencoders import load_autoencoder_for
    from .checkpoints import load_model
    from .sampling.generate import GenerationSpec, generate, sample_labels, sample_noise
    from .training.distributed import init_distributed, shutdown_distributed

    if args.steps is not None and args.nfe is not None:
        raise ValueError("give --steps or --nfe, not both")
    env = init_distributed(args.device)
    model = load_model(args.checkpoint, map_location="cpu").to(env.device)
    ae = load_autoencoder_for(args.checkpoint, args.vae, model=model, device=env.device)
    decode = None if ae.spec.kind == "identity" else ae.decode
    classes = [int(c) for c in args.classes.split(",")] if args.classes else None
    spec = GenerationSpec(
        num_samples=args.num_samples, batch_size=args.batch_size, seed=args.seed, sampler=args.sampler,
        steps=args.steps, nfe=args.nfe, cfg_scale=args.cfg,
        guidance_interval=tuple(args.guidance_interval) if args.guidance_interval else None,
        labels=args.labels, classes=classes, shard_size=args.shard_size, options=_sampler_options(args))
    out = Path(args.out)
    try:
        if out.suffix.lower() in (".png", ".jpg", ".jpeg"):
            if env.world_size > 1:
                raise ValueError("a picture output is made by one process; use an .npz output under torchrun")
            from .sampling import sample
            from .viz import save_grid

            idx = list(range(spec.num_samples))
            noise = sample_noise(spec.seed, idx, (model.in_channels, *model.image_size)).to(env.device)
            y = sample_labels(spec, idx, model.num_classes)
            res = sample(model, noise, spec.sampler, spec.steps, nfe=spec.nfe,
                         y=None if y is None else y.to(env.device), cfg_scale=spec.cfg_scale,
                         guidance_interval=spec.guidance_interval, progress=True, **spec.options)
            images = decode(res.x) if decode else res.x
            save_grid(images, out)
            print(f"wrote {out}: {spec.num_samples} samples, sampler {res.sampler}, {res.steps} steps, "
                  f"{res.nfe} NFE, {spec.num_samples / res.seconds:.2f} images/s")
        elif out.suffix.lower() == ".npz":
            barrier = None
            if env.distributed:
                import torch.distributed as dist

                barrier = dist.barrier
            with torch.no_grad():
                path = generate(model, spec, out, decode=decode, rank=env.rank, world_size=env.world_size,
                                device=env.device, barrier=barrier, progress=True,
                                meta={"checkpoint": str(args.checkpoint), "vae": ae.spec.to_dict()})
            if path is not None:
                info = out.with_suffix(".json")
                print(f"wrote {path} ({spec.num_samples} samples) and {info}")
        else:
            raise ValueError(f"--out must end in .png or .npz, got {out}")
    finally:
        model = None
        shutdown_distributed()
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from .models import list_models

    print("\n".join(list_models()))
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    from .training.config import list_presets, preset_path

    for name in list_presets():
        print(f"{name:24s} {preset_path(name)}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    from .evaluation import EvaluationError, evaluate, format_results

    try:
        result = evaluate(
            args.samples,
            args.ref,
            metrics=args.metrics,
            features=args.features,
            batch_size=args.batch_size,
            k=args.k,
            is_split_size=args.is_split_size,
            is_splits=args.is_splits,
            device=args.device,
            inception_weights=args.inception_weights,
            cache=args.cache,
            use_reference_stats=not args.recompute_reference_stats,
            progress=None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True)),
        )
    except EvaluationError as e:
        print(f"patchforcing {args.command}: error: {e}", file=sys.stderr)
        return 2
    print(format_results(result))
    if args.out:
        from .checkpoints import atomic_write

        text = json.dumps(result, indent=2, default=str) + "\n"
        path = atomic_write(args.out, lambda tmp: Path(tmp).write_text(text))
        print(f"wrote {path}")
    return 0


def _classifier_data_spec(args: argparse.Namespace) -> dict:
    """The data spec of ``train-classifier``: DATA (``synthetic``, a folder, an .npz, or a YAML
    config/preset whose ``data`` section is used) or --data-kind/--data-path; flags override."""
    from .evaluation import EvaluationError

    spec: dict = {}
    data = args.data
    if data is not None:
        p = Path(data).expanduser()
        if data.lower() in ("synthetic", "shapes"):
            spec["kind"] = "synthetic"
        elif p.is_dir():
            spec.update(kind="folder", path=str(p))
        elif p.suffix.lower() in (".npz", ".npy"):
            spec.update(kind="npz", path=str(p))
        elif p.suffix.lower() in (".yaml", ".yml") or (p.suffix == "" and "/" not in data):
            from .training.config import load_config

            d = load_config(data).data
            if d.kind not in ("synthetic", "folder", "npz"):
                raise EvaluationError(f"{data}: data.kind {d.kind!r} is not an image data set (synthetic, folder or npz)")
            spec.update(kind=d.kind, resolution=d.resolution, seed=d.seed)
            if d.kind == "synthetic":
                spec.update(num_classes=d.num_classes or 8, length=d.length or 10_000)
            else:
                spec.update(path=d.path, flip=d.flip)
                if d.num_classes is not None:
                    spec["num_classes"] = d.num_classes
        else:
            raise EvaluationError(f"DATA {data!r} is not 'synthetic', an image folder, an .npz or a config file")
    if args.data_kind is not None:
        if spec and spec.get("kind") != args.data_kind:
            spec = {}
        spec["kind"] = args.data_kind
    if args.data_path is not None:
        spec["path"] = args.data_path
    if not spec:
        raise EvaluationError("give DATA (synthetic, a folder, an .npz or a config) or --data-kind [--data-path]")
    for flag, key in (("resolution", "resolution"), ("num_classes", "num_classes"), ("length", "length")):
        value = getattr(args, flag)
        if value is not None:
            spec[key] = value
    if spec.get("kind") == "folder" and "resolution" not in spec:
        spec["resolution"] = 32
    return spec


def _cmd_train_classifier(args: argparse.Namespace) -> int:
    from .data import build_dataset
    from .evaluation import EvaluationError, train_classifier

    try:
        spec = _classifier_data_spec(args)
        dataset = build_dataset(spec)
        print(f"data: {spec} -> {len(dataset)} images, {dataset.num_classes} classes, "
              f"{dataset.resolution} px", file=sys.stderr)
        result = train_classifier(
            dataset, args.out, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, width=args.width,
            val_fraction=args.val_fraction, max_steps=args.max_steps, seed=args.seed, device=args.device,
            data_spec=spec, log=lambda msg: print(msg, file=sys.stderr, flush=True),
        )
    except EvaluationError as e:
        print(f"patchforcing {args.command}: error: {e}", file=sys.stderr)
        return 2
    print(f"held-out accuracy {result.accuracy:.4f} ({result.num_val} items, {result.steps} steps, "
          f"{result.seconds:.0f} s); wrote {result.path}")
    return 0


def _cmd_encode(args: argparse.Namespace) -> int:
    import os

    from .latents import LatentStoreError, encode_source, verify_latent_store

    if args.verify:
        index = verify_latent_store(args.out)
        print(f"{args.out}: {index['num_items']} latents {tuple(index['latent_shape'])} in {len(index['shards'])} "
              "shards: counts and sha256 checksums verified")
        return 0
    if not args.source or not args.vae:
        raise LatentStoreError("give IMAGE_SOURCE and --vae (or --verify to check an existing --out)")
    try:
        result = encode_source(
            args.source, args.out, args.vae, resolution=args.resolution, flip=args.flip, batch_size=args.batch_size,
            shard_size=args.shard_size, dtype=args.dtype, scaling=args.scaling, vae_kind=args.vae_kind,
            device=args.device, num_workers=args.num_workers, overwrite=args.overwrite, progress=not args.quiet,
        )
    except KeyboardInterrupt:
        print("patchforcing encode: interrupted; the finished shards are kept: run the same command again "
              "to resume", file=sys.stderr)
        return 130
    if int(os.environ.get("RANK", "0")) == 0:
        idx = result.index
        print(f"encoded {len(result.encoded_shards)} shard(s) here ({result.images} images, "
              f"{result.images_per_sec:.1f} images/s), skipped {len(result.skipped_shards)} finished; "
              f"{idx['num_items']} latents {tuple(idx['latent_shape'])}, {idx['num_classes']} classes, "
              f"index: {result.out / 'index.json'}")
    return 0


def _device(pref: str):
    import torch

    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(pref)


def _cmd_viz(args: argparse.Namespace) -> int:
    from .autoencoders import load_autoencoder_for
    from .checkpoints import load_model
    from .trajectory import render_trajectory

    if args.class_ is not None and args.labels != "uniform":
        raise ValueError("give --class or --labels, not both")
    device = _device(args.device)
    model = load_model(args.checkpoint, map_location="cpu").to(device)
    ae = load_autoencoder_for(args.checkpoint, args.vae, model=model, device=device)
    decode = None if ae.spec.kind == "identity" else ae.decode
    res = render_trajectory(
        model, args.out, sampler=args.sampler, steps=args.steps, nfe=args.nfe, cfg_scale=args.cfg,
        guidance_interval=tuple(args.guidance_interval) if args.guidance_interval else None,
        labels=args.labels, classes=None if args.class_ is None else [args.class_], seed=args.seed,
        index=args.index, every=args.every, overview=args.overview, num_images=args.num_images,
        num_steps=args.num_steps, decode=decode, options=_sampler_options(args), progress=True)
    k = res.every
    nth = f"{k}{'th' if 10 <= k % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(k % 10, 'th')}"
    stride = f"all {res.calls} calls" if k == 1 else f"every {nth} of {res.calls} calls, and the last"
    what = {"sheet": f"{res.shown} rows ({stride})", "gif": f"{res.shown} frames ({stride})",
            "overview": f"{len(res.indices)} samples x {res.shown} steps"}[res.kind]
    print(f"wrote {res.path}: sample{'s' if len(res.indices) > 1 else ''} "
          f"{','.join(map(str, res.indices))}, sampler {res.sampler}, {res.steps} steps, {res.nfe} NFE; {what}")
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from .analysis import analyze, format_table, resolve_data
    from .autoencoders import autoencoder_spec_from_checkpoint, load_autoencoder_for
    from .checkpoints import load_model

    device = _device(args.device)
    model = load_model(args.checkpoint, map_location="cpu").to(device)
    ts = [float(v) for v in args.t_bins.split(",") if v.strip()]
    stored = autoencoder_spec_from_checkpoint(args.checkpoint)
    pixel = (stored is not None and stored.kind == "identity") or (stored is None and model.in_channels == 3)
    if pixel and args.vae:
        raise ValueError(f"{args.checkpoint} is a pixel-space model; it needs no --vae")
    # latent models: the VAE is loaded only if the data are images that must be encoded
    autoencoder = None if pixel else (lambda: load_autoencoder_for(args.checkpoint, args.vae, model=model,
                                                                   device=device))
    data, info = resolve_data(args.data, model, autoencoder=autoencoder, num_images=args.num_images)
    result = analyze(model, data, args.out, num_images=args.num_images, t_values=ts,
                     context_share=args.context_share, context_move=args.context_move, context_t=args.context_t,
                     batch_size=args.batch_size, seed=args.seed, use_labels=not args.no_labels,
                     autoencoder=autoencoder, data_info={**info, "checkpoint": str(args.checkpoint)},
                     progress=not args.quiet)
    print(format_table(result))
    files = ", ".join(result["files"].values())
    print(f"wrote {Path(args.out)}/: {files}")
    return 0


def _add_sampling_args(p: argparse.ArgumentParser, default_sampler: str, steps_help: str | None = None) -> None:
    """The sampler options shared by ``sample`` and ``viz``."""
    p.add_argument("checkpoint", help="released .ckpt, exported .safetensors, run directory or training checkpoint")
    p.add_argument("--sampler", default=default_sampler, choices=["euler", "euler_pf", "dual_loop", "look_ahead"])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, help=steps_help)
    g.add_argument("--nfe", type=int, help="NFE budget per image: the largest step count that fits")
    p.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LO", "HI"))
    p.add_argument("--p", type=float, help="quantile of certain patches (dual_loop, look_ahead)")
    p.add_argument("--n-inner", type=int, help="inner steps of uncertain patches (dual_loop)")
    p.add_argument("--context-ratio", type=float, help="look-ahead time ratio r (look_ahead)")
    p.add_argument("--early-t", type=float, help="plain Euler while s <= this (look_ahead, default 0.05)")
    p.add_argument("--vae", help="VAE hub id or local directory (latent models; overrides the stored one)")
    p.add_argument("--device", default="auto")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="patchforcing", description="Patch Forcing: train, sample, evaluate.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a model from a YAML config (works under torchrun)",
                       description="Train from CONFIG (a YAML file or a preset name, see `patchforcing presets`). "
                                   "Extra KEY=VALUE arguments override config entries, e.g. optim.lr=3e-4.")
    t.add_argument("config")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    t.add_argument("--out", help="run directory (default runs/<config name>)")
    t.add_argument("--max-steps", type=int)
    t.add_argument("--ckpt-every", type=int)
    t.add_argument("--seed", type=int)
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("export", help="write a run's EMA weights + config to one .safetensors file")
    e.add_argument("run", help="run directory or training checkpoint")
    e.add_argument("--out", required=True)
    e.add_argument("--raw", action="store_true", help="export the raw (non-EMA) weights")
    e.set_defaults(func=_cmd_export)

    d = sub.add_parser("demo", help="train a small PFT on built-in data (CPU, ~10 min) and compare samplers")
    d.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    d.add_argument("--out", default="demo-out")
    d.add_argument("--max-steps", type=int)
    d.add_argument("--nfe", type=int, default=24, help="NFE budget per image for every sampler")
    d.add_argument("--num-eval", type=int, default=512, help="samples per sampler for the quality figure")
    d.set_defaults(func=_cmd_demo)

    ev = sub.add_parser(
        "eval", help="FID, sFID, IS, precision/recall of a sample .npz against a reference",
        description="Score SAMPLES (an .npz with uint8 NHWC arr_0, as ADM writes them; an .npy; or an image "
                    "folder) against REF: an ADM reference batch (its stored mu/sigma, mu_s/sigma_s are used for "
                    "FID/sFID, its images for precision/recall), an .npz of images (arr_0 or images) or an image "
                    "folder (any layout; centre-cropped to the samples' resolution). Definitions follow the ADM "
                    "evaluator: Inception-v3 pool3 FID, mixed_6/conv sFID, IS over splits of 5000, k=3 "
                    "precision/recall. --features classifier:CKPT computes the same statistics in a small "
                    "classifier's feature space (see train-classifier), reported as FD_classifier etc., not FID.")
    ev.add_argument("samples", help="samples .npz / .npy / image folder")
    ev.add_argument("--ref", required=True, help="reference: ADM .npz, .npz of images, or image folder")
    ev.add_argument("--metrics", default="fid,sfid,is,precision,recall",
                    help="comma list of fid, sfid, is, precision, recall (default: all)")
    ev.add_argument("--features", default="inception", help="inception (needs torch-fidelity) or classifier:CKPT")
    ev.add_argument("--inception-weights", metavar="FILE",
                    help="local torch-fidelity Inception weights (weights-inception-2015-12-05-6726825d.pth); "
                         "default: torch-fidelity downloads them")
    ev.add_argument("--batch-size", type=int, default=100)
    ev.add_argument("--k", type=int, default=3, help="neighbourhood size of precision/recall (default 3)")
    ev.add_argument("--is-split-size", type=int, default=5000, help="samples per Inception Score split (ADM: 5000)")
    ev.add_argument("--is-splits", type=int, help="instead: this many equal Inception Score splits")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--cache", metavar="NPZ", help="cache file for the reference's features (off by default)")
    ev.add_argument("--recompute-reference-stats", action="store_true",
                    help="ignore an ADM reference batch's stored statistics and compute them from its images")
    ev.add_argument("--out", help="write the results as JSON here")
    ev.add_argument("--quiet", action="store_true", help="no progress messages")
    ev.set_defaults(func=_cmd_eval)

    tc = sub.add_parser(
        "train-classifier", help="train a small CNN whose features stand in for Inception on small data sets",
        description="Train a small classifier (4 conv blocks, GroupNorm, global pool, linear) on DATA and save "
                    "a weights_only-loadable checkpoint for `patchforcing eval --features classifier:CKPT`. DATA "
                    "is 'synthetic', an image folder, an .npz, or a YAML config / preset (its data section); "
                    "or give --data-kind and --data-path.")
    tc.add_argument("data", nargs="?", help="synthetic | FOLDER | FILE.npz | CONFIG.yaml | preset name")
    tc.add_argument("--out", required=True, help="checkpoint file to write")
    tc.add_argument("--data-kind", choices=("synthetic", "folder", "npz"))
    tc.add_argument("--data-path")
    tc.add_argument("--resolution", type=int, help="image side (default: the data's; 32 for folders)")
    tc.add_argument("--num-classes", type=int, help="synthetic: number of classes (default 8)")
    tc.add_argument("--length", type=int, help="synthetic: number of images (default 10000)")
    tc.add_argument("--epochs", type=int, default=5)
    tc.add_argument("--max-steps", type=int, help="stop after this many optimiser steps")
    tc.add_argument("--batch-size", type=int, default=128)
    tc.add_argument("--lr", type=float, default=2e-3)
    tc.add_argument("--width", type=int, default=32, help="channels of the first conv block")
    tc.add_argument("--val-fraction", type=float, default=0.1, help="share of the data held out for accuracy")
    tc.add_argument("--seed", type=int, default=0)
    tc.add_argument("--device", default="cpu")
    tc.set_defaults(func=_cmd_train_classifier)

    en = sub.add_parser(
        "encode", help="encode images into sharded VAE latents for training (works under torchrun)",
        description="Encode IMAGE_SOURCE (an ImageNet-layout folder, ADM centre crop, or an .npz of uint8 NHWC "
                    "images with labels) with a VAE into --out: safetensors shards of posterior mean/std + "
                    "labels and an index.json with counts, sha256 checksums, the VAE and its latent scaling. "
                    "Under torchrun the shards are split across ranks; running the same command again "
                    "resumes (finished, intact shards are skipped). Train with data.kind=latents data.path=OUT.")
    en.add_argument("source", nargs="?", metavar="IMAGE_SOURCE", help="image folder or .npz")
    en.add_argument("--vae", help="hub id (stabilityai/sd-vae-ft-ema) or local diffusers VAE folder")
    en.add_argument("--out", required=True, metavar="LATENT_DIR")
    en.add_argument("--resolution", type=int, default=256, help="image side before encoding (default 256)")
    en.add_argument("--flip", action="store_true", help="also store the posterior of each mirrored image")
    en.add_argument("--batch-size", type=int, default=32, help="images per VAE call (default 32)")
    en.add_argument("--shard-size", type=int, default=2048, help="items per shard, the resume unit (default 2048)")
    en.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"),
                    help="storage type of mean/std (default float16)")
    en.add_argument("--scaling", default="vae", choices=("vae", "per-channel"),
                    help="latent scaling stored in the index: the VAE's factor (0.18215 for the SD VAE) or "
                         "per-channel mean/std of the encoded data")
    en.add_argument("--vae-kind", default="auto", choices=("auto", "kl", "tiny"),
                    help="AutoencoderKL (SD VAE) or AutoencoderTiny (TAESD); auto reads the folder's config")
    en.add_argument("--device", default="auto", help="auto (this rank's GPU, else CPU), cpu, cuda, ...")
    en.add_argument("--num-workers", type=int, help="image loading processes (default: 0 for .npz, up to 8)")
    en.add_argument("--overwrite", action="store_true", help="re-encode a --out made with other settings")
    en.add_argument("--verify", action="store_true", help="only check --out against its index (counts, sha256)")
    en.add_argument("--quiet", action="store_true", help="no progress bar")
    en.set_defaults(func=_cmd_encode)

    sm = sub.add_parser("sample", help="sample images from a checkpoint (grid .png or ADM .npz; works under torchrun)",
                        description="Sample i's noise and label depend only on (seed, i): the output is the same for "
                                    "any batch size and number of processes. .npz runs are sharded and resumable.")
    _add_sampling_args(sm, "euler_pf")
    sm.add_argument("--classes", help="comma-separated class labels, cycled (e.g. 1,2,3)")
    sm.add_argument("--labels", choices=["uniform", "balanced"], default="uniform")
    sm.add_argument("--num-samples", type=int, default=64)
    sm.add_argument("--batch-size", type=int, default=64)
    sm.add_argument("--shard-size", type=int, default=1000)
    sm.add_argument("--seed", type=int, default=0)
    sm.add_argument("--out", required=True, help="grid.png or samples.npz")
    sm.set_defaults(func=_cmd_sample)

    vz = sub.add_parser(
        "viz", help="draw one sample's sampling run: state, clean estimate, per-patch time, uncertainty, mask",
        description="Sample sample INDEX (its noise and label are those `patchforcing sample` gives sample INDEX "
                    "with the same --seed/--class/--labels) with record=True and draw the run: a .png contact "
                    "sheet with one row per network call, or an animated .gif with one frame per call; "
                    "--overview draws several samples x several steps instead (uncertainty and time maps plus "
                    "the final samples). Latent models are decoded through their VAE for display; their time "
                    "and uncertainty maps stay on the latent patch grid.")
    _add_sampling_args(vz, "look_ahead", steps_help="outer steps (default 16 when --nfe is not given)")
    vz.add_argument("--class", dest="class_", type=int, metavar="C", help="class label of the sample (default: as `sample`)")
    vz.add_argument("--labels", choices=["uniform", "balanced"], default="uniform")
    vz.add_argument("--seed", type=int, default=0)
    vz.add_argument("--index", type=int, default=0, help="which sample (the first one for --overview)")
    vz.add_argument("--every", type=int, help="draw every K-th network call (default: <= 16 rows; GIF: all)")
    vz.add_argument("--overview", action="store_true", help="several samples x steps (PNG) instead of one run")
    vz.add_argument("--num-images", type=int, default=4, help="samples in the --overview (default 4)")
    vz.add_argument("--num-steps", type=int, default=6, help="steps shown in the --overview (default 6)")
    vz.add_argument("--out", required=True, help="trajectory.png, trajectory.gif or (with --overview) overview.png")
    vz.set_defaults(func=_cmd_viz)

    an = sub.add_parser(
        "analyze", help="measure the paper's findings: uncertainty vs error, clean context, uncertainty histogram",
        description="On held-out data, at each t of --t-bins: (a) Pearson R (and Spearman) between the predicted "
                    "per-patch uncertainty (mean exp(logvar) of the patch) and its actual squared velocity error, "
                    "every patch at t; (b) the loss and mean uncertainty of the non-context patches when a share "
                    "of the other patches is moved closer to the data, vs none; (c) the histogram of their "
                    "uncertainty with and without that context. Writes OUT/analysis.json and PNG plots. The paper "
                    "reports R = 0.52 at t = 0.6 and 0.11 at t = 0.2 on ImageNet 256.")
    an.add_argument("checkpoint", help="released .ckpt, exported .safetensors, run directory or training checkpoint")
    an.add_argument("--data", required=True,
                    help="synthetic | CONFIG.yaml or preset (its held-out val split) | image FOLDER | FILE.npz | "
                         "latent store directory (made by `patchforcing encode`)")
    an.add_argument("--out", required=True, help="output directory")
    an.add_argument("--num-images", type=int, default=256, help="held-out items to use (default 256)")
    an.add_argument("--t-bins", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9", help="comma-separated times")
    an.add_argument("--context-share", type=float, default=0.5, help="share of patches used as context (default 0.5)")
    cg = an.add_mutually_exclusive_group()
    cg.add_argument("--context-move", type=float, default=0.5,
                    help="context patches go this share of the way from t to the data: t + m (1 - t) (default 0.5)")
    cg.add_argument("--context-t", type=float, help="instead: context patches at the fixed time max(t, T)")
    an.add_argument("--batch-size", type=int, default=32)
    an.add_argument("--seed", type=int, default=0, help="seed of the noise and of the context patches")
    an.add_argument("--no-labels", action="store_true", help="condition on the null class instead of the labels")
    an.add_argument("--vae", help="VAE for latent models given image data (overrides the stored one)")
    an.add_argument("--device", default="auto")
    an.add_argument("--quiet", action="store_true", help="no progress bar")
    an.set_defaults(func=_cmd_analyze)

    m = sub.add_parser("models", help="list model presets")
    m.set_defaults(func=_cmd_models)
    c = sub.add_parser("presets", help="list config presets")
    c.set_defaults(func=_cmd_presets)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from .autoencoders import AutoencoderError
    from .checkpoints import CheckpointError
    from .data import DataError
    from .training.config import ConfigError
    from .training.trainer import NonFiniteLossError, TrainingError

    args = build_parser().parse_args(argv)
    from .runtime import tune_cpu_allocator

    tune_cpu_allocator()  # reuse large CPU buffers across steps (PATCHFORCING_NO_MALLOC_TUNING=1 turns it off)
    try:
        return args.func(args)
    except (ConfigError, DataError, CheckpointError, AutoencoderError) as e:
        print(f"patchforcing {args.command}: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"patchforcing {args.command}: {e}", file=sys.stderr)
        return 3
    except TrainingError as e:
        print(f"patchforcing {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:  # bad arguments caught by the library's own checks
        print(f"patchforcing {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
