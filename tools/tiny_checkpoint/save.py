"""Saving in the published granite-vision layout, and the checkpoint's README."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import GenerationConfig

from . import synthetic
from .tokenizer import CHAT_TEMPLATE


def published_name(name: str) -> str:
    """A transformers 5.x module path in the layout of the published checkpoints.

    transformers 5 nests everything under `model.` and flattens the SigLIP tower (no
    `vision_model.`); granite-vision-3.2-2b (and FMS's adapter, which only knows that layout)
    use `vision_tower.vision_model.*`, `multi_modal_projector.*`, `image_newline`,
    `language_model.model.*` and `language_model.lm_head.weight`. transformers maps that
    layout back on load (llava_next + CLIPVisionModel conversion rules).
    """
    renames = [
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.image_newline", "image_newline"),
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
    ]
    for old, new in renames:
        if name.startswith(old):
            return new + name[len(old):]
    raise KeyError(f"no published name for {name}")


SHARD_BYTES = 2 * 2**30


def save_weights(model, out_dir: Path, dtype=torch.float32, shard_bytes: int = SHARD_BYTES) -> None:
    """Weights in the published layout: one ``model.safetensors``, or, past ``shard_bytes``, shards
    with an index as the published checkpoints have. Each shard is copied out and written on its
    own, so saving needs one shard of memory beyond the model, not a second model."""
    tensors = list(model.state_dict().items())
    total = sum(t.numel() * dtype.itemsize for _, t in tensors)
    groups, size = [[]], 0
    for name, t in tensors:
        n = t.numel() * dtype.itemsize
        if groups[-1] and size + n > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, t))
        size += n
    files = (["model.safetensors"] if len(groups) == 1 else
             [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    weight_map = {}
    for file, group in zip(files, groups):
        shard = {published_name(name): t.detach().to(dtype).contiguous().clone() for name, t in group}
        save_file(shard, str(out_dir / file), metadata={"format": "pt"})
        (out_dir / file).chmod(0o644)  # safetensors creates it owner-only
        weight_map.update(dict.fromkeys(shard, file))
        del shard
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def save_checkpoint(model, processor, out_dir: Path, dtype=torch.float32) -> None:
    out_dir.mkdir(parents=True)
    model.config.save_pretrained(out_dir)
    GenerationConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0).save_pretrained(out_dir)
    processor.save_pretrained(out_dir)  # tokenizer files, processor_config.json, chat_template.jinja
    # preprocessor_config.json too, for readers that load the image processor on its own.
    processor.image_processor.save_pretrained(out_dir)
    save_weights(model, out_dir, dtype)

    # transformers 5 writes tokenizer_class "TokenizersBackend", which older readers do not know;
    # PreTrainedTokenizerFast loads the same tokenizer.json everywhere. The template is also put
    # into tokenizer_config.json for tools that only read that file.
    config_path = out_dir / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_config["chat_template"] = CHAT_TEMPLATE
    config_path.write_text(json.dumps(tok_config, indent=2, sort_keys=True) + "\n")


def write_readme(out_dir: Path, *, args, config, metrics, counts, fms_diff, n_params, wall, example_prompt) -> None:
    v, t = config.vision_config, config.text_config
    size = sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file())
    digest = hashlib.sha256((out_dir / "model.safetensors").read_bytes()).hexdigest()
    text = f"""# tiny-granite-vision

A tiny, *trained* Granite Vision checkpoint (transformers `LlavaNextForConditionalGeneration`,
SigLIP vision tower + Granite LM) shaped like `ibm-granite/granite-vision-3.2-2b`, for tests and
demos. It was trained from scratch on synthetic images of one coloured shape
({", ".join(synthetic.SHAPES)}) on a background of another colour
({", ".join(synthetic.COLORS)}), 20..300 px a side, and answers questions about them.

Rebuild (deterministic for a seed and thread count; about {wall / 60:.0f} min on 2 CPU cores):

    python -m tools.tiny_checkpoint --out {args.out} --seed {args.seed} --steps {args.steps} \\
        --vision-steps {args.vision_steps} --shape-weight {args.shape_weight:g} --threads {args.threads}

## Shape

- vision: SigLIP, {v.num_hidden_layers} layers, hidden {v.hidden_size}, {v.num_attention_heads} heads,
  patch {v.patch_size}, crops of {v.image_size} px; features of layers {config.vision_feature_layer}
  concatenated (`vision_feature_select_strategy: full`), gelu projector with bias, `image_newline`.
- anyres `image_grid_pinpoints` (height, width): {config.image_grid_pinpoints}
- text: Granite, {t.num_hidden_layers} layers, hidden {t.hidden_size}, {t.num_attention_heads} heads /
  {t.num_key_value_heads} KV heads, intermediate {t.intermediate_size}, vocab {t.vocab_size},
  embedding_multiplier {t.embedding_multiplier}, residual_multiplier {t.residual_multiplier},
  attention_multiplier {t.attention_multiplier}, logits_scaling {t.logits_scaling}, tied embeddings.
- {n_params:,} parameters, fp32; `model.safetensors` uses the published key names
  (`vision_tower.vision_model.*`, `multi_modal_projector.*`, `image_newline`,
  `language_model.model.*`, `language_model.lm_head.weight`), which both transformers 5.x and
  FMS (`get_model(architecture="hf_pretrained", ...)`) load without missing or unused keys.
- tokenizer: byte-level BPE ({len(json.loads((out_dir / "tokenizer.json").read_text())["model"]["vocab"])} tokens);
  `<|end_of_text|>` (id 0) is bos/eos/pad, `<image>` is id {config.image_token_id}.

Prompt for one image and "What is in the image?" (chat template, `add_generation_prompt=True`):

```
{example_prompt}```

Expected greedy answer: `a green triangle on a white background<|end_of_text|>` for
`draw_shape_image("triangle", "green", "white", (200, 150))`.

## Evaluation (held-out images, greedy, `max_new_tokens=20`)

- exact answers ending in `<|end_of_text|>`: {metrics["correct"]}/{metrics["samples"]}
  ({metrics["accuracy"]:.1%}); by kind {metrics["by_kind"]}
- top-1 minus top-2 logit on answer tokens (teacher forced), transformers scale: mean
  {metrics["margin_mean"]:.2f}, min {metrics["margin_min"]:.2f}; divided by logits_scaling (FMS /
  GraniteForCausalLM scale): mean {metrics["margin_mean_scaled"]:.2f}, min {metrics["margin_min_scaled"]:.2f}
- FMS vs transformers prefill logits (after dividing by logits_scaling): max abs diff {fms_diff:.1e}
- image tokens per image (width x height: tokens): {counts}

Note: transformers' `LlavaNextForConditionalGeneration` does not divide logits by
`logits_scaling`; FMS (and `GraniteForCausalLM`) do. Greedy outputs agree; sampling temperatures
do not. The model was trained on the divided logits.

Total size {size / 1e6:.1f} MB; sha256 of model.safetensors (seed {args.seed}, {args.threads} threads):
`{digest}`.
"""
    (out_dir / "README.md").write_text(text)
