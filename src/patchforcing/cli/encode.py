"""``patchforcing encode IMAGES --vae VAE --out LATENT_DIR``: sharded VAE latents for training."""

from __future__ import annotations

import argparse

from ..latents import LatentStoreError, encode_source, verify_latent_store
from ..utils import torchrun_env
from .common import add_device_arg, positive_int

NAME = "encode"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        NAME,
        help="encode images into sharded VAE latents for training (works under torchrun)",
        description="Encode IMAGE_SOURCE (an ImageNet-layout folder, ADM centre crop, or an .npz of uint8 NHWC "
        "images with labels) with a VAE into --out: safetensors shards of posterior mean/std + "
        "labels and an index.json with counts, sha256 checksums, the VAE and its latent scaling. "
        "Under torchrun the shards are split across ranks; running the same command again "
        "resumes (finished, intact shards are skipped). Train with data.kind=latents data.path=OUT.",
    )
    p.add_argument("source", nargs="?", metavar="IMAGE_SOURCE", help="image folder or .npz")
    p.add_argument("--vae", help="hub id (stabilityai/sd-vae-ft-ema) or local diffusers VAE folder")
    p.add_argument("--out", required=True, metavar="LATENT_DIR")
    p.add_argument("--resolution", type=positive_int, default=256, help="image side before encoding (default 256)")
    p.add_argument("--flip", action="store_true", help="also store the posterior of each mirrored image")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per VAE call (default 32)")
    p.add_argument(
        "--shard-size", type=positive_int, default=2048, help="items per shard, the resume unit (default 2048)"
    )
    p.add_argument(
        "--dtype",
        default="float16",
        choices=("float16", "bfloat16", "float32"),
        help="storage type of mean/std (default float16)",
    )
    p.add_argument(
        "--scaling",
        default="vae",
        choices=("vae", "per-channel"),
        help="latent scaling stored in the index: the VAE's factor (0.18215 for the SD VAE) or "
        "per-channel mean/std of the encoded data",
    )
    p.add_argument(
        "--vae-kind",
        default="auto",
        choices=("auto", "kl", "tiny", "flux2"),
        help="AutoencoderKL (SD VAE) or AutoencoderTiny (TAESD); auto reads the folder's config",
    )
    p.add_argument(
        "--repa-encoder",
        metavar="SPEC",
        help="also cache REPA features of every image (and its mirror with --flip): dinov2-b (-s, -l, -g), "
        "a DINOv2 hub id or local folder, or classifier:CKPT; train with repa.source=cached (docs/repa.md)",
    )
    add_device_arg(p)
    p.add_argument("--num-workers", type=int, help="image loading processes (default: 0 for .npz, up to 8)")
    p.add_argument("--overwrite", action="store_true", help="re-encode a --out made with other settings")
    p.add_argument("--verify", action="store_true", help="only check --out against its index (counts, sha256)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    if args.verify:
        index = verify_latent_store(args.out)
        print(
            f"{args.out}: {index['num_items']} latents {tuple(index['latent_shape'])} in {len(index['shards'])} "
            "shards: counts and sha256 checksums verified"
        )
        return 0
    if not args.source or not args.vae:
        raise LatentStoreError("give IMAGE_SOURCE and --vae (or --verify to check an existing --out)")
    try:
        result = encode_source(
            args.source,
            args.out,
            args.vae,
            resolution=args.resolution,
            flip=args.flip,
            batch_size=args.batch_size,
            shard_size=args.shard_size,
            dtype=args.dtype,
            scaling=args.scaling,
            vae_kind=args.vae_kind,
            device=args.device,
            num_workers=args.num_workers,
            overwrite=args.overwrite,
            progress=not args.quiet,
            repa_encoder=args.repa_encoder,
        )
    except KeyboardInterrupt:
        raise KeyboardInterrupt("the finished shards are kept: run the same command again to resume") from None
    if torchrun_env().rank == 0:
        idx = result.index
        print(
            f"encoded {len(result.encoded_shards)} shard(s) here ({result.images} images, "
            f"{result.images_per_sec:.1f} images/s), skipped {len(result.skipped_shards)} finished; "
            f"{idx['num_items']} latents {tuple(idx['latent_shape'])}, {idx['num_classes']} classes, "
            + (f"REPA features {idx['repa']['tokens']}x{idx['repa']['dim']}, " if idx.get("repa") else "")
            + f"index: {result.out / 'index.json'}"
        )
    return 0
