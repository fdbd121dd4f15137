"""``patchforcing viz CKPT --out trajectory.png|.gif``: one sampling run, call by call."""

from __future__ import annotations

import argparse

from ..viz import render_trajectory
from .common import (
    add_sampling_args,
    check_output_file,
    device_from,
    guidance_interval,
    load_model_and_decoder,
    nonnegative_int,
    positive_int,
    sampler_options,
)
from .sample import add_cache_args, token_cache_from

NAME = "viz"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        NAME,
        help="draw one sample's sampling run: state, clean estimate, per-patch time, uncertainty, mask",
        description="Sample sample INDEX (its noise and label are those `patchforcing sample` gives sample INDEX "
        "with the same --seed/--class/--labels) with record=True and draw the run: a .png contact "
        "sheet with one row per network call, or an animated .gif with one frame per call; "
        "--overview draws several samples x several steps instead (uncertainty and time maps plus "
        "the final samples). Latent models are decoded through their VAE for display; their time "
        "and uncertainty maps stay on the latent patch grid.",
    )
    add_sampling_args(p, "look_ahead", steps_help="outer steps (default 16 when --nfe is not given)")
    p.add_argument(
        "--class",
        dest="class_",
        type=nonnegative_int,
        metavar="C",
        help="class label of the sample (default: as `sample`)",
    )
    p.add_argument("--labels", choices=["uniform", "balanced"], default="uniform")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--index", type=nonnegative_int, default=0, help="which sample (the first one for --overview)")
    p.add_argument("--every", type=positive_int, help="draw every K-th network call (default: <= 16 rows; GIF: all)")
    p.add_argument("--overview", action="store_true", help="several samples x steps (PNG) instead of one run")
    p.add_argument("--num-images", type=positive_int, default=4, help="samples in the --overview (default 4)")
    p.add_argument("--num-steps", type=positive_int, default=6, help="steps shown in the --overview (default 6)")
    p.add_argument("--out", required=True, help="trajectory.png, trajectory.gif or (with --overview) overview.png")
    add_cache_args(p)
    p.set_defaults(func=run)
    return p


def _ordinal(k: int) -> str:
    return f"{k}{'th' if 10 <= k % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(k % 10, 'th')}"


def run(args: argparse.Namespace) -> int:
    if args.class_ is not None and args.labels != "uniform":
        raise ValueError("give --class or --labels, not both")
    interval = guidance_interval(args)
    check_output_file(args.out)
    device = device_from(args)
    model, _, decode = load_model_and_decoder(args.checkpoint, args.vae, device)
    res = render_trajectory(
        model,
        args.out,
        sampler=args.sampler,
        steps=args.steps,
        nfe=args.nfe,
        cfg_scale=args.cfg,
        guidance_interval=interval,
        labels=args.labels,
        classes=None if args.class_ is None else [args.class_],
        seed=args.seed,
        index=args.index,
        every=args.every,
        overview=args.overview,
        num_images=args.num_images,
        num_steps=args.num_steps,
        decode=decode,
        options=sampler_options(args),
        progress=True,
        cache=token_cache_from(args),
    )
    k = res.every
    stride = f"all {res.calls} calls" if k == 1 else f"every {_ordinal(k)} of {res.calls} calls, and the last"
    what = {
        "sheet": f"{res.shown} rows ({stride})",
        "gif": f"{res.shown} frames ({stride})",
        "overview": f"{len(res.indices)} samples x {res.shown} steps",
    }[res.kind]
    print(
        f"wrote {res.path}: sample{'s' if len(res.indices) > 1 else ''} "
        f"{','.join(map(str, res.indices))}, sampler {res.sampler}, {res.steps} steps, {res.nfe} NFE; {what}"
    )
    return 0
