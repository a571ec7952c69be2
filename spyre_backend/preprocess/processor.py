"""Turns a request (prompt text + encoded images) into model inputs with the HF processor.

The processor tiles each image (anyres), tokenizes the prompt and expands every ``<image>`` into
exactly as many placeholder tokens as the vision encoder will return features for that image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from transformers import AutoProcessor

from spyre_backend.config import InputLimits, ServingConfig
from spyre_backend.engine.sampling_params import InvalidRequest
from spyre_backend.preprocess.images import decode_image


@dataclass
class ProcessedPrompt:
    input_ids: np.ndarray  # [n] int64, placeholders expanded
    pixel_values: np.ndarray  # [num_images, max_crops, 3, H, W] float32 (num_images may be 0)
    image_sizes: np.ndarray  # [num_images, 2] int64 (height, width)


class Preprocessor:
    def __init__(self, checkpoint: str, limits: InputLimits | None = None):
        self.processor = AutoProcessor.from_pretrained(checkpoint)
        self.tokenizer = self.processor.tokenizer
        self.image_token = self.processor.image_token
        self.limits = limits or ServingConfig().input_limits()
        crop = self.processor.image_processor.crop_size
        self._crop_hw = (crop["height"], crop["width"])

    def chat_prompt(self, question: str, num_images: int) -> str:
        """The checkpoint's chat template around a user question, images placed first."""
        if self.image_token in question:
            content = [{"type": "text", "text": question}]
            # the template renders image entries itself; when the question already places its
            # images, render text only and keep the question's own tags.
        else:
            content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": question}]
        messages = [{"role": "user", "content": content}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def empty(self, input_ids: np.ndarray | None = None) -> ProcessedPrompt:
        """No images (a zero-size image dimension passes between ensemble steps)."""
        ids = np.zeros(0, dtype=np.int64) if input_ids is None else input_ids
        return ProcessedPrompt(ids, np.zeros((0, 1, 3, *self._crop_hw), dtype=np.float32),
                               np.zeros((0, 2), dtype=np.int64))

    def __call__(self, text: str, images: list[bytes], apply_chat_template: bool = False) -> ProcessedPrompt:
        limits = self.limits
        if len(images) > limits.max_images:
            raise InvalidRequest(f"{len(images)} images in one request, over the limit max_images={limits.max_images}")
        if len(text.encode("utf-8")) > limits.max_text_bytes:
            raise InvalidRequest(f"text_input is {len(text.encode())} bytes, over the limit "
                                 f"max_text_bytes={limits.max_text_bytes}")
        if apply_chat_template:
            text = self.chat_prompt(text, len(images))
        tags = text.count(self.image_token)
        if tags != len(images):
            raise InvalidRequest(
                f"the prompt has {tags} {self.image_token} tag(s) but {len(images)} image(s) were sent; "
                "each image needs exactly one tag")
        if not images:
            result = self.empty(self.tokenizer(text, return_tensors="np")["input_ids"][0].astype(np.int64))
        else:
            pil_images = [decode_image(payload, i, max_bytes=limits.max_image_bytes,
                                       max_pixels=limits.max_image_pixels) for i, payload in enumerate(images)]
            out = self.processor(images=pil_images, text=text, return_tensors="np")
            result = ProcessedPrompt(
                out["input_ids"][0].astype(np.int64),
                np.ascontiguousarray(out["pixel_values"], dtype=np.float32),
                np.asarray(out["image_sizes"], dtype=np.int64),
            )
        if len(result.input_ids) > limits.max_prompt_tokens:
            raise InvalidRequest(f"the prompt is {len(result.input_ids)} tokens, over the limit "
                                 f"max_prompt_tokens={limits.max_prompt_tokens}")
        return result
