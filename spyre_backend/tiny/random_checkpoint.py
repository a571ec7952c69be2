"""Build an untrained Granite Vision checkpoint of a chosen size, for benchmarks.

    python -m spyre_backend.tiny.random_checkpoint --out checkpoints/random-mid [--vision-hidden 384] ...

The defaults give the "mid-size" model of the benchmark: the real architecture (SigLIP with 27
layers and features of layers [-24,-20,-12,-1], 384 px crops of 14 px patches, gelu projector,
image_newline, anyres; Granite with GQA, muP multipliers, tied embeddings) with a 384-wide tower
and an 8-layer, 1024-wide Granite. Weights are transformers' random init (seeded), never trained:
its answers are noise, so benchmarks fix the output length with ``min_tokens``.

Tokenizer, processor, config and the published key layout come from the tiny builder
(``build_checkpoint``), and the saved folder is checked the same way: it reloads in transformers
with clean loading info and the same logits, and in FMS with every key placed and matching
prefill logits. A folder built with the same arguments is reused, not rebuilt.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import GenerationConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor

from . import build_checkpoint as tiny
from . import synthetic

STAMP = "random_checkpoint.json"  # the arguments a folder was built with


def build_args(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in ("vision_hidden", "vision_heads", "text_hidden", "text_layers",
                                          "text_heads", "text_kv_heads", "crop", "seed", "init_std")}


def is_built(out_dir: Path, wanted: dict) -> bool:
    try:
        return json.loads((out_dir / STAMP).read_text()) == wanted
    except (OSError, ValueError):
        return False


def build(args: argparse.Namespace, log=print) -> Path:
    wanted = build_args(args)
    out_dir: Path = args.out
    if is_built(out_dir, wanted):
        log(f"{out_dir}: already built with these arguments")
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / STAMP).exists():
        raise SystemExit(f"refusing to replace {out_dir}: not empty and not built by this script")
    started = time.monotonic()
    torch.manual_seed(args.seed)
    tokenizer = tiny.build_tokenizer()
    processor = tiny.build_processor(tokenizer, crop=args.crop)
    config = tiny.build_config(
        tokenizer, args.init_std, args.vision_hidden, args.vision_heads, crop=args.crop,
        text_hidden=args.text_hidden, text_layers=args.text_layers, text_heads=args.text_heads,
        text_kv_heads=args.text_kv_heads, attention_multiplier=args.text_heads / args.text_hidden,
    )
    model = LlavaNextForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"random Granite Vision: {n_params / 1e6:.1f} M parameters")

    staging = out_dir.with_name(out_dir.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    tiny.save_checkpoint(model, processor, staging)
    if args.verify:
        # one image prompt: enough to show both loaders place every weight
        spec = synthetic.ShapeSpec("triangle", "green", "white", (200, 150))
        sample = synthetic.image_sample(spec, 0, synthetic.draw_shape_image("triangle", "green", "white", (200, 150)))
        reloaded = tiny.check_transformers_load(staging, model, [sample], log)
        tiny.check_fms(staging, reloaded, LlavaNextProcessor.from_pretrained(staging), [sample], log)
    (staging / STAMP).write_text(json.dumps(wanted, indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    log(f"saved {out_dir} in {time.monotonic() - started:.0f} s")
    return out_dir


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--vision-hidden", type=int, default=384)
    p.add_argument("--vision-heads", type=int, default=6)
    p.add_argument("--text-hidden", type=int, default=1024)
    p.add_argument("--text-layers", type=int, default=8)
    p.add_argument("--text-heads", type=int, default=16)
    p.add_argument("--text-kv-heads", type=int, default=4)
    p.add_argument("--crop", type=int, default=384, help="crop size in px (a multiple of the 14 px patch)")
    p.add_argument("--init-std", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip reloading with transformers and FMS")
    return p


def main(argv: list[str] | None = None) -> int:
    build(parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
