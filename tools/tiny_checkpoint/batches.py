"""Conversations tokenized exactly as they are served, and padded into training batches."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LlavaNextProcessor

from . import synthetic

COLOR_NAMES = sorted(synthetic.COLORS)


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
    return Encoded(input_ids, labels, pixel_values, image_sizes, [attribute_classes(spec) for spec in sample.specs])


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


def attribute_classes(spec: synthetic.ShapeSpec) -> tuple[int, int, int]:
    """The (shape, colour, background) classes of an image, what the training probe predicts."""
    return synthetic.SHAPES.index(spec.shape), COLOR_NAMES.index(spec.color), COLOR_NAMES.index(spec.background)
