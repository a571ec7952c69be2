"""Automatic prefix caching through the engine, against transformers' generate() (the oracle).

Every answer is checked three ways: with the cache on (and hit), with it off, and by transformers.
The tiny checkpoint's KV blocks are 64 tokens, so an image prompt has one or two full blocks. Every
test runs with the CPU's prefix unit (16-token segments: a hit can end inside a block, whose
leading segments are copied) and with Spyre's (whole blocks).
"""

from __future__ import annotations

import pytest
import torch

from spyre_backend.engine.request import Request
from spyre_backend.engine.sampling_params import SamplingParams
from tests.engine_harness import Handle
from testkit.images import shape_png
from tests.test_engine import make_stack

MAX_TOKENS = 20
RED = shape_png("circle", "red", "blue", (120, 90))
BLUE = shape_png("circle", "blue", "red", (120, 90))
SQUARE = shape_png("square", "green", "white", (200, 150))


@pytest.fixture(scope="module", params=[16, 64], ids=["segments-of-16", "whole-blocks"])
def stacks(checkpoint, request):
    on = make_stack(checkpoint, prefill_align=str(request.param))
    off = make_stack(checkpoint, enable_prefix_caching="false", prefill_align=str(request.param))
    assert on.engine.probe.segment_size == request.param
    yield on, off
    on.service.shutdown()
    off.service.shutdown()


@pytest.fixture(autouse=True)
def no_leaks(stacks):
    yield
    for stack in stacks:  # free + cached blocks are the whole pool again once nothing runs
        engine = stack.engine
        assert engine.probe.free_blocks == engine.probe.usable_blocks and engine.probe.num_sessions == 0


def cached_before(stack, position: int) -> int:
    """The tokens before ``position`` that the prefix cache can hold: its whole segments."""
    unit = stack.engine.probe.segment_size
    return position // unit * unit


def test_repeats_hit_and_answer_as_transformers_does(stacks, reference):
    on, off = stacks
    for question, images in [("Say hello to the whole wide world, please, and add a greeting.", []),
                             ("What is in the image?", [RED]), ("What is in the second image?", [RED, SQUARE])]:
        want = reference.generate(reference.chat_prompt(question, len(images)), images, MAX_TOKENS)["text"]
        first, again = on.submit(question, images).wait(), on.submit(question, images).wait()
        assert first.text == again.text == off.submit(question, images).wait().text == want
        n = again.final.num_input_tokens
        assert again.final.num_cached_tokens == cached_before(on, n - 1)  # every full segment, the last token computed
        assert again.final.num_prefill_tokens == n - again.final.num_cached_tokens
    assert off.engine.stats().prefix_hits == 0 and off.engine.probe.cached_blocks == 0


def test_another_image_with_the_same_text_never_gets_the_first_images_blocks(stacks, reference):
    on, _ = stacks
    question = "What color is the circle?"
    red, blue = on.submit(question, [RED]).wait(), on.submit(question, [BLUE]).wait()
    ids, _ = on.prompt(question, [BLUE])
    first_image_position = int((ids == on.engine.probe.image_token_id).nonzero()[0])
    assert blue.final.num_cached_tokens == cached_before(on, first_image_position)
    for image, got in ((RED, red), (BLUE, blue)):
        assert got.text == reference.generate(reference.chat_prompt(question, 1), [image], MAX_TOKENS)["text"]


def test_a_second_question_about_the_same_image_reuses_the_image_blocks(stacks, reference):
    on, _ = stacks
    on.submit("What is in the image?", [SQUARE]).wait()
    second = on.submit("What shape is it?", [SQUARE]).wait()
    ids, _ = on.prompt("What shape is it?", [SQUARE])
    last_image_position = int((ids == on.engine.probe.image_token_id).nonzero()[-1])
    assert second.final.num_cached_tokens >= cached_before(on, last_image_position) > 0
    assert second.text == reference.generate(reference.chat_prompt("What shape is it?", 1), [SQUARE],
                                             MAX_TOKENS)["text"]


def test_a_conversation_resent_whole_reuses_its_first_turn(stacks, reference):
    on, off = stacks
    first = on.submit("What is in the image?", [RED]).wait()
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": first.text}]},
                    {"role": "user", "content": [{"type": "text", "text": "And its color?"}]}]
    full = reference.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    resent = on.submit(full, [RED], chat=False).wait()
    assert resent.final.num_cached_tokens >= 64
    assert resent.text == off.submit(full, [RED], chat=False).wait().text
    assert resent.text == reference.generate(full, [RED], MAX_TOKENS)["text"]


def test_a_session_turn_leaves_its_blocks_for_others(stacks):
    on, _ = stacks
    turn = on.submit("What is in the image?", [BLUE], sequence_id=71, sequence_start=True, sequence_end=True).wait()
    again = on.submit("What is in the image?", [BLUE]).wait()
    assert again.text == turn.text and again.final.num_cached_tokens > 0


def test_a_resent_conversation_takes_everything_its_first_turn_computed(stacks):
    """Off Spyre a hit may end at any token: the first turn's tail past its last full segment is
    registered at its end. Spyre's unit stays the whole block."""
    on, off = stacks
    ids, features = on.prompt("What is in the image?", [SQUARE])
    handle = Handle()
    first = Request(ids, features, SamplingParams(max_tokens=MAX_TOKENS), handle.on_output)
    on.engine.add_request(first)
    handle.wait()
    follow = on.service.tokenizer("And its color?", add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    resent_ids = torch.cat([ids, torch.tensor(first.output_ids), follow])
    resent = on.submit("", ids=resent_ids, features=features).wait()
    computed = len(ids) + len(first.output_ids) - 1  # the last sampled token was never computed
    unit = on.engine.probe.segment_size
    assert resent.final.num_cached_tokens == (computed if unit < 64 else computed // 64 * 64)
    assert resent.text == off.submit("", ids=resent_ids, features=features).wait().text
