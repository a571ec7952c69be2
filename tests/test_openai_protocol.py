"""The OpenAI front's request parsing and chat-template rendering, without servers."""

from __future__ import annotations

import json

import pytest
from transformers import AutoProcessor

from spyre_backend.openai_api.chat_template import ChatTemplate
from spyre_backend.openai_api.protocol import MAX_N, ApiError, parse_body, parse_chat, parse_completion

MODEL = "tiny-granite-vision"
IMG = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}


@pytest.fixture(scope="module")
def template(checkpoint) -> ChatTemplate:
    return ChatTemplate.from_checkpoint(checkpoint)


CONVERSATIONS = [
    [{"role": "user", "content": "Say hello."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [IMG, {"type": "text", "text": "What?"}]}],
    [{"role": "user", "content": [IMG, IMG, {"type": "text", "text": "Compare."}]},
     {"role": "assistant", "content": "They differ."},
     {"role": "user", "content": [{"type": "text", "text": "How?"}, IMG]}],
]


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_rendering_equals_transformers(checkpoint, template, index):
    messages = CONVERSATIONS[index]
    gen = parse_chat({"model": MODEL, "messages": messages}, template, MODEL)
    hf = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else
           [{"type": "image"} if p["type"] == "image_url" else p for p in m["content"]]} for m in messages]
    want = AutoProcessor.from_pretrained(checkpoint).apply_chat_template(hf, add_generation_prompt=True, tokenize=False)
    assert gen.prompt == want
    assert len(gen.image_urls) == want.count("<image>")


def test_sampling_defaults_and_mapping(template):
    gen = parse_chat({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 7, "stop": "x",
                      "seed": 3, "top_k": 5, "logprobs": True, "top_logprobs": 2, "n": 3,
                      "stream": True, "stream_options": {"include_usage": True}}, template, MODEL)
    assert gen.sampling == {"max_tokens": 7, "temperature": 1.0, "top_k": 5, "seed": 3, "stop": ["x"], "logprobs": 2}
    assert (gen.n, gen.stream, gen.include_usage, gen.logprobs) == (3, True, True, 2)
    absent = parse_chat({"messages": [{"role": "user", "content": "hi"}]}, template, MODEL)
    assert absent.sampling["max_tokens"] is None and absent.logprobs is None  # what the context leaves


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -1}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "presence_penalty": 3}, "presence_penalty"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": MAX_N + 1}, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0].image_url"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "xml"}}, "response_format"),
])
def test_bad_bodies_name_their_parameter(template, body, param):
    with pytest.raises(ApiError) as caught:
        parse_chat(body, template, MODEL)
    assert caught.value.status == 400 and caught.value.param == param, caught.value.message


def test_completion_prompts_and_choice_limit():
    gens = parse_completion({"prompt": ["a", "b"], "n": 2, "max_tokens": 3}, MODEL)
    assert [g.prompt for g in gens] == ["a", "b"] and all(g.n == 2 for g in gens)
    with pytest.raises(ApiError, match="over the limit"):
        parse_completion({"prompt": ["a"] * 9, "n": 2}, MODEL)
    with pytest.raises(ApiError) as caught:
        parse_completion({"prompt": "a", "model": "other"}, MODEL)
    assert caught.value.status == 404


def test_body_depth_is_checked_before_parsing():
    deep = '{"messages": ' + "[" * 100000 + "]" * 100000 + "}"
    with pytest.raises(ApiError, match="nested more than"):
        parse_body(deep.encode())
    assert parse_body(json.dumps({"stop": ["[[[[" * 50]}).encode())  # brackets inside strings do not count
    with pytest.raises(ApiError, match="JSON object"):
        parse_body(b"[1]")
