"""The processor expands each <image> into exactly as many placeholders as the encoder returns."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from spyre_backend.preprocess.processor import Preprocessor
from spyre_backend.vision.encoder import VisionEncoder
from testkit.images import shape_png

SIZES = [(1, 1), (56, 56), (57, 55), (200, 150), (150, 200), (400, 20), (20, 400), (300, 300), (1000, 3), (113, 57)]


@pytest.fixture(scope="module")
def pipeline(checkpoint):
    return Preprocessor(str(checkpoint)), VisionEncoder(str(checkpoint))


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_placeholders_equal_features(pipeline, size):
    pre, enc = pipeline
    out = pre("What is in the image?", [shape_png(size=size)], apply_chat_template=True)
    features = enc.encode(torch.from_numpy(out.pixel_values), torch.from_numpy(out.image_sizes))
    placeholders = int((out.input_ids == pre.processor.tokenizer.convert_tokens_to_ids(pre.image_token)).sum())
    assert placeholders == features.shape[0] > 0


def test_several_images_in_order(pipeline):
    pre, enc = pipeline
    images = [shape_png(size=s) for s in [(400, 20), (56, 56), (90, 160)]]
    out = pre("Compare.", images, apply_chat_template=True)
    features = enc.encode(torch.from_numpy(out.pixel_values), torch.from_numpy(out.image_sizes))
    singles = [enc.encode(torch.from_numpy(p.pixel_values), torch.from_numpy(p.image_sizes))
               for p in (pre("x", [img], apply_chat_template=True) for img in images)]
    torch.testing.assert_close(features, torch.cat(singles), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sizes", [[(200, 150)], [(400, 20), (56, 56), (300, 300)]], ids=["one image", "three images"])
def test_same_inputs_as_the_hf_processor_fresh_and_from_the_image_cache(checkpoint, sizes):
    """Images are processed one at a time and cached; the prompt is expanded and tokenized by us:
    all of it must be exactly what the HF processor gives for the whole request."""
    pre = Preprocessor(str(checkpoint))
    images = [shape_png("triangle", "red", "white", size) for size in sizes]
    prompt = pre.chat_prompt("Describe it.", len(images))
    want = pre.processor(images=[Image.open(io.BytesIO(b)).convert("RGB") for b in images], text=prompt,
                         return_tensors="np")
    for attempt in ("fresh", "cached"):
        got = pre(prompt, images)
        assert got.input_ids.tolist() == want["input_ids"][0].tolist(), attempt
        assert got.pixel_values.shape == want["pixel_values"].shape, attempt
        assert (got.pixel_values == want["pixel_values"]).all() and (got.image_sizes == want["image_sizes"]).all()
    assert (pre.image_cache.hits, pre.image_cache.misses) == (len(images), len(images))
    uncached = Preprocessor(str(checkpoint), image_cache_mb=0)
    assert uncached.image_cache is None and uncached(prompt, images).input_ids.tolist() == got.input_ids.tolist()
