"""Tool calling on the OpenAI front: the tools rendered through the checkpoint's chat template as
transformers renders them, forced calls (required, a named function) held by a grammar so they
always parse and their arguments validate, auto answers that are text or a well-formed call,
streaming and not, through the ``openai`` client against the real tritonserver."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
import xgrammar as xgr
from transformers import AutoProcessor

from spyre_backend.engine.structured_output import json_schema_grammar
from spyre_backend.openai_api.chat_template import ChatTemplate
from spyre_backend.openai_api.protocol import ApiError, parse_chat, parse_completion
from spyre_backend.openai_api.tools import TOOL_CALL, ToolCallStream, parse_tools
from testkit.images import shape_png

MODEL = "tiny-granite-vision"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["C", "F"]}}, "required": ["city", "unit"]}}}
INVOICE = {"type": "function", "function": {
    "name": "file_invoice", "description": "File an invoice",
    "parameters": {"type": "object", "properties": {"number": {"type": "string", "pattern": "^INV-[0-9]{3}$"},
                                                    "total": {"type": "integer", "minimum": 0, "maximum": 9999}},
                   "required": ["number", "total"]}}}
TOOLS = [WEATHER, INVOICE]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
USER = {"role": "user", "content": "File the invoice in the picture."}


def named(name: str) -> dict:
    return {"type": "function", "function": {"name": name}}


@pytest.fixture(scope="module")
def template(checkpoint) -> ChatTemplate:
    return ChatTemplate.from_checkpoint(checkpoint)


@pytest.fixture(scope="module")
def client(openai_front) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{openai_front.url}/v1", api_key="unused", max_retries=0, timeout=300)


# -- without a server ----------------------------------------------------------------------------
def test_tools_and_tool_turns_render_as_transformers_does(checkpoint, template):
    messages = [USER, {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "file_invoice", "arguments": '{"number": "INV-001", "total": 5}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"filed": true}'},
                {"role": "user", "content": "And the weather?"}]
    gen = parse_chat({"messages": messages, "tools": TOOLS}, template, MODEL)
    hf_messages = [USER, {"role": "assistant", "content": "", "tool_calls": [
                       {"type": "function", "function": {"name": "file_invoice",
                                                         "arguments": {"number": "INV-001", "total": 5}}}]},
                   {"role": "tool", "content": '{"filed": true}'}, {"role": "user", "content": "And the weather?"}]
    want = AutoProcessor.from_pretrained(checkpoint).apply_chat_template(
        hf_messages, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    assert gen.prompt == want
    assert "<|available_tools|>" in want and TOOL_CALL in want and "<|tool_response|>" in want


def test_a_forced_choice_ends_the_prompt_with_the_marker_and_holds_a_grammar(template):
    gen = parse_chat({"messages": [USER], "tools": TOOLS, "tool_choice": named("file_invoice"),
                      "parallel_tool_calls": False}, template, MODEL)
    assert gen.prompt.endswith("<|assistant|>\n" + TOOL_CALL)
    schema = gen.sampling["structured_outputs"]["json"]
    assert schema["items"]["properties"]["name"] == {"const": "file_invoice"} and schema["maxItems"] == 1
    auto = parse_chat({"messages": [USER], "tools": TOOLS}, template, MODEL)
    assert "structured_outputs" not in auto.sampling and auto.tools.choice == "auto"


@pytest.mark.parametrize("body, param, fragment", [
    ({"tools": TOOLS, "tool_choice": named("nope")}, "tool_choice", "not in tools"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools", "letters, digits"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "given twice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}]},
     "tools", "unsupported JSON schema keyword"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice",
     "another structured output"),
])
def test_bad_tools_are_a_400_naming_the_parameter(template, body, param, fragment):
    with pytest.raises(ApiError) as caught:
        parse_chat({"messages": [USER], **body}, template, MODEL)
    assert caught.value.status == 400 and caught.value.param == param and fragment in caught.value.message
    with pytest.raises(ApiError, match="only supported on /v1/chat/completions"):
        parse_completion({"prompt": "x", "tools": TOOLS}, MODEL)


@pytest.mark.parametrize("pieces, calls, text", [
    (["<|tool", "_call|>[{\"name\": \"get_weather\", ", "\"arguments\": {\"city\": \"Oslo\", \"unit\": \"C\"}}]"],
     1, ""),
    (["<|tool_call|>[{\"name\": \"unknown\", \"arguments\": {}}]"], 0, "<|tool_call|>[{\"name\": \"unknown\""),
    (["<|tool_call|>[{\"name\": \"get_weather\""], 0, "<|tool_call|>"),  # cut short: text, never a broken call
    (["A green", " square."], 0, "A green square."),
    (["[{\"name\": \"file_invoice\", \"arguments\": {}}]"], 1, ""),  # the marker a special token, left out
    (["[1, 2]"], 0, "[1, 2]"),
])
def test_auto_answers_are_a_whole_call_or_text(pieces, calls, text):
    stream = ToolCallStream(parse_tools({"tools": TOOLS}))
    fed = [stream.feed(p) for p in pieces]
    assert not any(deltas for _, deltas in fed)  # auto: a call goes out whole, once it parses
    shown = "".join(text for text, _ in fed)
    rest, parsed, reason = stream.finish("stop")
    assert len(parsed) == calls and (shown + rest).startswith(text)
    assert reason == ("tool_calls" if calls else "stop")


def merged(deltas) -> list[dict]:
    """Stream deltas put together by index, as a client does."""
    calls: dict[int, dict] = {}
    for d in deltas:
        call = calls.setdefault(d["index"], {"id": None, "name": None, "arguments": ""})
        call["id"] = d.get("id") or call["id"]
        call["name"] = d.get("function", {}).get("name") or call["name"]
        call["arguments"] += d.get("function", {}).get("arguments") or ""
    return [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize("split", [1, 3, 7, 1000])
def test_a_forced_answer_streams_each_call_as_it_is_written(split):
    text = json.dumps([{"name": "get_weather", "arguments": {"city": "a}\\\"[", "unit": "C"}},
                       {"name": "file_invoice", "arguments": {"number": "INV-001", "total": 12}}],
                      separators=(",", ":"))
    stream = ToolCallStream(parse_tools({"tools": TOOLS, "tool_choice": "required"}))
    deltas, texts = [], []
    for at in range(0, len(text), split):
        shown, more = stream.feed(text[at: at + split])
        texts.append(shown)
        deltas += more
    rest, more, reason = stream.finish("stop")
    calls = merged(deltas + more)
    assert reason == "tool_calls" and not "".join(texts) + rest
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        (c["name"], c["arguments"]) for c in json.loads(text)]
    assert all(c["id"].startswith("call_") for c in calls) and len({c["id"] for c in calls}) == 2


# -- through the server ----------------------------------------------------------------------------
def check_calls(calls, names):
    assert calls, "no tool calls"
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])
    assert len({call.id for call in calls}) == len(calls)


@pytest.mark.parametrize("choice", [named("file_invoice"), named("get_weather"), "required"],
                         ids=["named invoice", "named weather", "required"])
def test_forced_calls_parse_and_validate_streaming_or_not(client, choice):
    names = [choice["function"]["name"]] if isinstance(choice, dict) else list(PARAMETERS)
    # one call per answer: the tiny model, free to, would add calls to the list until max_tokens
    out = client.chat.completions.create(model=MODEL, messages=[USER], tools=TOOLS, tool_choice=choice,
                                         parallel_tool_calls=False, max_tokens=300, temperature=1.0, seed=3, n=2)
    for c in out.choices:
        assert c.finish_reason == "tool_calls" and c.message.content is None
        check_calls(c.message.tool_calls, names)
    chunks = list(client.chat.completions.create(model=MODEL, messages=[USER], tools=TOOLS, tool_choice=choice,
                                                 parallel_tool_calls=False, max_tokens=300, temperature=0,
                                                 stream=True))
    deltas = [d.model_dump(exclude_none=True) for chunk in chunks for d in (chunk.choices[0].delta.tool_calls or [])]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    calls = merged(deltas)
    assert len(calls) == 1 and calls[0]["name"] in names and calls[0]["id"].startswith("call_")
    jsonschema.validate(json.loads(calls[0]["arguments"]), PARAMETERS[calls[0]["name"]])
    greedy = client.chat.completions.create(model=MODEL, messages=[USER], tools=TOOLS, tool_choice=choice,
                                            parallel_tool_calls=False, max_tokens=300, temperature=0)
    call = greedy.choices[0].message.tool_calls[0]  # the same call, streamed or not
    assert (call.function.name, json.loads(call.function.arguments)) == (calls[0]["name"],
                                                                        json.loads(calls[0]["arguments"]))


def test_named_call_equals_transformers_with_xgrammar(client, reference, template):
    image = shape_png("square", "blue", "white", (120, 90))
    import base64

    url = "data:image/png;base64," + base64.b64encode(image).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "File the invoice in the picture."}]}]
    body = {"messages": messages, "tools": TOOLS, "tool_choice": named("file_invoice"), "parallel_tool_calls": False}
    gen = parse_chat(body, template, MODEL)
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(
        reference.processor.tokenizer, vocab_size=reference.model.config.text_config.vocab_size))
    grammar = compiler.compile_grammar(json_schema_grammar(json.dumps(gen.sampling["structured_outputs"]["json"])))
    want = reference.generate(gen.prompt, [image], 300, logits_processor=[xgr.contrib.hf.LogitsProcessor(grammar)])
    out = client.chat.completions.create(model=MODEL, max_tokens=300, temperature=0, **body)
    call = out.choices[0].message.tool_calls[0]
    expected = json.loads(want["text"])[0]
    assert call.function.name == expected["name"] == "file_invoice"
    assert json.loads(call.function.arguments) == expected["arguments"]


def test_auto_is_text_or_a_well_formed_call_and_tool_results_go_back(client, openai_front):
    for seed in range(3):
        out = client.chat.completions.create(model=MODEL, messages=[USER], tools=TOOLS, max_tokens=40,
                                             temperature=1.0, seed=seed)
        choice = out.choices[0]
        if choice.finish_reason == "tool_calls":
            check_calls(choice.message.tool_calls, list(PARAMETERS))
        else:
            assert isinstance(choice.message.content, str) and not choice.message.tool_calls
    none = client.chat.completions.create(model=MODEL, messages=[USER], tools=TOOLS, tool_choice="none",
                                          max_tokens=20, temperature=0)
    assert none.choices[0].finish_reason in ("stop", "length") and not none.choices[0].message.tool_calls
    first = client.chat.completions.create(model=MODEL, messages=[USER], tools=TOOLS, max_tokens=200,
                                           tool_choice=named("file_invoice"), parallel_tool_calls=False, temperature=0)
    call = first.choices[0].message.tool_calls[0]
    follow_up = [USER, first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": '{"filed": true}'}]
    r = httpx.post(f"{openai_front.url}/v1/chat/completions", timeout=120, json={
        "model": MODEL, "messages": follow_up, "tools": TOOLS, "max_tokens": 10, "temperature": 0})
    assert r.status_code == 200, r.text
