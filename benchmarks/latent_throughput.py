"""Latent-pipeline throughput: SD-VAE encoding, and training from cached latents vs online encoding.

Measures, in ONE run (random weights, nothing downloaded):

1. ``vae encode``: images/s of the SD VAE's encoder (diffusers ``AutoencoderKL`` built from the SD
   VAE config: block_out_channels 128/256/512/512, 2 layers per block, 4 latent channels) on
   ``--batch-size`` images of 256x256, median of ``--repeats`` calls after a warm-up call; also
   with flips (image + mirror per item, what ``patchforcing encode --flip`` does) and the decoder.
2. ``patchforcing encode``: the whole pipeline (:func:`patchforcing.latents.encode_source`:
   ``.npz`` -> ADM crop -> VAE -> float16 safetensors shards + index) on ``--num-images`` images.
3. training images/s of a PFT-S/2 on 4x32x32 latents (batch ``--train-batch``, AdamW step,
   per-patch LTG loss) reading (a) the cached latents written in 2 (:class:`LatentDataset`:
   posterior sample per item) and (b) the same images encoded online by the VAE in the loop
   (:class:`OnlineEncodedDataset`), both through a DataLoader with 0 workers, as the trainer does.

Usage::

    python benchmarks/latent_throughput.py                 # CPU, the numbers in RESULTS.md
    python benchmarks/latent_throughput.py --device cuda --batch-size 32 --num-images 256
    python benchmarks/latent_throughput.py --quick         # smoke run (tiny VAE and model)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

import patchforcing as pf
from _common import cpu_model, sync
from patchforcing.autoencoders import AutoencoderSpec, DiffusersAutoencoder
from patchforcing.data import NpzImageDataset
from patchforcing.latents import LatentDataset, OnlineEncodedDataset, encode_source


def sd_vae(quick: bool):
    """A random-weight AutoencoderKL with the SD VAE's architecture (``quick``: a tiny one)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    if quick:
        return AutoencoderKL(
            block_out_channels=(8, 16, 16, 16),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1,
            norm_num_groups=4,
            latent_channels=4,
            sample_size=256,
        )
    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=256,
    )


def median_time(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_images(path: Path, n: int, res: int) -> Path:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:res, 0:res] / res
    imgs = [
        np.clip(
            np.stack(
                [
                    127 + 120 * np.sin((4 + 8 * rng.random()) * (xx * rng.random() + yy * rng.random()))
                    for _ in range(3)
                ],
                -1,
            ),
            0,
            255,
        ).astype(np.uint8)
        for _ in range(n)
    ]
    np.savez(path, images=np.stack(imgs), labels=np.arange(n) % 10)
    return path


def train_images_per_sec(dataset, model_name: str, batch: int, steps: int, device: torch.device) -> float:
    """Images/s of ``steps`` optimizer steps (after one warm-up step) reading ``dataset``."""
    torch.manual_seed(0)
    model = (
        pf.create_model(
            model_name,
            input_size=dataset.input_size,
            in_channels=dataset.channels,
            num_classes=max(10, dataset.num_classes),
        )
        .to(device)
        .train()
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loader = DataLoader(
        dataset,
        batch_size=batch,
        shuffle=True,
        num_workers=0,
        drop_last=True,
        generator=torch.Generator().manual_seed(0),
    )
    g = torch.Generator(device=device).manual_seed(0)

    def batches():
        while True:
            yield from loader

    it = batches()
    seen, t0 = 0, None
    for step in range(steps + 1):
        if step == 1:
            sync(device)
            t0 = time.perf_counter()
        x, y = next(it)
        x, y = x.to(device), y.to(device)
        loss = pf.patch_flow_loss(model, x, y, timestep_sampler="ltg", generator=g)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step >= 1:
            seen += x.shape[0]
    sync(device)
    return seen / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=2, help="images per VAE call (default 2)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--num-images", type=int, default=8, help="images through `patchforcing encode` (default 8)")
    ap.add_argument("--model", default="PFT-S/2")
    ap.add_argument("--train-batch", type=int, default=8)
    ap.add_argument("--cached-steps", type=int, default=5)
    ap.add_argument("--online-steps", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny VAE and model, few steps (smoke test)")
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.repeats, args.cached_steps, args.online_steps = "PFT-T/2", 1, 2, 1
    device = torch.device(args.device)
    res = 256

    print(
        f"# latent pipeline throughput: {cpu_model() if device.type == 'cpu' else torch.cuda.get_device_name(device)}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
        f"{os.getloadavg()[0]:.1f}" + (" (QUICK)" if args.quick else "")
    )
    vae = sd_vae(args.quick)
    ae = DiffusersAutoencoder(vae.to(device), AutoencoderSpec.sd_vae("random-init SD-VAE architecture"))
    n_params = sum(p.numel() for p in vae.encoder.parameters()) + sum(p.numel() for p in vae.quant_conv.parameters())
    x = torch.rand(args.batch_size, 3, res, res, device=device) * 2 - 1
    rows = []
    t_enc = median_time(lambda: ae.encode_posterior(x), args.repeats, device)
    rows.append(("VAE encode 256x256", args.batch_size / t_enc))
    xf = torch.cat([x, x.flip(-1)])
    t_flip = median_time(lambda: ae.encode_posterior(xf), args.repeats, device)
    rows.append(("VAE encode 256x256 + flip (images/s, 2 encodes each)", args.batch_size / t_flip))
    z = ae.encode(x, sample=False)
    t_dec = median_time(lambda: ae.decode(z), max(1, args.repeats - 1), device)
    rows.append(("VAE decode 32x32x4 -> 256x256", args.batch_size / t_dec))

    with tempfile.TemporaryDirectory() as tmp:
        npz = make_images(Path(tmp) / "images.npz", args.num_images, res)
        result = encode_source(
            npz,
            Path(tmp) / "latents",
            ae,
            resolution=res,
            flip=False,
            batch_size=args.batch_size,
            shard_size=max(1, args.num_images // 2),
            device=device,
            progress=False,
        )
        rows.append((f"`patchforcing encode` .npz -> shards ({args.num_images} images)", result.images_per_sec))
        cached = LatentDataset(Path(tmp) / "latents", flip=True)
        batch = min(args.train_batch, len(cached))
        ips_cached = train_images_per_sec(cached, args.model, batch, args.cached_steps, device)
        rows.append((f"train {args.model} from cached latents (batch {batch})", ips_cached))
        online = OnlineEncodedDataset(NpzImageDataset(npz, res, flip=True), ae, device=device)
        ips_online = train_images_per_sec(online, args.model, batch, args.online_steps, device)
        rows.append((f"train {args.model} with online VAE encoding (batch {batch})", ips_online))

    print(
        f"\nSD-VAE encoder: {n_params / 1e6:.1f} M parameters; VAE batch {args.batch_size}, median of "
        f"{args.repeats}; training: {args.cached_steps} (cached) / {args.online_steps} (online) timed steps\n"
    )
    print("| measurement | images/s |")
    print("|---|---|")
    for name, v in rows:
        print(f"| {name} | {v:.3g} |")
    print(f"\ncached / online training speed: {ips_cached / ips_online:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
