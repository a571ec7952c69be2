"""``cache_salt``: prefix-cache blocks and encoder features are shared within one tenant, never
between two (nor between a tenant and requests without a salt). In the engine, then through the
real server (Triton's input, the OpenAI field, and the OpenAI user when the operator says so)."""

from __future__ import annotations

import base64

import openai
import pytest

from spyre_backend.engine.prefix_cache import ROOT, chain_root
from spyre_backend.server.child_process import free_port
from spyre_backend.server.openai_front import OpenAIFront
from tests.test_engine import make_stack
from testkit.images import shape_png
from testkit.metrics import read_metrics, wait_for
from testkit.streaming import grpc_stream

QUESTION = "What is in the image?"
MODEL = "tiny-granite-vision"


def test_salts_start_chains_of_their_own():
    assert chain_root("") == ROOT
    assert len({ROOT, chain_root("a"), chain_root("b")}) == 3 and chain_root("a") == chain_root("a")


@pytest.fixture(scope="module")
def stack(checkpoint):
    s = make_stack(checkpoint)
    yield s
    s.service.shutdown()


def test_two_tenants_never_share_a_block_and_one_tenant_does(stack, reference):
    image = shape_png("triangle", "green", "white", (150, 110))
    ids, features = stack.prompt(QUESTION, [image])
    want = reference.generate(reference.chat_prompt(QUESTION, 1), [image], 20)["text"]
    probe = stack.engine.probe

    def ask(salt):
        handle = stack.submit("", ids=ids, features=features, cache_salt=salt).wait()
        assert handle.text == want  # the same answer whatever the cache gave
        # the engine ends the turn (registers and frees its blocks) just after its last output
        assert wait_for(lambda: probe.free_blocks == probe.usable_blocks, timeout=10)
        return handle.final.num_cached_tokens, probe.cached_blocks

    cached, base = ask("")  # no salt: it may share the template's first tokens with warmup's prompt
    cached, blocks = ask("tenant-a")
    per_request = blocks - base
    assert cached == 0 and per_request > 0  # though the same prompt is cached without a salt
    cached, blocks = ask("tenant-b")
    assert cached == 0 and blocks == base + 2 * per_request  # b computed and registered blocks of its own
    for salt in ("tenant-a", "tenant-b", ""):
        cached, blocks = ask(salt)
        assert cached > 0 and blocks == base + 2 * per_request  # each tenant hits its own blocks


# -- through the real server ---------------------------------------------------------------------

def encoder_misses(server) -> float:
    return read_metrics(server.metrics_url).get('spyre_encoder_cache{result="miss"}', 0.0)


def test_grpc_salts_keep_prefix_and_encoder_hits_within_a_tenant(server):
    image = shape_png("circle", "purple", "yellow", (130, 100))  # an image no other test sends

    def ask(salt: str | None) -> dict:
        request = {"text_input": QUESTION, "image": [image], "apply_chat_template": True, "max_tokens": 8}
        if salt is not None:
            request["cache_salt"] = salt
        before = encoder_misses(server)
        got = grpc_stream(server.grpc_url, request)
        assert "error" not in got, got
        return {"cached": got["num_cached_tokens"], "encoded": encoder_misses(server) - before, "text": got["text"]}

    unsalted = ask(None)  # may share the chat template's first tokens with any unsalted prompt
    assert unsalted["encoded"] == 1
    a = ask("tenant-a")
    assert a["cached"] == 0 and a["encoded"] == 1 and a["text"] == unsalted["text"]
    b = ask("tenant-b")
    assert b["cached"] == 0 and b["encoded"] == 1 and b["text"] == a["text"]
    for salt, first in (("tenant-a", a), ("tenant-b", b), (None, unsalted)):  # each tenant hits its own
        again = ask(salt)
        assert again["cached"] > first["cached"] and again["encoded"] == 0 and again["text"] == a["text"]


def test_openai_cache_salt_and_user_salting(server, openai_front, tmp_path):
    image = shape_png("square", "orange", "blue", (140, 90))
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": QUESTION}]}]
    plain = openai.OpenAI(base_url=f"{openai_front.url}/v1", api_key="unused", max_retries=0, timeout=300)

    def cached(client, **extra) -> int:
        r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=4, **extra)
        return r.usage.prompt_tokens_details.cached_tokens

    shared = cached(plain)  # the template's first tokens may be cached already, without a salt
    assert cached(plain) > shared
    assert cached(plain, extra_body={"cache_salt": "t1"}) == 0
    assert cached(plain, extra_body={"cache_salt": "t2"}) == 0
    assert cached(plain, extra_body={"cache_salt": "t1"}) > 0
    assert cached(plain, user="alice") > shared  # by default the user salts nothing: shared with no salt

    front = OpenAIFront(server, free_port(), cache_salt_from_user=True, log_path=tmp_path / "front.log").start()
    try:
        salted = openai.OpenAI(base_url=f"{front.url}/v1", api_key="unused", max_retries=0, timeout=300)
        assert cached(salted, user="carol") == 0  # her own tenant now
        assert cached(salted, user="dave") == 0
        assert cached(salted, user="carol") > 0
        assert cached(salted, user="carol", extra_body={"cache_salt": "t1"}) > 0  # an explicit salt wins
    finally:
        front.stop()
    with pytest.raises(openai.BadRequestError, match="cache_salt must be a non-empty string"):
        plain.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, extra_body={"cache_salt": ""})
