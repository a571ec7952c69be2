"""A request's image budget (``max_image_side``, ``max_image_tiles``): the preprocessor's tokens and
crops equal the HF processor's on the same image resized the same way, the grid stays within the
budget, and through the real server the budget lowers the prompt's tokens exactly as the HF
processor counts them (OpenAI's usage.prompt_tokens_details.image_tokens too), in every form."""

from __future__ import annotations

import io

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from spyre_backend.config import InputLimits
from spyre_backend.errors import InvalidRequest
from spyre_backend.preprocess.options import MediaOptions
from spyre_backend.preprocess.processor import Preprocessor
from testkit.images import shape_png

MODEL = "tiny-granite-vision"
QUESTION = "What is in the image?"
SIZES = [(300, 300), (400, 20), (200, 150), (90, 160), (30, 30), (1, 1)]


def resized_png(png: bytes, size: tuple[int, int]) -> bytes:
    """The test's own resize (PIL bicubic to an exact size), for the HF processor."""
    buf = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").resize(size, Image.Resampling.BICUBIC).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def preprocessor(checkpoint):
    return Preprocessor(str(checkpoint), InputLimits(max_prompt_tokens=4096))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("side", [None, 100, 56, 17])
def test_max_image_side_equals_the_hf_processor_on_the_resized_image(preprocessor, reference, size, side):
    png = shape_png("triangle", "green", "white", size)
    out = preprocessor(QUESTION, [png], apply_chat_template=True, options=MediaOptions(max_image_side=side))
    width, height = size
    if side is not None and max(size) > side:  # the longest side to `side`, the other rounded
        scale = side / max(size)
        png = resized_png(png, (max(1, round(width * scale)), max(1, round(height * scale))))
    want = reference.inputs(reference.chat_prompt(QUESTION, 1), [png])
    assert np.array_equal(out.input_ids, want["input_ids"][0].numpy())
    assert np.array_equal(out.pixel_values, want["pixel_values"].numpy())
    assert np.array_equal(out.image_sizes, want["image_sizes"].numpy())


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("tiles", [1, 2, 3, 4, 6])
def test_max_image_tiles_bounds_the_grid_and_equals_the_hf_processor(preprocessor, reference, size, tiles):
    original = png = shape_png("circle", "red", "blue", size)
    out = preprocessor(QUESTION, [png], apply_chat_template=True, options=MediaOptions(max_image_tiles=tiles))
    assert out.pixel_values.shape[1] <= 1 + tiles  # the base image and at most `tiles` tiles
    height, width = (int(x) for x in out.image_sizes[0])
    if (width, height) != size:
        png = resized_png(png, (width, height))
    want = reference.inputs(reference.chat_prompt(QUESTION, 1), [png])
    assert np.array_equal(out.input_ids, want["input_ids"][0].numpy())
    assert np.array_equal(out.pixel_values, want["pixel_values"].numpy())
    assert len(out.input_ids) <= len(preprocessor(QUESTION, [original], apply_chat_template=True).input_ids)


def test_a_budget_below_the_smallest_grid_is_refused(preprocessor):
    with pytest.raises(InvalidRequest, match="max_image_tiles=0|must be a positive integer"):
        MediaOptions.from_dict({"max_image_tiles": 0})
    with pytest.raises(InvalidRequest, match="max_image_side must be at most"):
        MediaOptions.from_dict({"max_image_side": 10**6})


# -- through the real server ---------------------------------------------------------------------

BIG = shape_png("square", "yellow", "black", (300, 220))


def image_message(png: bytes) -> list[dict]:
    import base64

    url = "data:image/png;base64," + base64.b64encode(png).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": QUESTION}]}]


@pytest.fixture(scope="module")
def client(openai_front) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{openai_front.url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.mark.parametrize("form", [
    {"mm_processor_kwargs": {"max_image_side": 100}},
    {"media_io_kwargs": {"image": {"max_image_side": 100}}},
    {"max_image_side": 100},
])
def test_the_budget_lowers_the_prompt_tokens_exactly_as_the_hf_processor(client, reference, form):
    full = client.chat.completions.create(model=MODEL, messages=image_message(BIG), temperature=0, max_tokens=12)
    small = client.chat.completions.create(model=MODEL, messages=image_message(BIG), temperature=0, max_tokens=12,
                                           extra_body=form)
    want = reference.generate(reference.chat_prompt(QUESTION, 1), [resized_png(BIG, (100, 73))], 12)
    ids = reference.inputs(reference.chat_prompt(QUESTION, 1), [resized_png(BIG, (100, 73))])["input_ids"][0]
    assert small.usage.prompt_tokens == want["num_input_tokens"] < full.usage.prompt_tokens
    assert small.choices[0].message.content == want["text"]
    image_tokens = int((ids == reference.model.config.image_token_index).sum())
    assert small.usage.prompt_tokens_details.image_tokens == image_tokens
    assert full.usage.prompt_tokens_details.image_tokens - image_tokens == \
        full.usage.prompt_tokens - small.usage.prompt_tokens


def test_two_forms_that_disagree_are_a_400(openai_front):
    body = {"model": MODEL, "messages": image_message(BIG), "max_tokens": 2,
            "mm_processor_kwargs": {"max_image_side": 100}, "max_image_side": 200}
    r = httpx.post(f"{openai_front.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400 and "max_image_side" in r.json()["error"]["message"], r.text
    body = {"model": MODEL, "messages": image_message(BIG), "max_tokens": 2, "media_io_kwargs": {"video": {}}}
    r = httpx.post(f"{openai_front.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "media_io_kwargs", r.text
