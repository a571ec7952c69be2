"""Build, train, verify and save the tiny Granite Vision checkpoint.

    python -m spyre_backend.tiny.build_checkpoint --out checkpoints/tiny-granite-vision [--seed 0] [--steps N]

The result is a real `LlavaNextForConditionalGeneration` shaped like ibm-granite/granite-vision-3.2-2b
(SigLIP tower with 27 layers and multi-layer features, gelu projector, image_newline, anyres
pinpoints, Granite LM with GQA, muP-style multipliers and tied embeddings), only tiny, trained
from scratch on synthetic shapes until its greedy answers are right and confident. It is saved
in the *published* key layout, which both transformers 5.x and FMS load, and checked against both.

Training has two stages, all AdamW from random init:
1. the vision tower and projector alone on whole-image crops, with a training-only linear probe
   (shape, colour, background) on their features: cheap, and it gives the tower the direct
   signal a not-yet-looking LM cannot;
2. everything end to end on chat-templated conversations (1..5 questions about the same image,
   two-image and text-only prompts) through the real processor, loss on the answers + eos,
   with the probe still on.
Then greedy generation is evaluated on held-out images, and the saved directory is reloaded with
transformers and FMS, checked for clean loading, token/feature counts and matching logits.

The run is deterministic for a given seed and thread count (`--threads`, default 2).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import math
import random
import shutil
import sys
import time
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    GraniteConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
)
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from . import synthetic

# --------------------------------------------------------------------------------------------
# Shapes of everything. Crops of 56 px with 14 px patches give 4x4 = 16 features per crop.
# --------------------------------------------------------------------------------------------
CROP = 56
PATCH = 14
# (height, width) multiples of the crop, like the real model's 384-based list (which also starts
# with the 1x1 grid): enough variety that wide, tall and square images take different paths.
GRID_PINPOINTS = [
    [56, 56],
    [56, 112],
    [112, 56],
    [112, 112],
    [56, 168],
    [168, 56],
    [112, 168],
    [168, 112],
    [56, 224],
    [224, 56],
]
VISION_FEATURE_LAYERS = [-24, -20, -12, -1]  # as granite-vision-3.2-2b; needs >= 24 layers

COLOR_NAMES = sorted(synthetic.COLORS)

EOS = "<|end_of_text|>"
IMAGE_TOKEN = "<image>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
# <|end_of_text|> is id 0 like in Granite (bos = eos = pad = 0).
SPECIAL_TOKENS = [EOS, *ROLE_TOKENS, IMAGE_TOKEN]
TOKENIZER_VOCAB = 512

SYSTEM_PROMPT = (
    "A chat between a curious user and a tiny vision assistant. "
    "The assistant answers questions about simple pictures briefly."
)

# granite-vision-3.2 style: "<|system|>\n...\n<|user|>\n<image>\nquestion\n<|assistant|>\n".
# Content may be a string or a list of {"type": "image"} / {"type": "text", "text": ...} parts;
# each image part becomes "<image>\n" (so images given before the question sit on their own
# lines), text parts are copied verbatim. Assistant turns end with <|end_of_text|>.
CHAT_TEMPLATE = """\
{%- macro render(content) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- else -%}
        {%- for part in content -%}
            {%- if part['type'] in ['image', 'image_url'] -%}
                {{- '<image>\\n' -}}
            {%- elif part['type'] == 'text' -%}
                {{- part['text'] -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- if not messages or messages[0]['role'] != 'system' -%}
    {{- '<|system|>\\n' + default_system_prompt + '\\n' -}}
{%- endif -%}
{%- for message in messages -%}
    {%- if message['role'] == 'system' -%}
        {{- '<|system|>\\n' + render(message['content']) + '\\n' -}}
    {%- elif message['role'] == 'user' -%}
        {{- '<|user|>\\n' + render(message['content']) + '\\n' -}}
    {%- elif message['role'] == 'assistant' -%}
        {{- '<|assistant|>\\n' + render(message['content']) + eos_token + '\\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|assistant|>\\n' -}}
{%- endif -%}
""".replace("default_system_prompt", repr(SYSTEM_PROMPT))

# Granite's multipliers, all != 1 so every code path that applies them is exercised.
EMBEDDING_MULTIPLIER = 12.0
RESIDUAL_MULTIPLIER = 0.22
ATTENTION_MULTIPLIER = 0.0625  # 1/head_dim (muP-style, as Granite 2B: 1/64 for head_dim 64)
LOGITS_SCALING = 8.0

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


# --------------------------------------------------------------------------------------------
# Tokenizer, processor, model
# --------------------------------------------------------------------------------------------
def build_tokenizer(image_token_id: int | None = None) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on every string the synthetic data can produce.

    ``image_token_id``: put ``<image>`` at that id instead of right after the other special
    tokens, the vocabulary between padded with tokens no text encodes to (the published
    granite-vision tokenizer has 49155 entries and ``<image>`` at 49155)."""
    bpe = Tokenizer(models.BPE())
    # No prefix space: the answer is tokenized on its own after "<|assistant|>\n", and must
    # split exactly as the model will generate it.
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = SPECIAL_TOKENS if image_token_id is None else [t for t in SPECIAL_TOKENS if t != IMAGE_TOKEN]
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(synthetic.corpus(SYSTEM_PROMPT) + _filler_text(), trainer)
    if image_token_id is not None:
        bpe = _padded(bpe, image_token_id)
        bpe.add_special_tokens([IMAGE_TOKEN])
    for token in SPECIAL_TOKENS:
        wanted = SPECIAL_TOKENS.index(token) if token != IMAGE_TOKEN or image_token_id is None else image_token_id
        assert bpe.token_to_id(token) == wanted, (token, bpe.token_to_id(token))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
        padding_side="left",  # for batched generation, as Granite's tokenizer
        clean_up_tokenization_spaces=False,
    )
    return tokenizer


def _padded(bpe: Tokenizer, size: int) -> Tokenizer:
    """The same BPE with its vocabulary filled up to ``size`` entries by tokens that no merge
    produces (so no text encodes to them; the model may still generate them)."""
    spec = json.loads(bpe.to_str())
    vocab = spec["model"]["vocab"]
    for i in range(len(vocab), size):
        vocab[f"<|unused_{i}|>"] = i
    return Tokenizer.from_str(json.dumps(spec))


def _filler_text() -> list[str]:
    # A little general text so the BPE reaches its vocab size and everyday words in served
    # prompts do not all fall back to single bytes.
    words = (
        "the a an is are was of to in on at for with and or not this that it what which who how why "
        "where when image picture photo shape color colour background left right top bottom big small "
        "large tiny one two three four five six seven eight nine ten yes no please thank you "
        "hello describe show tell name count there here"
    ).split()
    return [" ".join(words)] + [f"{i} + {j} = {i + j}" for i in range(10) for j in range(10)]


def scaled_pinpoints(crop: int) -> list[list[int]]:
    """GRID_PINPOINTS for another crop size (the same grids of crops)."""
    return [[h // CROP * crop, w // CROP * crop] for h, w in GRID_PINPOINTS]


def build_processor(tokenizer: PreTrainedTokenizerFast, crop: int = CROP,
                    pinpoints: list[list[int]] | None = None) -> LlavaNextProcessor:
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": crop},
        crop_size={"height": crop, "width": crop},
        image_grid_pinpoints=pinpoints or scaled_pinpoints(crop),
        image_mean=[0.5, 0.5, 0.5],  # SigLIP normalisation
        image_std=[0.5, 0.5, 0.5],
        do_pad=True,
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="full",  # SigLIP has no CLS token to drop
        num_additional_image_tokens=0,
        image_token=IMAGE_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )


def build_config(
    tokenizer: PreTrainedTokenizerFast, text_init_std: float = 0.02, vision_hidden: int = 32, vision_heads: int = 2,
    *, crop: int = CROP, text_hidden: int = 64, text_layers: int = 4, text_heads: int = 4, text_kv_heads: int = 2,
    attention_multiplier: float = ATTENTION_MULTIPLIER, vision_intermediate: int = 0, text_intermediate: int = 0,
    rope_theta: float = 10000.0, max_positions: int = 4096, pinpoints: list[list[int]] | None = None,
) -> LlavaNextConfig:
    """The shipped tiny shape by default; the keywords give other sizes of the same architecture
    (spyre_backend/tiny/random_checkpoint.py builds a mid-size one for benchmarks, and the
    published 2b shape). Intermediate sizes of 0 mean 4x the width."""
    vocab_size = len(tokenizer)
    vision = SiglipVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_intermediate or 4 * vision_hidden,
        num_hidden_layers=27,
        num_attention_heads=vision_heads,
        image_size=crop,
        patch_size=PATCH,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
    )
    text = GraniteConfig(
        vocab_size=vocab_size,
        hidden_size=text_hidden,
        intermediate_size=text_intermediate or 4 * text_hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        num_key_value_heads=text_kv_heads,
        hidden_act="silu",
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        rope_theta=rope_theta,
        embedding_multiplier=EMBEDDING_MULTIPLIER,
        residual_multiplier=RESIDUAL_MULTIPLIER,
        attention_multiplier=attention_multiplier,
        logits_scaling=LOGITS_SCALING,
        tie_word_embeddings=True,
        initializer_range=text_init_std,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_grid_pinpoints=pinpoints or scaled_pinpoints(crop),
        vision_feature_layer=VISION_FEATURE_LAYERS,
        vision_feature_select_strategy="full",
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=True,
    )
    config.architectures = ["LlavaNextForConditionalGeneration"]
    return config


# --------------------------------------------------------------------------------------------
# Data: chat-templated prompts through the real processor, loss on the answer (+ eos) only
# --------------------------------------------------------------------------------------------
@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # the answer tokens (+ eos) of every turn, -100 elsewhere
    pixel_values: list[torch.Tensor]  # one (crops, 3, 56, 56) tensor per image
    image_sizes: list[torch.Tensor]
    attributes: list[tuple[int, int, int]]  # (shape, colour, background) class of each image


def prompt_text(processor: LlavaNextProcessor, sample: synthetic.Sample) -> str:
    """The served prompt: chat template of the first user turn plus the generation prompt."""
    return processor.apply_chat_template(sample.messages(1), add_generation_prompt=True, tokenize=False)


def encode(processor: LlavaNextProcessor, sample: synthetic.Sample) -> Encoded:
    """Tokenize a conversation exactly as it is served, turn by turn.

    Each prompt piece is the chat template's text between two answers (the first one through the
    processor, which expands <image>); each answer is tokenized on its own and followed by eos.
    Pieces meet at special tokens or newlines, where byte-level BPE splits anyway, so this equals
    tokenizing the whole conversation, and the first turn equals the served single-turn prompt.
    """
    tokenizer = processor.tokenizer
    input_ids: list[int] = []
    labels: list[int] = []
    pixel_values: list[torch.Tensor] = []
    image_sizes: list[torch.Tensor] = []
    consumed = ""
    for turn, (_, answer) in enumerate(sample.turns):
        prompt = processor.apply_chat_template(sample.messages(turn + 1), add_generation_prompt=True, tokenize=False)
        assert prompt.startswith(consumed), "chat template is not incremental"
        piece = prompt[len(consumed) :]
        if turn == 0:
            enc = processor(images=sample.images or None, text=piece, return_tensors="pt")
            piece_ids = enc["input_ids"][0].tolist()
            if sample.images:
                pixel_values, image_sizes = list(enc["pixel_values"]), list(enc["image_sizes"])
        else:
            piece_ids = tokenizer(piece, add_special_tokens=False).input_ids
        answer_ids = tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        input_ids += piece_ids + answer_ids
        labels += [-100] * len(piece_ids) + answer_ids
        consumed = prompt + answer + tokenizer.eos_token
    return Encoded(input_ids, labels, pixel_values, image_sizes, [_attributes(spec) for spec in sample.specs])


def collate(batch: list[Encoded], pad_id: int) -> dict:
    """Right-pad the token rows; stack every image's crops, zero-padded to the most crops."""
    length = max(len(e.input_ids) for e in batch)
    input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), length), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, e in enumerate(batch):
        input_ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[row, : len(e.labels)] = torch.tensor(e.labels)
        attention_mask[row, : len(e.input_ids)] = 1
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    crops = [pv for e in batch for pv in e.pixel_values]
    if crops:
        most = max(pv.shape[0] for pv in crops)
        pixel_values = torch.zeros((len(crops), most, *crops[0].shape[1:]))
        for i, pv in enumerate(crops):
            pixel_values[i, : pv.shape[0]] = pv
        out["pixel_values"] = pixel_values
        out["image_sizes"] = torch.stack([s for e in batch for s in e.image_sizes])
        out["attributes"] = torch.tensor([a for e in batch for a in e.attributes])
    return out


def forward_answers(model: LlavaNextForConditionalGeneration, batch: dict):
    """Logits (as transformers' LlavaNext returns them) at positions predicting answer tokens,
    their targets, and the packed features of each image (what the LM receives)."""
    image_features = None
    mm = None
    if "pixel_values" in batch:
        # Computed once here and handed to the model, so the auxiliary loss sees exactly the
        # features that are merged into the prompt.
        mm = {"image": model.model.get_image_features(batch["pixel_values"], batch["image_sizes"], return_dict=True)}
        image_features = mm["image"].pooler_output
    hidden = model.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], mm_encoder_outputs=mm
    ).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    # Only the answer positions go through lm_head: most of a row is image tokens.
    return model.lm_head(hidden[:, :-1][keep]), targets[keep], image_features


def answer_logits(model: LlavaNextForConditionalGeneration, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    logits, targets, _ = forward_answers(model, batch)
    return logits, targets


CROP_TOKENS = (CROP // PATCH) ** 2  # features of one crop; each image's packed features start with its base crop
PROBE_NAMES = ("shape", "color", "bg", "shape@crop")


class AttributeProbe(torch.nn.Module):
    """Training-only linear heads on an image's features: shape, colour and background.

    The vision tower starts from random weights and the LM cannot send it a useful signal
    before it has learnt to look at the image, so these heads give the tower and projector a
    direct one: on the mean of all the image's features (pushes every token to carry the
    answers, which makes them easy to read), and, for the shape, on the base crop's 16 tokens in
    order (a shape is a spatial layout: a triangle is bottom heavy, a cross fills the middle row
    and column; position-aware, this is learnt far faster). Not part of the saved model.
    """

    def __init__(self, dim: int, shape_weight: float = 1.0):
        super().__init__()
        # Relative weight of the averaged-shape head: the LM reads an image much like an
        # average over its tokens, so that head is the one that matters for the answers.
        self.weights = (shape_weight, 1.0, 1.0, 1.0)
        self.sizes = (len(synthetic.SHAPES), len(COLOR_NAMES), len(COLOR_NAMES))
        self.mean_head = torch.nn.Linear(dim, sum(self.sizes))
        self.crop_head = torch.nn.Linear(CROP_TOKENS * dim, len(synthetic.SHAPES))

    def forward(self, image_features: list[torch.Tensor], attributes: torch.Tensor):
        """Mean cross-entropy of the four heads, and each head's accuracy (PROBE_NAMES order)."""
        pooled = torch.stack([f.mean(0) for f in image_features])
        base = torch.stack([f[:CROP_TOKENS].flatten() for f in image_features])
        logits = [*self.mean_head(pooled).split(self.sizes, dim=-1), self.crop_head(base)]
        targets = [attributes[:, 0], attributes[:, 1], attributes[:, 2], attributes[:, 0]]
        losses = [w * F.cross_entropy(lg, t) for w, lg, t in zip(self.weights, logits, targets)]
        loss = sum(losses) / sum(self.weights)
        accuracy = [(lg.argmax(-1) == t).float().mean().item() for lg, t in zip(logits, targets)]
        return loss, accuracy


def crop_features(model: LlavaNextForConditionalGeneration, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected multi-layer features of single crops (B, 3, 56, 56) -> (B, 16, text hidden).

    The same computation as LlavaNext's get_image_features before packing ("full" strategy).
    """
    hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
    selected = torch.cat([hidden[i] for i in model.config.vision_feature_layer], dim=-1)
    return model.model.multi_modal_projector(selected)


def pretrain_vision(model, processor, probe: AttributeProbe, args, log) -> None:
    """Stage 1: the tower, projector and probe on whole-image crops only (no LM), which is
    cheap: 16 tokens an image instead of the LM's hundreds."""
    rng = random.Random(args.seed + 17)
    params = [
        *model.model.vision_tower.parameters(),
        *model.model.multi_modal_projector.parameters(),
        *probe.parameters(),
    ]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    steps = args.vision_steps
    warmup = max(1, steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    start = time.time()
    stats: dict[str, float] = {}
    for step in range(steps):
        specs = [synthetic.random_spec(rng) for _ in range(args.vision_batch_size)]
        images = [synthetic.render(spec, rng) for spec in specs]
        # The processor's own preprocessing; index 0 of each image is its whole-image crop.
        pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"][:, 0]
        attributes = torch.tensor([_attributes(spec) for spec in specs])
        loss, accuracy = probe(list(crop_features(model, pixel_values)), attributes)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        for name, acc in zip(PROBE_NAMES, accuracy):
            stats[name] = acc if name not in stats else 0.9 * stats[name] + 0.1 * acc
        if step % 50 == 0 or step == steps - 1:
            accs = "  ".join(f"{k} {v:.2f}" for k, v in stats.items())
            log(f"vision step {step:4d}/{steps}  probe loss {loss.item():.3f}  acc: {accs}  {time.time() - start:.0f}s")


def _attributes(spec: synthetic.ShapeSpec) -> tuple[int, int, int]:
    return synthetic.SHAPES.index(spec.shape), COLOR_NAMES.index(spec.color), COLOR_NAMES.index(spec.background)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(model, processor, probe: AttributeProbe, args, log) -> None:
    """Stage 2: the whole model on conversations, plus the probe on every image's features."""
    rng = random.Random(args.seed)  # the training data stream
    pad_id = processor.tokenizer.pad_token_id
    steps = args.steps

    # The probe keeps the tower's features readable while the LM learns to read them. The tower
    # can get its own rate or stay frozen for the first steps (`--vision-lr-mult`,
    # `--vision-freeze`); with stage 1 before, the full rate from the start works best.
    def is_vision(name: str) -> bool:
        return name.startswith("model.vision_tower.")

    groups = []
    for vision in (False, True):
        for decay in (True, False):
            params = [
                p
                for n, p in model.named_parameters()
                if is_vision(n) == vision and (p.ndim >= 2 and "embed" not in n) == decay
            ]
            groups.append({"params": params, "weight_decay": 0.01 if decay else 0.0})
    groups[0]["params"] += list(probe.parameters())
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98), eps=1e-8)
    warmup = max(1, steps // 20)
    frozen = int(steps * args.vision_freeze)

    def lm_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    def vision_factor(step: int) -> float:
        if step < frozen:
            return 0.0
        ramp = min(1.0, (step - frozen + 1) / warmup)
        return args.vision_lr_mult * ramp * lm_factor(step)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [lm_factor, lm_factor, vision_factor, vision_factor])

    # Prompt lengths vary a lot with image size and turns (40..400 tokens); drawing a few
    # batches at once and grouping similar lengths keeps the padding small.
    group = 4
    queue: list[list[Encoded]] = []
    model.train()
    start = time.time()
    stats: dict[str, float] = {}

    def track(name: str, value: float) -> None:
        stats[name] = value if name not in stats else 0.95 * stats[name] + 0.05 * value

    for step in range(steps):
        if not queue:
            pool = [
                encode(processor, synthetic.random_sample(rng, max_turns=args.max_turns))
                for _ in range(group * args.batch_size)
            ]
            pool.sort(key=lambda e: len(e.input_ids))
            queue = [pool[i * args.batch_size : (i + 1) * args.batch_size] for i in range(group)]
            rng.shuffle(queue)
        batch = collate(queue.pop(), pad_id)
        logits, targets, image_features = forward_answers(model, batch)
        # Train on Granite's scaled logits (what GraniteForCausalLM and FMS output), so the
        # model is confident in that scale too; transformers' LlavaNext skips the division, so
        # its logits are LOGITS_SCALING times larger and only sharper.
        loss = lm_loss = F.cross_entropy(logits / LOGITS_SCALING, targets)
        track("lm", lm_loss.item())
        if image_features is not None and args.probe_weight > 0:
            probe_loss, probe_acc = probe(image_features, batch["attributes"])
            loss = loss + args.probe_weight * probe_loss
            for name, acc in zip(PROBE_NAMES, probe_acc):
                track(name, acc)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        optimizer.step()
        scheduler.step()
        if step % 25 == 0 or step == steps - 1:
            probe_acc = "  ".join(f"{k} {stats[k]:.2f}" for k in PROBE_NAMES if k in stats)
            log(
                f"step {step:4d}/{steps}  lm loss {lm_loss.item():.4f} (avg {stats['lm']:.4f})  "
                f"probe acc: {probe_acc}  lr {scheduler.get_last_lr()[0]:.2e}  {time.time() - start:.0f}s"
            )
    model.eval()


# --------------------------------------------------------------------------------------------
# Evaluation: greedy generation on held-out images, and teacher-forced margins
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# Saving in the published granite-vision layout
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# Verification of the saved directory
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# README of the checkpoint
# --------------------------------------------------------------------------------------------
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

    python -m spyre_backend.tiny.build_checkpoint --out {args.out} --seed {args.seed} --steps {args.steps} \\
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


# --------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to (re)create")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1800)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-turns", type=int, default=5, help="questions per training conversation")
    parser.add_argument("--vision-lr-mult", type=float, default=1.0, help="vision tower lr / LM lr")
    parser.add_argument("--vision-freeze", type=float, default=0.0, help="fraction of steps with a frozen tower")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-samples", type=int, default=150, help="random held-out samples")
    parser.add_argument("--vision-steps", type=int, default=1500, help="stage 1: tower + projector on crops")
    parser.add_argument("--vision-batch-size", type=int, default=64)
    parser.add_argument("--probe-weight", type=float, default=1.0, help="weight of the attribute probe loss")
    parser.add_argument("--shape-weight", type=float, default=4.0, help="probe weight of the averaged shape head")
    parser.add_argument("--vision-hidden", type=int, default=32, help="vision tower width")
    parser.add_argument("--vision-heads", type=int, default=2)
    parser.add_argument("--text-init-std", type=float, default=0.1, help="init std of LM/projector weights")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (results depend on it)")
    # The shipped run reaches 0.957 (single images 123/124; two-image prompts are the weak part).
    parser.add_argument("--min-accuracy", type=float, default=0.9)
    args = parser.parse_args(argv)

    started = time.time()
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)

    out_dir: Path = args.out
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "config.json").exists():
        log(f"refusing to replace {out_dir}: not empty and not a checkpoint")
        return 2

    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    config = build_config(tokenizer, args.text_init_std, args.vision_hidden, args.vision_heads)
    model = LlavaNextForConditionalGeneration(config)
    with torch.no_grad():
        # The loss sees logits divided by logits_scaling; starting the final norm's gain at that
        # factor gives the usual initial output scale instead of one Adam needs ~1000 steps to grow.
        model.model.language_model.norm.weight.fill_(LOGITS_SCALING)
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"tokenizer: {len(tokenizer)} tokens; model: {n_params:,} parameters")

    probe = AttributeProbe(config.text_config.hidden_size, args.shape_weight)
    pretrain_vision(model, processor, probe, args, log)
    train(model, processor, probe, args, log)
    log(f"trained in {time.time() - started:.0f}s")

    samples = eval_samples(args.seed, args.eval_samples)
    metrics = evaluate(model, processor, samples, log)

    # Write next to the target, then swap, so a failed run never leaves half a checkpoint.
    staging = out_dir.with_name(out_dir.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    save_checkpoint(model, processor, staging)

    probe = [s for s in samples if s.kind.startswith("two")][:2] + samples[:4] + samples[-1:]
    reloaded = check_transformers_load(staging, model, probe, log)
    loaded_processor = LlavaNextProcessor.from_pretrained(staging)
    counts = check_token_counts(reloaded, loaded_processor, log)
    fms_diff = check_fms(staging, reloaded, loaded_processor, probe, log)

    example = synthetic.image_sample(
        synthetic.ShapeSpec("triangle", "green", "white", (200, 150)), 0, synthetic.draw_shape_image("triangle", "green", "white")
    )
    example_prompt = prompt_text(loaded_processor, example)
    log(f"prompt for one image: {example_prompt!r}")
    wall = time.time() - started
    write_readme(
        staging,
        args=args,
        config=config,
        metrics=metrics,
        counts=counts,
        fms_diff=fms_diff,
        n_params=n_params,
        wall=wall,
        example_prompt=example_prompt,
    )
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    size = sum(p.stat().st_size for p in out_dir.iterdir())
    log(f"saved {out_dir} ({size / 1e6:.1f} MB) in {wall:.0f}s")
    if metrics["accuracy"] < args.min_accuracy:
        log(f"accuracy {metrics['accuracy']:.1%} is below --min-accuracy {args.min_accuracy:.0%}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
