"""``patchforcing train-classifier DATA --out clf.pt``: stand-in features for small data sets."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..data import build_dataset, data_argument_kind
from ..evaluation import EvaluationError, train_classifier
from ..training.config import load_config
from .common import check_output_file, positive_int

NAME = "train-classifier"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        NAME,
        help="train a small CNN whose features stand in for Inception on small data sets",
        description="Train a small classifier (4 conv blocks, GroupNorm, global pool, linear) on DATA and save "
        "a weights_only-loadable checkpoint for `patchforcing eval --features classifier:CKPT`. DATA "
        "is 'synthetic', an image folder, an .npz, or a YAML config / preset (its data section); "
        "or give --data-kind and --data-path.",
    )
    p.add_argument("data", nargs="?", help="synthetic | FOLDER | FILE.npz | CONFIG.yaml | preset name")
    p.add_argument("--out", required=True, help="checkpoint file to write")
    p.add_argument("--data-kind", choices=("synthetic", "folder", "npz"))
    p.add_argument("--data-path")
    p.add_argument("--resolution", type=positive_int, help="image side (default: the data's; 32 for folders)")
    p.add_argument("--num-classes", type=positive_int, help="synthetic: number of classes (default 8)")
    p.add_argument("--length", type=positive_int, help="synthetic: number of images (default 10000)")
    p.add_argument("--epochs", type=positive_int, default=5)
    p.add_argument("--max-steps", type=positive_int, help="stop after this many optimiser steps")
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--width", type=positive_int, default=32, help="channels of the first conv block")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of the data held out for accuracy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run)
    return p


def data_spec(args: argparse.Namespace) -> dict:
    """The data spec: DATA (``synthetic``, a folder, an .npz, or a YAML config/preset whose ``data``
    section is used) or --data-kind/--data-path; flags override."""
    spec: dict = {}
    data = args.data
    if data is not None:
        kind = data_argument_kind(data)
        path = str(Path(data).expanduser())
        if kind == "synthetic":
            spec["kind"] = "synthetic"
        elif kind in ("folder", "npz"):
            spec.update(kind=kind, path=path)
        elif kind == "config":
            d = load_config(data).data
            if d.kind not in ("synthetic", "folder", "npz"):
                raise EvaluationError(
                    f"{data}: data.kind {d.kind!r} is not an image data set (synthetic, folder or npz)"
                )
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
    for flag in ("resolution", "num_classes", "length"):
        value = getattr(args, flag)
        if value is not None:
            spec[flag] = value
    if spec.get("kind") == "folder" and "resolution" not in spec:
        spec["resolution"] = 32
    return spec


def run(args: argparse.Namespace) -> int:
    check_output_file(args.out)
    spec = data_spec(args)
    dataset = build_dataset(spec)
    print(
        f"data: {spec} -> {len(dataset)} images, {dataset.num_classes} classes, {dataset.resolution} px",
        file=sys.stderr,
    )
    result = train_classifier(
        dataset,
        args.out,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        width=args.width,
        val_fraction=args.val_fraction,
        max_steps=args.max_steps,
        seed=args.seed,
        device=args.device,
        data_spec=spec,
        log=lambda msg: print(msg, file=sys.stderr, flush=True),
    )
    print(
        f"held-out accuracy {result.accuracy:.4f} ({result.num_val} items, {result.steps} steps, "
        f"{result.seconds:.0f} s); wrote {result.path}"
    )
    return 0
