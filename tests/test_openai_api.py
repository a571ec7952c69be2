"""The OpenAI-compatible front against the real tritonserver, with the official ``openai`` client.

Greedy answers must equal transformers' generate() on the same conversation rendered by the
checkpoint's chat template (the oracle), streaming or not, alone or 16 at once.
"""

from __future__ import annotations

import asyncio
import base64
import http.server
import json
import threading

import httpx
import openai
import pytest

from testkit.images import shape_png
from testkit.metrics import finished, kv_state, wait_for
from testkit.streaming import grpc_stream

MODEL = "tiny-granite-vision"
TRIANGLE = shape_png("triangle", "green", "white", (200, 150))
SQUARE = shape_png("square", "yellow", "black", (60, 200))
CIRCLE = shape_png("circle", "red", "blue", (300, 40))


def data_uri(png: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(png).decode()}"


def image_part(png: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": data_uri(png)}}


def user(text: str, *images: bytes) -> dict:
    return {"role": "user", "content": [*map(image_part, images), {"type": "text", "text": text}]}


def oracle(reference, messages: list[dict], max_tokens: int) -> dict:
    """transformers on the same conversation: image parts become the template's image entries."""
    hf_messages, images = [], []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            parts = []
            for part in content:
                if part["type"] == "image_url":
                    images.append(base64.b64decode(part["image_url"]["url"].split(",", 1)[1]))
                    parts.append({"type": "image"})
                else:
                    parts.append(part)
            content = parts
        hf_messages.append({"role": m["role"], "content": content})
    prompt = reference.processor.apply_chat_template(hf_messages, add_generation_prompt=True, tokenize=False)
    return reference.generate(prompt, images, max_tokens)


@pytest.fixture(scope="module")
def client(openai_front) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{openai_front.url}/v1", api_key="unused", max_retries=0, timeout=300)


CONVERSATIONS = {
    "one image": [user("What is in the image?", TRIANGLE)],
    "text only": [user("Say hello.")],
    "two images": [user("What is in the second image?", CIRCLE, SQUARE)],
    "three turns, image in turn 1": [
        user("What is in the image?", TRIANGLE),
        {"role": "assistant", "content": "a green triangle on a white background"},
        {"role": "user", "content": "What color is the background?"},
        {"role": "assistant", "content": "white"},
        {"role": "user", "content": [{"type": "text", "text": "What shape is it?"}]},
    ],
    "system prompt": [{"role": "system", "content": "You answer briefly."}, user("What shape is it?", SQUARE)],
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_greedy_chat_equals_transformers(client, reference, name):
    messages = CONVERSATIONS[name]
    want = oracle(reference, messages, 24)
    r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=24)
    assert r.choices[0].message.content == want["text"]
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == ("length" if want["num_output_tokens"] == 24 else "stop")
    assert r.usage.prompt_tokens == want["num_input_tokens"]
    assert r.usage.completion_tokens == want["num_output_tokens"]
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")


def test_the_green_triangle(client):
    """The README's example: the answer the tiny checkpoint was trained to give, streaming and not,
    with the default temperature (1.0: the trained answer is that peaked; a seed keeps it repeatable)."""
    messages = [user("What is in the image?", TRIANGLE)]
    assert client.chat.completions.create(model=MODEL, messages=messages, seed=0).choices[0].message.content \
        == "a green triangle on a white background"
    stream = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == \
        "a green triangle on a white background"


def test_streaming_sends_role_deltas_finish_and_usage(client, reference):
    messages = CONVERSATIONS["one image"]
    want = oracle(reference, messages, 24)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=24,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and not chunks[0].choices[0].delta.content
    body, usage = chunks[1:-1], chunks[-1]
    assert all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in body) == want["text"]
    assert [c.choices[0].finish_reason for c in body][-1] in ("stop", "length")
    assert all(c.choices[0].finish_reason is None for c in body[:-1])
    assert usage.choices == [] and usage.usage.prompt_tokens == want["num_input_tokens"]
    assert usage.usage.completion_tokens == want["num_output_tokens"]
    assert len({c.id for c in chunks}) == 1


def test_stream_ends_with_done(openai_front):
    body = {"model": MODEL, "messages": [user("Say hello.")], "max_tokens": 8, "stream": True}
    with httpx.stream("POST", f"{openai_front.url}/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(e[6:])["object"] == "chat.completion.chunk" for e in events[:-1])


def test_n_choices_with_a_seed_are_reproducible(client):
    messages = [user("What is in the image?", SQUARE)]
    kwargs = dict(model=MODEL, messages=messages, temperature=1.5, max_tokens=16, n=2, seed=1234)
    first = client.chat.completions.create(**kwargs)
    again = client.chat.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    # choice k samples with seed + k: choice 0 is the n=1 answer with the same seed
    single = client.chat.completions.create(**dict(kwargs, n=1))
    assert single.choices[0].message.content == first.choices[0].message.content
    assert 2 <= first.usage.completion_tokens <= 2 * 16  # both choices counted
    assert first.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt once, not per choice
    streamed = list(client.chat.completions.create(**kwargs, stream=True))
    texts = {0: "", 1: ""}
    for c in streamed:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
    assert [texts[0], texts[1]] == [c.message.content for c in first.choices]


def test_completions_endpoint_and_logprobs(client, openai_front):
    prompt = "<|user|>\nSay hello.\n<|assistant|>\n"
    chat = client.chat.completions.create(model=MODEL, messages=[user("Say hello.")], temperature=0, max_tokens=12)
    from spyre_backend.openai_api.chat_template import ChatTemplate

    rendered = ChatTemplate.from_checkpoint(openai_front.server.options.checkpoint).render([user("Say hello.")])
    assert rendered.endswith(prompt)
    r = client.completions.create(model=MODEL, prompt=rendered, temperature=0, max_tokens=12, logprobs=2)
    choice = r.choices[0]
    assert choice.text == chat.choices[0].message.content and r.object == "text_completion"
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text or len(lp.tokens) == r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert all(len(top) <= 2 and tok in top for tok, top in zip(lp.tokens, lp.top_logprobs))
    assert all(v <= 0.0 for v in lp.token_logprobs)
    chat_lp = client.chat.completions.create(model=MODEL, messages=[user("Say hello.")], temperature=0,
                                             max_tokens=12, logprobs=True, top_logprobs=3).choices[0].logprobs
    assert [t.token for t in chat_lp.content] == lp.tokens
    assert all(len(t.top_logprobs) == 3 and t.bytes == list(t.token.encode()) for t in chat_lp.content)
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_sixteen_concurrent_streams_equal_their_solo_answers(client, openai_front):
    cases = [[user(q, *imgs)] for q, imgs in [
        ("What is in the image?", [TRIANGLE]), ("Say hello.", []), ("What shape is it?", [SQUARE]),
        ("What color is the background?", [CIRCLE]), ("What is in the second image?", [CIRCLE, SQUARE]),
        ("What is the capital of France?", []), ("Describe the picture.", [SQUARE]), ("Count to three.", []),
    ]] * 2
    solo = [client.chat.completions.create(model=MODEL, messages=m, temperature=0, max_tokens=20)
            .choices[0].message.content for m in cases]
    aclient = openai.AsyncOpenAI(base_url=f"{openai_front.url}/v1", api_key="unused", max_retries=0, timeout=300)

    async def one(messages):
        text = ""
        async for chunk in await aclient.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                                                  max_tokens=20, stream=True):
            text += "".join(c.delta.content or "" for c in chunk.choices)
        return text

    async def all_at_once():
        try:
            return await asyncio.gather(*map(one, cases))
        finally:
            await aclient.close()

    assert asyncio.run(all_at_once()) == solo


def test_a_client_that_disconnects_mid_stream_stops_its_generation(openai_front, server):
    before = finished(server.metrics_url, "cancelled")
    body = {"model": MODEL, "messages": [user("Count to a thousand.")], "max_tokens": 3000, "stream": True,
            "ignore_eos": True, "temperature": 0}
    with httpx.stream("POST", f"{openai_front.url}/v1/chat/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(3)]  # the role chunk, then the first delta
        assert any('"content"' in line for line in got)
    # the generation ends as cancelled long before its 3000 tokens, and its KV blocks come back
    # (after its answer the tiny model only repeats end-of-text: a silent stream, noticed all the same)
    assert wait_for(lambda: finished(server.metrics_url, "cancelled") > before, timeout=60)
    assert wait_for(lambda: kv_state(server.metrics_url)[1] == 0, timeout=30)
    # the same without streaming: the client gives up waiting
    before = finished(server.metrics_url, "cancelled")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{openai_front.url}/v1/chat/completions", json=dict(body, stream=False), timeout=2)
    assert wait_for(lambda: finished(server.metrics_url, "cancelled") > before, timeout=60)
    assert wait_for(lambda: kv_state(server.metrics_url)[1] == 0, timeout=30)


class ImageServer(http.server.ThreadingHTTPServer):
    """Serves one PNG on 127.0.0.1, for the image-URL tests."""

    def __init__(self, png: bytes):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(png)))
                self.end_headers()
                self.wfile.write(png)

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def test_image_urls_on_allowed_domains_are_fetched(client):
    images = ImageServer(TRIANGLE)
    try:
        port = images.server_address[1]
        url = {"type": "image_url", "image_url": {"url": f"http://127.0.0.1:{port}/triangle.png"}}
        fetched = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=16, messages=[
            {"role": "user", "content": [url, {"type": "text", "text": "What is in the image?"}]}])
        inline = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=16,
                                                messages=[user("What is in the image?", TRIANGLE)])
        assert fetched.choices[0].message.content == inline.choices[0].message.content
        assert fetched.usage.prompt_tokens == inline.usage.prompt_tokens
        other = {"type": "image_url", "image_url": {"url": f"http://localhost:{port}/triangle.png"}}
        with pytest.raises(openai.BadRequestError, match="not in the allowed"):
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [other]}])
    finally:
        images.shutdown()


def error_of(exc: openai.APIStatusError) -> dict:
    body = exc.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


BAD_REQUESTS = {
    "unknown role": ({"messages": [{"role": "bot", "content": "hi"}]}, "messages[0].role"),
    "bad image": ({"messages": [user("What is it?", b"not an image")]}, "could not be decoded"),
    "not base64": ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]}, "image 0"),
    "too long": ({"messages": [user("Say hello.")], "max_tokens": 4090}, "maximum context length 4096"),
    "over max_tokens_limit": ({"messages": [user("Say hello.")], "max_completion_tokens": 5000},
                              "max_tokens_limit=4096"),
    "temperature": ({"messages": [user("Say hello.")], "temperature": -1}, "temperature must be"),
    "top_p": ({"messages": [user("Say hello.")], "top_p": 0}, "top_p must be"),
    "n": ({"messages": [user("Say hello.")], "n": 99}, "n must be in"),
    "tool_choice of an unknown tool": ({"messages": [user("Say hello.")], "tool_choice": {
        "type": "function", "function": {"name": "g"}}, "tools": [{"type": "function", "function": {"name": "f"}}]},
        "not in tools"),
    "top_logprobs without logprobs": ({"messages": [user("Say hello.")], "top_logprobs": 2}, "needs logprobs"),
    "content part": ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "not supported"),
    "empty messages": ({"messages": []}, "non-empty list"),
    "deeply nested": ({"messages": [user("Say hello.")], "metadata": json.loads("[" * 100 + "]" * 100)},
                      "nested more than"),
    "too many images": ({"messages": [user("What is it?", *[TRIANGLE] * 9)]}, "max_images=8"),
    "http image, domain not allowed": ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]}, "not in the allowed"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_requests_get_a_400_in_openai_shape(openai_front, name):
    body, fragment = BAD_REQUESTS[name]
    r = httpx.post(f"{openai_front.url}/v1/chat/completions", json={"model": MODEL, **body}, timeout=120)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert fragment in error["message"], error


def test_unknown_model_is_a_404_and_bad_json_a_400(client, openai_front):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=[user("Say hello.")])
    assert error_of(caught.value)["code"] == "model_not_found"
    r = httpx.post(f"{openai_front.url}/v1/chat/completions", content=b"{not json", timeout=30)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{openai_front.url}/v1/completions", json={"model": MODEL, "prompt": [1, 2, 3]}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_streamed_request_refused_before_it_starts_is_an_http_error(client):
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        list(client.chat.completions.create(model=MODEL, messages=[user("Say hello.")], max_tokens=4090,
                                            stream=True))


def test_deeply_nested_sampling_parameters_are_refused_on_the_triton_path(server):
    deep = "[" * 5000 + "]" * 5000
    out = grpc_stream(server.grpc_url, {"text_input": "Say hello.", "max_tokens": 4,
                                        "sampling_parameters": json.dumps({"stop": "x", "x": 1})[:-1] + ', "y": ' + deep + "}"})
    assert "nested more than" in out["error"] and "Recursion" not in out["error"]


def test_not_ready_is_a_503(server, tmp_path):
    """A front whose tritonserver is not up (yet): /health and requests say 503."""
    from spyre_backend.server.child_process import free_port
    from spyre_backend.server.openai_front import OpenAIFront
    from spyre_backend.server.triton_process import ServerOptions, TritonServer

    down = TritonServer(ServerOptions(checkpoint=server.options.checkpoint, grpc_port=free_port()))
    front = OpenAIFront(down, free_port(), log_path=tmp_path / "front.log").start()
    try:
        assert httpx.get(f"{front.url}/health", timeout=30).status_code == 503
        c = openai.OpenAI(base_url=f"{front.url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIStatusError) as caught:
            c.chat.completions.create(model=MODEL, messages=[user("Say hello.")])
        assert caught.value.status_code == 503 and error_of(caught.value)["type"] == "service_unavailable"
    finally:
        front.stop()
