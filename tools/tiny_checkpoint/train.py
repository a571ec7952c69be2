"""Training, all AdamW from random init: stage 1 the vision tower and projector alone on
whole-image crops with a training-only attribute probe, stage 2 everything end to end on
chat-templated conversations with the probe still on."""

from __future__ import annotations

import math
import random
import time

import numpy as np
import torch
import torch.nn.functional as F
from transformers import LlavaNextForConditionalGeneration

from . import synthetic
from .batches import COLOR_NAMES, Encoded, attribute_classes, collate, encode
from .model import CROP, LOGITS_SCALING, PATCH


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
        attributes = torch.tensor([attribute_classes(spec) for spec in specs])
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
