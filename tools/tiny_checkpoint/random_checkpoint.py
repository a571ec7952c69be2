"""Build an untrained Granite Vision checkpoint of a chosen size, for benchmarks.

    python -m tools.tiny_checkpoint.random_checkpoint --out checkpoints/random-mid [--vision-hidden 384] ...
    python -m tools.tiny_checkpoint.random_checkpoint --preset granite-vision-3.2-2b --out DIR
    python -m tools.tiny_checkpoint.random_checkpoint --preset granite-vision-3.3-2b [--reduced] --out DIR

The defaults give the "mid-size" model of the benchmark: the real architecture (SigLIP with 27
layers and features of layers [-24,-20,-12,-1], 384 px crops of 14 px patches, gelu projector,
image_newline, anyres; Granite with GQA, muP multipliers, tied embeddings) with a 384-wide tower
and an 8-layer, 1024-wide Granite. Weights are transformers' random init (seeded), never trained:
its answers are noise, so benchmarks fix the output length with ``min_tokens``.

Tokenizer, processor, config and the published key layout come from the tiny builder
(this package), and the saved folder is checked the same way: it reloads in transformers
with clean loading info and the same logits, and in FMS with every key placed and matching
prefill logits. A folder built with the same arguments is reused, not rebuilt.

``--preset granite-vision-3.2-2b`` gives the published model's exact shapes (2.98 B parameters:
SigLIP so400m, 27 layers of 1152 with 16 heads; Granite 2B, 40 layers of 2048, 32 heads, 8 KV
heads, intermediate 8192, vocabulary 49156 with ``<image>`` at 49155, rope theta 300000; the 27
anyres pinpoints of 384 px crops), in bf16 as published. It is built in bf16 and saved shard by
shard, so the build needs ~7 GB, not two fp32 copies of the model (23 GB). It is not reloaded to
compare logits here: that takes two more copies of the model and minutes of prefill, and is what
``make test-full-size`` does (tests/full_size/).
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

from . import synthetic
from .model import build_config, build_processor
from .save import save_checkpoint
from .tokenizer import build_tokenizer
from .verify import check_fms, check_transformers_load

STAMP = "random_checkpoint.json"  # the arguments a folder was built with
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# ibm-granite/granite-vision-3.2-2b's config.json: (height, width) grids of 384 px crops
PUBLISHED_2B_PINPOINTS = (
    [[384, 384 * k] for k in range(1, 11)] + [[768, 384 * k] for k in range(1, 6)]
    + [[1152, 384 * k] for k in range(1, 4)] + [[1536, 384], [1536, 768], [1920, 384], [1920, 768]]
    + [[384 * k, 384] for k in range(6, 11)]
)
PRESETS = {
    "granite-vision-3.2-2b": dict(
        vision_hidden=1152, vision_intermediate=4304, vision_heads=16, crop=384,
        text_hidden=2048, text_intermediate=8192, text_layers=40, text_heads=32, text_kv_heads=8,
        vocab=49156, rope_theta=300000.0, max_positions=131072, pinpoints=PUBLISHED_2B_PINPOINTS,
        dtype="bfloat16",
    ),
    # ibm-granite/granite-vision-3.3-2b: what its model card and public descriptions give (its
    # config.json could not be read here). Read: the SigLIP2 tower (so400m-patch14-384: the shape
    # of 3.2's SigLIP, 27 layers of 1152, 16 heads, 4304, 384 px crops of 14 px patches), features
    # of layers [-24, -20, -12, -1], a 2-layer gelu projector, Granite 3.1 2B with 128k context
    # (40 layers of 2048, 32 heads, 8 KV heads, 8192; multipliers embedding 12, residual 0.22,
    # logits 8, attention 1/64), vocabulary 49156 with <image> at 49155. Assumed: 3.2's 27
    # pinpoints; rope theta 5,000,000 (granite-3.1-2b-instruct's, its 128k context); no pooling
    # head in the tower (vision_use_head false: a LlavaNext tower's head is never used, and a
    # server that ran it on multi-layer features broke, vLLM #32299).
    "granite-vision-3.3-2b": dict(
        vision_hidden=1152, vision_intermediate=4304, vision_heads=16, crop=384,
        text_hidden=2048, text_intermediate=8192, text_layers=40, text_heads=32, text_kv_heads=8,
        vocab=49156, rope_theta=5_000_000.0, max_positions=131072, pinpoints=PUBLISHED_2B_PINPOINTS,
        vision_use_head=False, dtype="bfloat16",
    ),
}
# --reduced: a preset's config at test size (its differences from the tiny shape kept: rope, the
# grids scaled to 56 px crops, the head or none, the vocabulary), built in fp32 and verified
REDUCED = dict(vision_hidden=32, vision_intermediate=128, vision_heads=2, crop=56, text_hidden=64,
               text_intermediate=256, text_layers=2, text_heads=4, text_kv_heads=2, dtype="float32")


SHAPE_ARGS = ("vision_hidden", "vision_heads", "text_hidden", "text_layers", "text_heads", "text_kv_heads", "crop",
              "seed", "init_std")
PRESET_ARGS = ("vision_intermediate", "text_intermediate", "vocab", "rope_theta", "max_positions", "pinpoints", "dtype",
               "vision_use_head")


def build_args(args: argparse.Namespace) -> dict:
    """What a folder is built from (its stamp); a preset's values replace the shape arguments."""
    wanted = {k: getattr(args, k) for k in SHAPE_ARGS}
    if args.preset:
        wanted.update(PRESETS[args.preset], preset=args.preset)
        if args.reduced:
            crop = wanted["crop"]
            wanted.update(REDUCED, reduced=True,
                          pinpoints=[[h // crop * REDUCED["crop"], w // crop * REDUCED["crop"]] for h, w in wanted["pinpoints"]])
    elif args.dtype != "float32":  # older stamps (fp32 mid-size folders) stay valid
        wanted["dtype"] = args.dtype
    return wanted


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
    shape = dict(wanted)
    dtype = DTYPES[shape.get("dtype", "float32")]
    vocab = shape.get("vocab")
    tokenizer = build_tokenizer(image_token_id=vocab - 1 if vocab else None)
    processor = build_processor(tokenizer, crop=shape["crop"], pinpoints=shape.get("pinpoints"))
    config = build_config(
        tokenizer, shape["init_std"], shape["vision_hidden"], shape["vision_heads"], crop=shape["crop"],
        text_hidden=shape["text_hidden"], text_layers=shape["text_layers"], text_heads=shape["text_heads"],
        text_kv_heads=shape["text_kv_heads"], attention_multiplier=shape["text_heads"] / shape["text_hidden"],
        vision_intermediate=shape.get("vision_intermediate", 0), text_intermediate=shape.get("text_intermediate", 0),
        rope_theta=shape.get("rope_theta", 10000.0), max_positions=shape.get("max_positions", 4096),
        pinpoints=shape.get("pinpoints"), vision_use_head=shape.get("vision_use_head", True),
    )
    if dtype != torch.float32:
        config.dtype = config.text_config.dtype = config.vision_config.dtype = str(dtype).removeprefix("torch.")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialised in the saved dtype: no fp32 copy of a large model
    try:
        model = LlavaNextForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(previous)
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"random Granite Vision: {n_params / 1e6:.1f} M parameters ({dtype}), built in "
        f"{time.monotonic() - started:.0f} s")

    staging = out_dir.with_name(out_dir.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    save_checkpoint(model, processor, staging, dtype=dtype)
    if args.verify and (not args.preset or args.reduced):
        # one image prompt: enough to show both loaders place every weight
        spec = synthetic.ShapeSpec("triangle", "green", "white", (200, 150))
        sample = synthetic.image_sample(spec, 0, synthetic.draw_shape_image("triangle", "green", "white", (200, 150)))
        reloaded = check_transformers_load(staging, model, [sample], log)
        check_fms(staging, reloaded, LlavaNextProcessor.from_pretrained(staging), [sample], log)
    (staging / STAMP).write_text(json.dumps(wanted, indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    log(f"saved {out_dir} in {time.monotonic() - started:.0f} s")
    return out_dir


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--preset", choices=sorted(PRESETS), help="a published model's shapes (replaces the shape options)")
    p.add_argument("--reduced", action="store_true",
                   help="with --preset: its config differences at test size (fp32, 2 text layers, small widths)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="saved dtype (a preset sets its own)")
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
