"""Evaluation of the trained model (greedy answers on held-out images, teacher-forced margins)
and checks of the saved directory: it reloads in transformers and FMS with every key placed and
the same logits, and image token counts match the features."""

from __future__ import annotations

import io
import logging
import random
from contextlib import redirect_stdout
from pathlib import Path

import torch
from transformers import LlavaNextForConditionalGeneration

from . import synthetic
from .batches import collate, encode, prompt_text
from .model import LOGITS_SCALING
from .tokenizer import CHAT_TEMPLATE
from .train import answer_logits

# Image sizes (width, height) whose token counts are checked against the model's features.
TOKEN_COUNT_SIZES = [
    (1, 1),
    (300, 20),
    (20, 300),
    (56, 56),
    (200, 150),
    (150, 200),
    (57, 113),
    (300, 300),
    (20, 20),
    (224, 56),
    (640, 480),
]


def eval_samples(seed: int, n_random: int) -> list[synthetic.Sample]:
    """Held-out single-turn samples (a separate random stream), plus fixed cases tests rely on."""
    rng = random.Random(seed + 1_000_003)
    samples = [synthetic.random_sample(rng, p_two_images=0.2, p_text_only=0.0) for _ in range(n_random)]
    # The README/test example with every template, and two-image prompts around it.
    spec = synthetic.ShapeSpec("triangle", "green", "white", (200, 150))
    image = synthetic.render(spec)
    samples += [synthetic.image_sample(spec, t, image) for t in range(len(synthetic.IMAGE_QUESTIONS))]
    other = synthetic.ShapeSpec("circle", "red", "blue", (120, 80))
    for which in range(len(synthetic.TWO_IMAGE_QUESTIONS)):
        samples.append(synthetic.two_image_sample([spec, other], which, [image, synthetic.render(other)]))
    samples += [synthetic.Sample([qa], "text") for qa in synthetic.TEXT_ONLY]
    return samples


@torch.no_grad()
def evaluate(model, processor, samples: list[synthetic.Sample], log) -> dict:
    tokenizer = processor.tokenizer
    eos = tokenizer.eos_token_id
    correct, failures, margins, by_kind = 0, [], [], {}
    for sample in samples:
        enc = encode(processor, sample)
        inputs = processor(images=sample.images or None, text=prompt_text(processor, sample), return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1] :].tolist()
        ok = bool(new) and new[-1] == eos and tokenizer.decode(new[:-1]) == sample.answer
        correct += ok
        kind = sample.kind.split(":")[0]
        hit, total = by_kind.get(kind, (0, 0))
        by_kind[kind] = (hit + ok, total + 1)
        if not ok:
            failures.append((sample, tokenizer.decode(new)))
        # Teacher-forced margin between the best and second-best logit on each answer token.
        logits, _ = answer_logits(model, collate([enc], tokenizer.pad_token_id))
        top2 = logits.topk(2, dim=-1).values
        margins.append(top2[:, 0] - top2[:, 1])
    margins_t = torch.cat(margins)
    result = {
        "samples": len(samples),
        "correct": correct,
        "accuracy": correct / len(samples),
        "by_kind": {k: f"{h}/{t}" for k, (h, t) in sorted(by_kind.items())},
        # transformers' LlavaNext logits (not divided by logits_scaling), and Granite/FMS scale.
        "margin_mean": margins_t.mean().item(),
        "margin_min": margins_t.min().item(),
        "margin_mean_scaled": margins_t.mean().item() / LOGITS_SCALING,
        "margin_min_scaled": margins_t.min().item() / LOGITS_SCALING,
    }
    log(f"eval: {correct}/{len(samples)} exact ({result['accuracy']:.1%}), by kind {result['by_kind']}")
    log(
        f"eval: top1-top2 logit margin on answer tokens: mean {result['margin_mean']:.2f}, "
        f"min {result['margin_min']:.2f} (divided by logits_scaling: mean "
        f"{result['margin_mean_scaled']:.2f}, min {result['margin_min_scaled']:.2f})"
    )
    for sample, got in failures[:10]:
        sizes = [s.size for s in sample.specs]
        log(f"  FAIL {sample.kind} {sizes} {sample.question!r}: want {sample.answer!r}, got {got!r}")
    return result


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def check_transformers_load(out_dir: Path, trained, samples, log) -> LlavaNextForConditionalGeneration:
    from transformers import AutoProcessor, AutoTokenizer

    records = _Records()
    logging.getLogger("transformers").addHandler(records)
    try:
        model, info = LlavaNextForConditionalGeneration.from_pretrained(
            out_dir, output_loading_info=True, dtype=torch.float32
        )
        processor = AutoProcessor.from_pretrained(out_dir)
        tokenizer = AutoTokenizer.from_pretrained(out_dir)
    finally:
        logging.getLogger("transformers").removeHandler(records)
    model.eval()
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise RuntimeError(f"transformers loading info not clean: {problems}")
    load_warnings = [m for m in records.messages if "weight" in m.lower() or "key" in m.lower()]
    if load_warnings:
        raise RuntimeError(f"transformers warned while loading: {load_warnings}")
    if model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr():
        raise RuntimeError("lm_head is not tied to embed_tokens after loading")
    if tokenizer.chat_template != CHAT_TEMPLATE or processor.chat_template != CHAT_TEMPLATE:
        raise RuntimeError("chat template did not round-trip")

    worst = 0.0
    with torch.no_grad():
        for sample in samples:
            inputs = processor(images=sample.images or None, text=prompt_text(processor, sample), return_tensors="pt")
            worst = max(worst, (model(**inputs).logits - trained(**inputs).logits).abs().max().item())
    log(f"transformers reload: loading info clean, max |logits - in-memory| = {worst:.2e}")
    if worst > 1e-5:
        raise RuntimeError("reloaded model differs from the trained one")
    return model


def check_token_counts(model, processor, log) -> dict[str, int]:
    counts = {}
    question = [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    with torch.no_grad():
        for width, height in TOKEN_COUNT_SIZES:
            image = synthetic.draw_shape_image("square", "red", "blue", (width, height))
            inputs = processor(images=[image], text=prompt, return_tensors="pt")
            n_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
            features = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
            n_features = sum(f.shape[0] for f in features)
            if n_tokens != n_features:
                raise RuntimeError(f"{width}x{height}: {n_tokens} image tokens but {n_features} features")
            model(**inputs)  # raises if the merge does not line up
            counts[f"{width}x{height}"] = n_tokens
    log(f"image tokens per image (WxH: n): {counts}")
    return counts


def check_fms(out_dir: Path, hf_model, processor, samples, log) -> float:
    """Load with FMS's HF adapter and compare prefill logits with transformers (batch size 1)."""
    from fms.models import get_model
    from fms.utils import serialization

    records = _Records()
    logging.getLogger("fms").addHandler(records)
    printed = io.StringIO()
    try:
        with redirect_stdout(printed):
            fms_model = get_model(architecture="hf_pretrained", model_path=str(out_dir), data_type=torch.float32)
    finally:
        logging.getLogger("fms").removeHandler(records)
    fms_model.eval()
    noise = [m for m in records.messages + printed.getvalue().splitlines() if m.strip()]
    if any("not copied" in m or "Missing" in m for m in noise):
        raise RuntimeError(f"FMS did not load every key: {noise}")

    # FMS only reports checkpoint keys it could not place; check the other direction too.
    from safetensors.torch import load_file

    adapter = serialization._get_adapter("llava_next", "hf")
    adapted = adapter(load_file(str(out_dir / "model.safetensors")), model_config=fms_model.config)
    missing = set(fms_model.state_dict()) - set(adapted)
    if not hf_model.config.vision_config.vision_use_head:  # FMS builds SigLIP's pooling head regardless
        missing = {k for k in missing if not k.startswith("vision_tower.head.")}
    if missing:
        raise RuntimeError(f"FMS parameters not in the checkpoint: {sorted(missing)}")

    worst = 0.0
    with torch.no_grad():
        for sample in samples:
            inputs = processor(images=sample.images or None, text=prompt_text(processor, sample), return_tensors="pt")
            hf_logits = hf_model(**inputs).logits / LOGITS_SCALING  # FMS divides, transformers does not
            kwargs = {"use_cache": False}
            if sample.images:
                kwargs.update(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
            embeds, _ = fms_model.prepare_inputs_for_generation(0, inputs["input_ids"], kwargs)
            fms_logits = fms_model(embeds, use_cache=False)
            if not torch.isfinite(fms_logits).all():
                raise RuntimeError("FMS produced non-finite logits")
            worst = max(worst, (fms_logits - hf_logits).abs().max().item())
    log(f"FMS: all keys loaded, max |fms - transformers/logits_scaling| = {worst:.2e}")
    if worst > 1e-4:
        raise RuntimeError("FMS and transformers disagree")
    return worst
