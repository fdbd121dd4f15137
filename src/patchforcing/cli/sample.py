"""``patchforcing sample CKPT --out grid.png|samples.npz``: a picture, or many images for FID."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

from ..conditioning import condition_kind
from ..encoders.text import load_text_encoder_for
from ..sampling import SAMPLING_PRECISIONS
from ..sampling.cache import SELECTIONS, TokenCache
from ..sampling.generate import GenerationSpec, generate, sample_indices
from ..training.distributed import init_distributed, shutdown_distributed
from ..viz import prompt_grid, save_grid
from .common import (
    add_sampling_args,
    check_output_file,
    finite_float,
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
        description="Sample i's noise and label (or prompt) depend only on (seed, i): the output is the same for "
        "any batch size and number of processes. .npz runs are sharded and resumable; a resume whose settings "
        "differ from the existing shards' is refused (--overwrite re-samples). Text-to-image checkpoints take "
        "--prompt (repeatable) or --prompts FILE: a .png is then a prompt grid (a row per prompt).",
    )
    add_sampling_args(p, "euler_pf")
    add_cache_args(p)
    p.add_argument("--classes", help="comma-separated class labels, cycled (e.g. 1,2,3)")
    p.add_argument("--labels", choices=["uniform", "balanced"], default="uniform")
    p.add_argument(
        "--prompt", action="append", metavar="TEXT", help="a caption (text-to-image models); repeat for several"
    )
    p.add_argument("--prompts", metavar="FILE", help="a text file of captions, one per line (text-to-image models)")
    p.add_argument(
        "--per-prompt",
        type=positive_int,
        help="samples per prompt: the columns of a prompt grid (default 4); for .npz, consecutive samples "
        "per prompt (default 1: prompts cycled over the samples)",
    )
    p.add_argument(
        "--text-encoder",
        metavar="SPEC",
        help="where the text encoder is (hub id, local directory, 'minilm'); default: the one the run recorded",
    )
    p.add_argument(
        "--num-samples",
        type=positive_int,
        default=None,
        help="images to make (default 64; a prompt grid: prompts x --per-prompt)",
    )
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument(
        "--precision",
        choices=SAMPLING_PRECISIONS,
        default="fp32",
        help="the network's precision: fp32 (default) or bf16 autocast (faster on CPUs with bf16 units and on "
        "GPUs; not bit-equal to fp32)",
    )
    p.add_argument("--shard-size", type=positive_int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="discard existing shards of --out made with other settings")
    p.add_argument("--out", required=True, help="grid.png or samples.npz")
    p.set_defaults(func=run)
    return p


def _share(text: str) -> float:
    """argparse type: a number in (0, 1]."""
    value = finite_float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {value}")
    return value


def add_cache_args(p: argparse.ArgumentParser) -> None:
    """The token-caching options (one argument group): ``--cache-active A`` turns caching on."""
    g = p.add_argument_group(
        "token caching",
        "recompute only a share of the tokens at most network calls (the most uncertain ones by the last "
        "log-variance); the others keep their last outputs and lend their keys/values from the last full call",
    )
    g.add_argument(
        "--cache-active", type=_share, metavar="A", help="share of tokens recomputed at a cached call, in (0, 1]"
    )
    g.add_argument(
        "--cache-refresh", type=positive_int, metavar="N", help="a full call every N calls (default 4; 1 = dense)"
    )
    g.add_argument(
        "--cache-select",
        choices=SELECTIONS,
        help="uncertainty (default; needs a PFT) or random (the control: random tokens)",
    )


def token_cache_from(args: argparse.Namespace) -> TokenCache | None:
    """The :class:`TokenCache` of ``--cache-*`` (``None`` without ``--cache-active``)."""
    active = getattr(args, "cache_active", None)
    if active is None:
        given = [f for f, v in (("--cache-refresh", args.cache_refresh), ("--cache-select", args.cache_select)) if v]
        if given:
            raise ValueError(f"{' and '.join(given)} need --cache-active A (the share of tokens recomputed)")
        return None
    return TokenCache(
        active=active,
        refresh_every=args.cache_refresh if args.cache_refresh is not None else 4,
        select=args.cache_select or "uncertainty",
    )


def flops_note(token_flops: int | None, full_flops: int | None) -> str:
    """``"token FLOPs 1.23e+12 of 2.46e+12 dense (50.0 %)"``; empty when unknown."""
    if token_flops is None or not full_flops:
        return ""
    return f"token FLOPs {token_flops:.3g} of {full_flops:.3g} dense ({100 * token_flops / full_flops:.1f} %)"


def read_prompts(args: argparse.Namespace) -> list[str] | None:
    """The prompts of ``--prompt`` / ``--prompts FILE`` (blank lines skipped), or ``None``."""
    if args.prompt and args.prompts:
        raise ValueError("give --prompt or --prompts, not both")
    if args.prompt:
        return list(args.prompt)
    if args.prompts is None:
        return None
    path = Path(args.prompts)
    if not path.is_file():
        raise ValueError(f"--prompts {path}: no such file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"--prompts {path}: not a UTF-8 text file") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts {path}: the file holds no prompts")
    return prompts


def spec_from(args: argparse.Namespace) -> GenerationSpec:
    prompts = read_prompts(args)
    picture = Path(args.out).suffix.lower() in PICTURE_SUFFIXES
    per_prompt = args.per_prompt or (4 if picture and prompts else 1)
    if prompts is None and args.per_prompt is not None:
        raise ValueError("--per-prompt needs --prompt or --prompts")
    if prompts is not None and args.classes is not None:
        raise ValueError("--classes is for class-conditional models; give --prompt/--prompts or --classes, not both")
    num = args.num_samples
    if num is None:
        num = len(prompts) * per_prompt if prompts and picture else 64
    if prompts and picture and num % per_prompt:
        raise ValueError(f"a prompt grid needs --num-samples ({num}) divisible by --per-prompt ({per_prompt})")
    return GenerationSpec(
        num_samples=num,
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
        prompts=prompts,
        samples_per_prompt=per_prompt,
        cache=token_cache_from(args),
        precision=args.precision,
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
        encoder = None
        if condition_kind(model) == "text":
            if spec.prompts is None:
                raise ValueError(f"{args.checkpoint} is a text-to-image model: give --prompt TEXT or --prompts FILE")
            encoder = load_text_encoder_for(args.checkpoint, args.text_encoder, model=model, device=env.device)
        elif spec.prompts is not None:
            raise ValueError(f"{args.checkpoint} is a class-conditional model: it takes --classes, not prompts")
        if suffix in PICTURE_SUFFIXES:
            if env.world_size > 1:
                raise ValueError("a picture output is made by one process; use an .npz output under torchrun")
            write_picture(model, spec, out, decode, env.device, encoder)
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
                        encoder=encoder,
                        meta={
                            "checkpoint": str(args.checkpoint),
                            "vae": ae.spec.to_dict(),
                            **({"text_encoder": encoder.fingerprint} if encoder is not None else {}),
                        },
                    )
            except KeyboardInterrupt:
                raise KeyboardInterrupt("the finished shards are kept: run the same command again to resume") from None
            if path is not None:
                print(f"wrote {path} ({spec.num_samples} samples) and {out.with_suffix('.json')}")
                info = json.loads(out.with_suffix(".json").read_text())
                note = flops_note(info.get("token_flops"), info.get("full_flops"))
                if note:
                    print(f"{note} (this run)")
    finally:
        model = None
        shutdown_distributed()
    return 0


@torch.no_grad()
def write_picture(model, spec: GenerationSpec, out: Path, decode, device: torch.device, encoder=None) -> None:
    """One grid of samples ``0 .. num_samples - 1`` (the same images ``.npz`` output gives them);
    with prompts, a prompt grid: a row of ``samples_per_prompt`` samples per prompt."""
    images, _, res = sample_indices(
        model, spec, range(spec.num_samples), device=device, decode=decode, progress=True, encoder=encoder
    )
    if spec.prompts is None:
        save_grid(images, out)
    else:
        k = spec.samples_per_prompt
        rows = [spec.prompts[(i // k) % len(spec.prompts)] for i in range(0, spec.num_samples, k)]
        cfg = f", CFG {spec.cfg_scale:g}" if spec.cfg_scale != 1 else ""
        prompt_grid(images, rows, out, title=f"{res.sampler} · {res.nfe} NFE{cfg}")
    print(
        f"wrote {out}: {spec.num_samples} samples, sampler {res.sampler}, {res.steps} steps, "
        f"{res.nfe} NFE, {spec.num_samples / res.seconds:.2f} images/s"
    )
    note = flops_note(res.token_flops, res.full_flops)
    if note:
        print(note)
