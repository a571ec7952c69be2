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

import re

import numpy as np
from PIL import Image
from transformers import AutoProcessor

from spyre_backend.config import InputLimits, ServingConfig, VisionConfig
from spyre_backend.errors import InvalidRequest
from spyre_backend.preprocess.document_pages import DocumentPages
from spyre_backend.preprocess.documents import DOCUMENT_TAG, image_part_text
from spyre_backend.preprocess.images import decode_image, fit_to_tiles, resize_to_side
from spyre_backend.preprocess.options import MediaIds, MediaOptions, not_cached
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
        self._pinpoints = [tuple(p) for p in self.processor.image_processor.image_grid_pinpoints]
        cache_mb = VisionConfig().processed_image_cache_mb if image_cache_mb is None else image_cache_mb
        self.image_cache = LRUCache(cache_mb * 2**20) if cache_mb else None
        self._tags = re.compile(f"({re.escape(self.image_token)}|{re.escape(DOCUMENT_TAG)})")
        # a page reads as the template's image part ("<image>\n"), as the same pages sent as images
        self._page_part = image_part_text(lambda content: self._render([{"role": "user", "content": content}]),
                                          self.image_token)
        self.documents = DocumentPages(self, self.limits)

    def chat_prompt(self, question: str, num_images: int, num_documents: int = 0) -> str:
        """The checkpoint's chat template around a user question, documents then images placed first."""
        if self.image_token in question or DOCUMENT_TAG in question:
            content = [{"type": "text", "text": question}]
            # the template renders image entries itself; when the question already places its
            # images, render text only and keep the question's own tags.
        else:
            content = ([{"type": "text", "text": DOCUMENT_TAG}] * num_documents
                       + [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": question}])
        return self._render([{"role": "user", "content": content}])

    def _render(self, messages: list[dict]) -> str:
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def empty(self, input_ids: np.ndarray | None = None) -> ProcessedPrompt:
        """No images (a zero-size image dimension passes between ensemble steps)."""
        ids = np.zeros(0, dtype=np.int64) if input_ids is None else input_ids
        return ProcessedPrompt(ids, np.zeros((0, 1, 3, *self._crop_hw), dtype=np.float32),
                               np.zeros((0, 2), dtype=np.int64))

    def __call__(self, text: str, images: list[bytes], apply_chat_template: bool = False,
                 documents: list[bytes] = (), options: MediaOptions | None = None,
                 ids: MediaIds | None = None) -> ProcessedPrompt:
        limits, options, ids = self.limits, options or MediaOptions(), ids or MediaIds()
        ids.check(len(images), len(documents))
        if len(images) > limits.max_images:
            raise InvalidRequest(f"{len(images)} images in one request, over the limit max_images={limits.max_images}")
        if len(text.encode("utf-8")) > limits.max_text_bytes:
            raise InvalidRequest(f"text_input is {len(text.encode())} bytes, over the limit "
                                 f"max_text_bytes={limits.max_text_bytes}")
        if apply_chat_template:
            text = self.chat_prompt(text, len(images), len(documents))
        pieces = self._tags.split(text)  # text, tag, text, tag, ..., text
        tags = pieces[1::2]
        for tag, sent, what in ((self.image_token, images, "image"), (DOCUMENT_TAG, documents, "document")):
            if tags.count(tag) != len(sent):
                raise InvalidRequest(
                    f"the prompt has {tags.count(tag)} {tag} tag(s) but {len(sent)} {what}(s) were sent; "
                    f"each {what} needs exactly one tag")
        if not tags:
            result = self.empty(self.tokenizer(text, return_tensors="np")["input_ids"][0].astype(np.int64))
        else:
            processed, expanded = [], [pieces[0]]
            next_image, next_document = iter(enumerate(images)), iter(enumerate(documents))
            for tag, piece in zip(tags, pieces[2::2]):
                if tag == self.image_token:
                    i, payload = next(next_image)
                    image = self.image(payload, i, options.image_budget, ids.image_uuid(i), ids.cache_salt)
                    processed.append(image)
                    expanded.append(self.image_token * image.num_tokens)
                else:
                    j, payload = next(next_document)
                    for page in self.documents.pages(payload, j, len(documents), options, ids):
                        processed.append(page)
                        expanded.append(self._page_part.replace(self.image_token, self.image_token * page.num_tokens))
                if len(processed) > limits.max_images:
                    raise InvalidRequest(f"over {limits.max_images} images and document pages in one request, "
                                         f"over the limit max_images={limits.max_images}")
                expanded.append(piece)
            # every image padded with zero crops to the most crops of the request, as HF's batch
            crops = max(image.crops.shape[0] for image in processed)
            pixel_values = np.zeros((len(processed), crops, *processed[0].crops.shape[1:]), dtype=np.float32)
            for i, image in enumerate(processed):
                pixel_values[i, : image.crops.shape[0]] = image.crops
            result = ProcessedPrompt(
                self.tokenizer("".join(expanded), return_tensors="np")["input_ids"][0].astype(np.int64),
                pixel_values, np.asarray([image.size for image in processed], dtype=np.int64))
        if len(result.input_ids) > limits.max_prompt_tokens:
            raise InvalidRequest(f"the prompt is {len(result.input_ids)} tokens, over the limit "
                                 f"max_prompt_tokens={limits.max_prompt_tokens}")
        return result

    def image(self, payload: bytes, index: int, budget: tuple = (None, None), uuid: str = "",
              salt: str = "") -> ProcessedImage:
        """One image through the HF image processor, or from the cache of processed images (by its
        bytes, or by its ``uuid`` when it is sent empty); ``salt``: the tenant's, in every key."""
        cache = self.image_cache
        named = None if cache is None or not uuid else cache_key(b"uuid", uuid.encode(), budget, salt)
        if not payload and uuid:
            image = None if named is None else cache.get(named)
            if image is None:
                raise InvalidRequest(not_cached("image", index, uuid))
            return image
        key = None if cache is None else cache_key(b"image", payload, budget, salt)
        image = None if key is None else cache.get(key)
        if image is None:
            limits = self.limits
            pil = decode_image(payload, index, max_bytes=limits.max_image_bytes, max_pixels=limits.max_image_pixels)
            image = self.process(pil, budget)
            if key is not None:
                cache.put(key, image, image.crops.nbytes)
        if named is not None:  # the uuid names this image from now on
            cache.put(named, image, image.crops.nbytes, replace=True)
        return image

    def process(self, pil: Image.Image, budget: tuple = (None, None)) -> ProcessedImage:
        """A decoded image through the HF image processor, first resized to the request's
        ``budget`` (MediaOptions.image_budget: its longest side, then its anyres grid)."""
        max_side, max_tiles = budget
        pil = fit_to_tiles(resize_to_side(pil, max_side), max_tiles, self._pinpoints, self._crop_hw)
        out = self.processor.image_processor([pil], return_tensors="np")
        tokens = self.processor.replace_image_token(out, 0).count(self.image_token)
        crops = np.ascontiguousarray(out["pixel_values"][0], dtype=np.float32)
        return ProcessedImage(crops, tuple(int(x) for x in out["image_sizes"][0]), tokens)


def cache_key(kind: bytes, payload: bytes, *settings) -> bytes:
    """The processed-image cache's key: what was sent and every setting that changes the result."""
    h = hashlib.blake2b(payload, digest_size=20)
    h.update(kind + repr(settings).encode())
    return h.digest()
