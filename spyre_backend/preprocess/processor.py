"""Turns a request (prompt text + encoded images) into model inputs with the HF processor.

The processor tiles each image (anyres), tokenizes the prompt and expands every ``<image>`` into
exactly as many placeholder tokens as the vision encoder will return features for that image.

Each image goes through the HF image processor on its own, and the result (its crops, its size,
its placeholder count) is kept in an LRU cache keyed by the image's bytes as sent: a repeated
image (a second question about it, a conversation resent whole) skips decoding and tiling, ~40 ms
for a 2-crop image on these CPUs (vLLM's multimodal processor cache does the same). The prompt is
then expanded and tokenized as the HF processor does it (a test holds the two identical).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from transformers import AutoProcessor

from spyre_backend.config import InputLimits, ServingConfig, VisionConfig
from spyre_backend.errors import InvalidRequest
from spyre_backend.preprocess.images import decode_image
from spyre_backend.vision.cache import LRUCache


@dataclass
class ProcessedPrompt:
    input_ids: np.ndarray  # [n] int64, placeholders expanded
    pixel_values: np.ndarray  # [num_images, max_crops, 3, H, W] float32 (num_images may be 0)
    image_sizes: np.ndarray  # [num_images, 2] int64 (height, width)


@dataclass(frozen=True)
class ProcessedImage:
    crops: np.ndarray  # [crops, 3, H, W] float32: the base image and its anyres tiles
    size: tuple[int, int]  # (height, width) of the original
    num_tokens: int  # placeholders its <image> tag expands to


class Preprocessor:
    def __init__(self, checkpoint: str, limits: InputLimits | None = None, image_cache_mb: int | None = None):
        """``image_cache_mb``: processed images kept (None: VisionConfig's default; 0: none)."""
        self.processor = AutoProcessor.from_pretrained(checkpoint)
        self.tokenizer = self.processor.tokenizer
        self.image_token = self.processor.image_token
        self.limits = limits or ServingConfig().input_limits()
        crop = self.processor.image_processor.crop_size
        self._crop_hw = (crop["height"], crop["width"])
        cache_mb = VisionConfig().processed_image_cache_mb if image_cache_mb is None else image_cache_mb
        self.image_cache = LRUCache(cache_mb * 2**20) if cache_mb else None

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
            processed = [self.image(payload, i) for i, payload in enumerate(images)]
            pieces = text.split(self.image_token)
            expanded = pieces[0] + "".join(self.image_token * image.num_tokens + piece
                                           for image, piece in zip(processed, pieces[1:]))
            # every image padded with zero crops to the most crops of the request, as HF's batch
            crops = max(image.crops.shape[0] for image in processed)
            pixel_values = np.zeros((len(processed), crops, *processed[0].crops.shape[1:]), dtype=np.float32)
            for i, image in enumerate(processed):
                pixel_values[i, : image.crops.shape[0]] = image.crops
            result = ProcessedPrompt(
                self.tokenizer(expanded, return_tensors="np")["input_ids"][0].astype(np.int64),
                pixel_values, np.asarray([image.size for image in processed], dtype=np.int64))
        if len(result.input_ids) > limits.max_prompt_tokens:
            raise InvalidRequest(f"the prompt is {len(result.input_ids)} tokens, over the limit "
                                 f"max_prompt_tokens={limits.max_prompt_tokens}")
        return result

    def image(self, payload: bytes, index: int) -> ProcessedImage:
        """One image through the HF image processor, or from the cache of processed images."""
        key = None if self.image_cache is None else hashlib.blake2b(payload, digest_size=20).digest()
        cached = None if key is None else self.image_cache.get(key)
        if cached is not None:
            return cached
        limits = self.limits
        pil = decode_image(payload, index, max_bytes=limits.max_image_bytes, max_pixels=limits.max_image_pixels)
        out = self.processor.image_processor([pil], return_tensors="np")
        tokens = self.processor.replace_image_token(out, 0).count(self.image_token)
        crops = np.ascontiguousarray(out["pixel_values"][0], dtype=np.float32)
        image = ProcessedImage(crops, tuple(int(x) for x in out["image_sizes"][0]), tokens)
        if key is not None:
            self.image_cache.put(key, image, crops.nbytes)
        return image
