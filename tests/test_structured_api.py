"""Structured output through the real tritonserver and the OpenAI front: every form of request,
outputs that validate with jsonschema, greedy equal to transformers + xgrammar's logits processor,
bad constraints refused with a 400 (or an error response) while good requests in the same batch
go on, and the interactions: prefix cache, sessions with a schema per turn, n > 1, max_tokens."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest
import xgrammar as xgr

from spyre_backend.engine.structured_output import json_schema_grammar
from spyre_backend.openai_api.chat_template import ChatTemplate
from spyre_backend.openai_api.protocol import ApiError, parse_chat
from testkit.structured_cases import SCHEMAS
from testkit.images import shape_png
from testkit.streaming import grpc_stream

MODEL = "tiny-granite-vision"
INVOICE_IMAGE = shape_png("square", "blue", "white", (160, 120))
INVOICE = SCHEMAS["invoice"]


def data_uri(png: bytes) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(png).decode()


def user(text: str, *images: bytes) -> dict:
    return {"role": "user", "content": [*({"type": "image_url", "image_url": {"url": data_uri(i)}} for i in images),
                                        {"type": "text", "text": text}]}


def schema_format(schema: dict, name: str = "answer") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


@pytest.fixture(scope="module")
def client(openai_front) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{openai_front.url}/v1", api_key="unused", max_retries=0, timeout=300)


# -- the OpenAI front's parsing (no server) ------------------------------------------------------
@pytest.fixture(scope="module")
def template(checkpoint) -> ChatTemplate:
    return ChatTemplate.from_checkpoint(checkpoint)


@pytest.mark.parametrize("form, expected", [
    ({"response_format": schema_format(INVOICE)}, {"json": INVOICE}),
    ({"response_format": {"type": "json_object"}}, {"json_object": True}),
    ({"response_format": {"type": "text"}}, None),
    ({"structured_outputs": {"regex": "[0-9]+"}}, {"regex": "[0-9]+"}),
    ({"guided_choice": ["a", "b"]}, {"choice": ["a", "b"]}),
    ({"guided_grammar": 'root ::= "x"'}, {"grammar": 'root ::= "x"'}),
])
def test_every_form_becomes_structured_outputs(template, form, expected):
    gen = parse_chat({"messages": [user("hi")], **form}, template, MODEL)
    assert gen.sampling.get("structured_outputs") == expected


@pytest.mark.parametrize("form, param, fragment", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "schema"),
    ({"response_format": schema_format({"type": "integer", "multipleOf": 2})}, "response_format", "multipleOf"),
    ({"guided_json": {"type": 5}}, "guided_json", "invalid JSON schema"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "response_format", "at most one"),
])
def test_bad_forms_are_a_400_naming_the_parameter(template, form, param, fragment):
    with pytest.raises(ApiError) as caught:
        parse_chat({"messages": [user("hi")], **form}, template, MODEL)
    assert caught.value.status == 400 and caught.value.param == param and fragment in caught.value.message


# -- through the server ------------------------------------------------------------------------
def test_json_schema_with_an_image_validates_streaming_or_not_with_n(client):
    messages = [user("Read the invoice.", INVOICE_IMAGE)]
    out = client.chat.completions.create(model=MODEL, messages=messages, response_format=schema_format(INVOICE),
                                         max_tokens=300, temperature=1.0, seed=7, n=3)
    assert len(out.choices) == 3
    for choice in out.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), INVOICE)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model=MODEL, messages=messages, response_format=schema_format(INVOICE), max_tokens=300, stream=True,
        temperature=1.0, seed=8))
    jsonschema.validate(json.loads(text), INVOICE)


def test_sampled_outputs_through_the_server_validate(client):
    names = ["person", "array_of_objects", "refs", "nullable", "tuple"]

    def one(job):
        name, seed = job
        out = client.chat.completions.create(model=MODEL, messages=[user(f"JSON for {name}.")], max_tokens=300,
                                             temperature=1.0, seed=seed, response_format=schema_format(SCHEMAS[name]))
        return name, out.choices[0]

    with ThreadPoolExecutor(8) as pool:
        for name, choice in pool.map(one, [(n, s) for n in names for s in range(4)]):
            assert choice.finish_reason == "stop"
            jsonschema.validate(json.loads(choice.message.content), SCHEMAS[name])


@pytest.mark.parametrize("images", [[], [INVOICE_IMAGE]], ids=["text", "image"])
def test_greedy_under_a_schema_through_the_server_equals_transformers_with_xgrammar(server, reference, images):
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(
        reference.processor.tokenizer, vocab_size=reference.model.config.text_config.vocab_size))
    prompt = reference.chat_prompt("Read the invoice.", len(images))
    want = reference.generate(prompt, images, 300, logits_processor=[
        xgr.contrib.hf.LogitsProcessor(compiler.compile_grammar(json_schema_grammar(json.dumps(INVOICE))))])
    inputs = {"text_input": prompt, "max_tokens": 300, "stream": True,
              "sampling_parameters": json.dumps({"guided_json": INVOICE})}
    got = grpc_stream(server.grpc_url, {**inputs, "image": images} if images else inputs)
    assert "error" not in got, got["error"]
    assert got["text"] == want["text"] and got["num_output_tokens"] == want["num_output_tokens"]
    jsonschema.validate(json.loads(got["text"]), INVOICE)


BAD = {
    "invalid schema": ({"response_format": schema_format({"type": "strin"})}, "invalid JSON schema"),
    "unsupported keyword": ({"response_format": schema_format({"type": "array", "uniqueItems": True})},
                            "unsupported JSON schema keyword(s) ['uniqueItems']"),
    "bad regex": ({"structured_outputs": {"regex": "a(b"}}, "the regex does not compile"),
    "bad grammar": ({"guided_grammar": "root ::= undefined_rule"}, "the grammar does not compile"),
    "schema too large": ({"guided_json": {"enum": ["x" * 1000] * 70}}, "max_grammar_bytes=65536"),
    "schema too deep": ({"guided_json": json.loads('{"items":' * 40 + "{}" + "}" * 40)}, "max_schema_depth=32"),
}


def test_bad_constraints_are_400s_and_good_requests_beside_them_finish(openai_front, client):
    def bad(name):
        form, _ = BAD[name]
        return name, httpx.post(f"{openai_front.url}/v1/chat/completions", timeout=120, json={
            "model": MODEL, "messages": [user("hi")], "max_tokens": 50, **form})

    def good(seed):
        return client.chat.completions.create(model=MODEL, messages=[user("Who?")], max_tokens=100, seed=seed,
                                              temperature=1.0, response_format=schema_format(SCHEMAS["person"]))

    with ThreadPoolExecutor(10) as pool:
        goods = [pool.submit(good, s) for s in range(4)]
        bads = list(pool.map(bad, BAD))
    for name, response in bads:
        assert response.status_code == 400, (name, response.text)
        assert BAD[name][1] in response.json()["error"]["message"], (name, response.json())
    for future in goods:
        jsonschema.validate(json.loads(future.result().choices[0].message.content), SCHEMAS["person"])


def test_bad_regex_on_the_triton_path_is_an_error_response(server):
    out = grpc_stream(server.grpc_url, {"text_input": "hi", "max_tokens": 8,
                                        "sampling_parameters": json.dumps({"guided_regex": "[a-"})})
    assert "the regex does not compile" in out["error"]


def test_max_tokens_cuts_json_short_with_length(client):
    out = client.chat.completions.create(model=MODEL, messages=[user("Who?")], max_tokens=4, temperature=0,
                                         response_format=schema_format(SCHEMAS["person"]))
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 4


def test_schema_leaves_the_prefix_cache_key_alone(client):
    messages = [user("Read this invoice carefully and answer in JSON.", INVOICE_IMAGE)]
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=200, temperature=0,
                                           response_format=schema_format(SCHEMAS["person"]))
    second = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=300, temperature=0,
                                            response_format=schema_format(INVOICE))
    assert second.usage.prompt_tokens_details.cached_tokens > 0  # the prompt's K/V, cached under another schema
    jsonschema.validate(json.loads(first.choices[0].message.content), SCHEMAS["person"])
    jsonschema.validate(json.loads(second.choices[0].message.content), INVOICE)


def test_each_turn_of_a_session_carries_its_own_schema(server):
    turns = [("Who?\n", SCHEMAS["person"], True, False), ("And the invoice?\n", INVOICE, False, False),
             ("Pick one.\n", None, False, True)]
    for text, schema, start, end in turns:
        form = {"guided_json": schema} if schema else {"guided_choice": ["yes", "no"]}
        out = grpc_stream(server.grpc_url, {"text_input": text, "max_tokens": 300, "stream": True,
                                            "sampling_parameters": json.dumps(form)},
                          sequence_id=4242, sequence_start=start, sequence_end=end)
        assert "error" not in out, out["error"]
        if schema:
            jsonschema.validate(json.loads(out["text"]), schema)
        else:
            assert out["text"] in ("yes", "no")


def test_completions_take_the_same_forms(client):
    out = client.completions.create(model=MODEL, prompt="Phone:", max_tokens=20, temperature=1.0, seed=1, n=2,
                                    extra_body={"guided_regex": "[0-9]{3}-[0-9]{4}"})
    assert [c.finish_reason for c in out.choices] == ["stop", "stop"]
    assert all(re.fullmatch("[0-9]{3}-[0-9]{4}", c.text) for c in out.choices)
