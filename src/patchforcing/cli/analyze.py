"""``patchforcing analyze CKPT --data DATA --out DIR``: the paper's findings, measured."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..analysis import analyze, format_table, resolve_data
from ..autoencoders import autoencoder_spec_from_checkpoint, load_autoencoder_for
from ..checkpoints import load_model
from .common import add_device_arg, check_output_dir, device_from, positive_int, unit_float

NAME = "analyze"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        NAME,
        help="measure the paper's findings: uncertainty vs error, clean context, uncertainty histogram",
        description="On held-out data, at each t of --t-bins: (a) Pearson R (and Spearman) between the predicted "
        "per-patch uncertainty (mean exp(logvar) of the patch) and its actual squared velocity error, "
        "every patch at t; (b) the loss and mean uncertainty of the non-context patches when a share "
        "of the other patches is moved closer to the data, vs none; (c) the histogram of their "
        "uncertainty with and without that context. Writes OUT/analysis.json and PNG plots. The paper "
        "reports R = 0.52 at t = 0.6 and 0.11 at t = 0.2 on ImageNet 256.",
    )
    p.add_argument("checkpoint", help="released .ckpt, exported .safetensors, run directory or training checkpoint")
    p.add_argument(
        "--data",
        required=True,
        help="synthetic | CONFIG.yaml or preset (its held-out val split) | image FOLDER | FILE.npz | "
        "latent store directory (made by `patchforcing encode`)",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--num-images", type=positive_int, default=256, help="held-out items to use (default 256)")
    p.add_argument("--t-bins", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9", help="comma-separated times")
    p.add_argument(
        "--context-share", type=unit_float, default=0.5, help="share of patches used as context (default 0.5)"
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--context-move",
        type=unit_float,
        default=0.5,
        help="context patches go this share of the way from t to the data: t + m (1 - t) (default 0.5)",
    )
    g.add_argument("--context-t", type=unit_float, help="instead: context patches at the fixed time max(t, T)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--seed", type=int, default=0, help="seed of the noise and of the context patches")
    p.add_argument("--no-labels", action="store_true", help="condition on the null class instead of the labels")
    p.add_argument("--vae", help="VAE for latent models given image data (overrides the stored one)")
    add_device_arg(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def parse_t_bins(text: str) -> list[float]:
    """``"0.2,0.6"`` -> ``[0.2, 0.6]``; every time must lie in [0, 1]."""
    try:
        ts = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--t-bins {text!r}: give comma-separated times in [0, 1]") from None
    if not ts or any(not 0.0 <= t <= 1.0 for t in ts):
        raise ValueError(f"--t-bins {text!r}: give comma-separated times in [0, 1]")
    return ts


def run(args: argparse.Namespace) -> int:
    ts = parse_t_bins(args.t_bins)
    check_output_dir(args.out)
    device = device_from(args)
    model = load_model(args.checkpoint, map_location="cpu").to(device)
    stored = autoencoder_spec_from_checkpoint(args.checkpoint)
    pixel = (stored is not None and stored.kind == "identity") or (stored is None and model.in_channels == 3)
    if pixel and args.vae:
        raise ValueError(f"{args.checkpoint} is a pixel-space model; it needs no --vae")
    # latent models: the VAE is loaded only if the data are images that must be encoded
    autoencoder = (
        None if pixel else (lambda: load_autoencoder_for(args.checkpoint, args.vae, model=model, device=device))
    )
    data, info = resolve_data(args.data, model, autoencoder=autoencoder, num_images=args.num_images)
    result = analyze(
        model,
        data,
        args.out,
        num_images=args.num_images,
        t_values=ts,
        context_share=args.context_share,
        context_move=args.context_move,
        context_t=args.context_t,
        batch_size=args.batch_size,
        seed=args.seed,
        use_labels=not args.no_labels,
        autoencoder=autoencoder,
        data_info={**info, "checkpoint": str(args.checkpoint)},
        progress=not args.quiet,
    )
    print(format_table(result))
    print(f"wrote {Path(args.out)}/: {', '.join(result['files'].values())}")
    return 0
