"""``patchforcing sample CKPT --out grid.png|samples.npz``: a picture, or many images for FID."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist

from ..sampling.generate import GenerationSpec, generate, sample_indices
from ..training.distributed import init_distributed, shutdown_distributed
from ..viz import save_grid
from .common import (
    add_sampling_args,
    check_output_file,
    guidance_interval,
    load_model_and_decoder,
    parse_classes,
    positive_int,
    sampler_options,
)

NAME = "sample"
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        NAME,
        help="sample images from a checkpoint (grid .png or ADM .npz; works under torchrun)",
        description="Sample i's noise and label depend only on (seed, i): the output is the same for any batch "
        "size and number of processes. .npz runs are sharded and resumable; a resume whose settings "
        "differ from the existing shards' is refused (--overwrite re-samples).",
    )
    add_sampling_args(p, "euler_pf")
    p.add_argument("--classes", help="comma-separated class labels, cycled (e.g. 1,2,3)")
    p.add_argument("--labels", choices=["uniform", "balanced"], default="uniform")
    p.add_argument("--num-samples", type=positive_int, default=64)
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--shard-size", type=positive_int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="discard existing shards of --out made with other settings")
    p.add_argument("--out", required=True, help="grid.png or samples.npz")
    p.set_defaults(func=run)
    return p


def spec_from(args: argparse.Namespace) -> GenerationSpec:
    return GenerationSpec(
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        seed=args.seed,
        sampler=args.sampler,
        steps=args.steps,
        nfe=args.nfe,
        cfg_scale=args.cfg,
        guidance_interval=guidance_interval(args),
        labels=args.labels,
        classes=parse_classes(args.classes),
        shard_size=args.shard_size,
        options=sampler_options(args),
    )


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    suffix = out.suffix.lower()
    if suffix not in PICTURE_SUFFIXES + (".npz",):
        raise ValueError(f"--out must end in .png or .npz (or .jpg), got {out}")
    spec = spec_from(args)  # bad options fail before any model is loaded
    check_output_file(out)
    env = init_distributed(args.device)
    try:
        model, ae, decode = load_model_and_decoder(args.checkpoint, args.vae, env.device)
        if suffix in PICTURE_SUFFIXES:
            if env.world_size > 1:
                raise ValueError("a picture output is made by one process; use an .npz output under torchrun")
            write_picture(model, spec, out, decode, env.device)
        else:
            try:
                with torch.no_grad():
                    path = generate(
                        model,
                        spec,
                        out,
                        decode=decode,
                        rank=env.rank,
                        world_size=env.world_size,
                        device=env.device,
                        barrier=dist.barrier if env.distributed else None,
                        progress=True,
                        overwrite=args.overwrite,
                        meta={"checkpoint": str(args.checkpoint), "vae": ae.spec.to_dict()},
                    )
            except KeyboardInterrupt:
                raise KeyboardInterrupt("the finished shards are kept: run the same command again to resume") from None
            if path is not None:
                print(f"wrote {path} ({spec.num_samples} samples) and {out.with_suffix('.json')}")
    finally:
        model = None
        shutdown_distributed()
    return 0


@torch.no_grad()
def write_picture(model, spec: GenerationSpec, out: Path, decode, device: torch.device) -> None:
    """One grid of samples ``0 .. num_samples - 1`` (the same images ``.npz`` output gives them)."""
    images, _, res = sample_indices(model, spec, range(spec.num_samples), device=device, decode=decode, progress=True)
    save_grid(images, out)
    print(
        f"wrote {out}: {spec.num_samples} samples, sampler {res.sampler}, {res.steps} steps, "
        f"{res.nfe} NFE, {spec.num_samples / res.seconds:.2f} images/s"
    )
