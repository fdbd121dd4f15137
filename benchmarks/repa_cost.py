"""REPA's cost: features online (encoder in the training step) vs cached (``encode --repa-encoder``).

Measures, in ONE run (random weights in the real architectures, nothing downloaded), for
``--batch-size`` ImageNet-geometry items (256x256 images, 4x32x32 SD-VAE latents):

1. ``online, pixel space``: DINOv2-B (transformers ``Dinov2Model``, ViT-B/14, 86 M parameters)
   with REPA's preprocessing (resize to 224, 256 patch tokens) on the images.
2. ``online, from latents``: the SD-VAE decode of the latents (diffusers ``AutoencoderKL`` built
   from the SD VAE config) followed by 1 (what the trainer does for ``data.kind: latents``).
3. ``cached``: reading the items, features included, from a latent store written by
   :func:`patchforcing.latents.encode_source` with ``repa_encoder`` (``LatentDataset(...,
   repa_features=True)``, float16 features with flips), per item.
4. the training step they are added to: PFT-B/2 + REPA projector (depth 4, width 2048), loss,
   backward, AdamW, with the features given (the alignment term itself included).
5. the one-off cost of caching: DINOv2-B on image + mirror per item at encode time, and the
   disk per item.

Medians of ``--repeats`` calls after one warm-up call.

Usage::

    python benchmarks/repa_cost.py                  # CPU, the numbers in RESULTS.md
    python benchmarks/repa_cost.py --device cuda --batch-size 32
    python benchmarks/repa_cost.py --quick          # smoke run (tiny encoder, VAE and model)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import patchforcing as pf
from _common import cpu_model, sync
from latent_throughput import make_images, median_time, sd_vae
from patchforcing.autoencoders import AutoencoderSpec, DiffusersAutoencoder
from patchforcing.encoders import Dinov2Encoder
from patchforcing.flow.loss import RepaTarget
from patchforcing.latents import LatentDataset, encode_source


def dinov2(quick: bool) -> Dinov2Encoder:
    """DINOv2 ViT-B/14 with random weights (``quick``: 1 layer of width 64)."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = (
        Dinov2Config(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128)
        if quick
        else Dinov2Config()
    )
    return Dinov2Encoder(Dinov2Model(cfg).eval(), spec="dinov2-b (random weights)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--num-items", type=int, default=8, help="items in the cached store (read cost)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    B, res = args.batch_size, 256
    enc = dinov2(args.quick).to(dev)
    vae = DiffusersAutoencoder(
        sd_vae(args.quick).to(dev).eval(), AutoencoderSpec(kind="kl", source="random", scale_factor=0.18215)
    )
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(B, 3, res, res, generator=g) * 2 - 1).to(dev)
    latents = torch.randn(B, 4, res // 8, res // 8, generator=g).to(dev)

    results: dict[str, float] = {}
    with torch.no_grad():
        results["encoder"] = median_time(lambda: enc(images), args.repeats, dev)
        results["decode"] = median_time(lambda: vae.decode(latents), args.repeats, dev)
        results["encoder_flip"] = median_time(lambda: enc(torch.cat([images, images.flip(-1)])), args.repeats, dev)
    results["decode_encoder"] = results["decode"] + results["encoder"]

    # the training step the features are added to (PFT-B/2 + projector; tiny with --quick)
    torch.manual_seed(0)
    name, kw = ("PFT-T/2", dict(depth=2, hidden_size=64, num_heads=4)) if args.quick else ("PFT-B/2", {})
    model = pf.create_model(
        name,
        input_size=32,
        in_channels=4,
        num_classes=1000,
        repa=dict(encoder_depth=2 if args.quick else 4, z_dim=enc.dim, projector_dim=2048),
        **kw,
    ).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    with torch.no_grad():
        feats = enc(images)
    y = torch.randint(0, 1000, (B,), generator=g).to(dev)

    def step():
        terms = pf.patch_flow_loss(model, latents, y, repa=RepaTarget(features=feats))
        terms["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(dev)

    results["train_step"] = median_time(step, args.repeats, dev)

    # cached: a store with features, then the read cost per item
    with tempfile.TemporaryDirectory() as tmp:
        src = make_images(Path(tmp) / "images.npz", args.num_items, res)
        small_vae = DiffusersAutoencoder(
            sd_vae(True).eval(), AutoencoderSpec(kind="kl", source="random", scale_factor=0.18215)
        )
        encode_source(
            src,
            Path(tmp) / "store",
            small_vae,
            resolution=res,
            flip=True,
            batch_size=B,
            shard_size=args.num_items,
            device=args.device,
            progress=False,
            repa_encoder=enc,
        )
        ds = LatentDataset(Path(tmp) / "store", repa_features=True)
        store_bytes = sum(p.stat().st_size for p in (Path(tmp) / "store").glob("shard-*.safetensors"))
        plain = Path(tmp) / "plain"
        encode_source(
            src,
            plain,
            small_vae,
            resolution=res,
            flip=True,
            batch_size=B,
            shard_size=args.num_items,
            device=args.device,
            progress=False,
        )
        plain_bytes = sum(p.stat().st_size for p in plain.glob("shard-*.safetensors"))
        times = []
        for r in range(args.repeats + 1):
            ds.set_epoch(r)
            t0 = time.perf_counter()
            for i in range(len(ds)):
                ds[i]
            times.append((time.perf_counter() - t0) / len(ds))
        results["cached_item"] = statistics.median(times[1:])
    per_item_feature_bytes = (store_bytes - plain_bytes) / args.num_items

    step_s = results["train_step"]
    enc_name, vae_name = ("tiny DINOv2", "tiny VAE") if args.quick else ("DINOv2-B", "SD-VAE")
    rows = [
        (f"training step, {name} + projector, features given", step_s, 1.0),
        (f"online, pixel space: {enc_name} on the images", results["encoder"], results["encoder"] / step_s),
        (f"online, from latents: {vae_name} decode", results["decode"], results["decode"] / step_s),
        (f"online, from latents: decode + {enc_name}", results["decode_encoder"], results["decode_encoder"] / step_s),
        (
            "cached: read B items with features (LatentDataset)",
            results["cached_item"] * B,
            results["cached_item"] * B / step_s,
        ),
    ]
    print(
        f"# repa_cost: {cpu_model()}, torch {torch.__version__}, {args.threads} threads, device {args.device}, batch {B}"
        + (" (quick)" if args.quick else "")
    )
    print()
    print("| per training step of B items | seconds | vs the step |")
    print("|---|---:|---:|")
    for label, sec, ratio in rows:
        print(f"| {label} | {sec:.3f} | {ratio:.2f}x |")
    print()
    print(
        f"- one-off, `encode --repa-encoder` with --flip: {enc_name} on image + mirror {results['encoder_flip'] / B:.3f} s per item"
    )
    print(
        f"- disk: {per_item_feature_bytes / 1e6:.3f} MB of features per item (float16, with the mirror; "
        f"{per_item_feature_bytes * 1.281167e6 / 1e12:.2f} TB for ImageNet's 1,281,167 images)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
