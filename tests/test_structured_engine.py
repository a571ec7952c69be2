"""Structured output in the engine on the shipped checkpoint (no Triton): sampled outputs at
temperature 1 always parse and validate, greedy output under a grammar equals transformers'
generate() with xgrammar's own logits processor, and grammars are released whatever ends a request."""

from __future__ import annotations

import json
import re
import time

import jsonschema
import pytest
import xgrammar as xgr

from spyre_backend.config import ServingConfig
from spyre_backend.engine.sampling_params import SamplingParams
from spyre_backend.engine.structured_output import json_schema_grammar
from spyre_backend.errors import InvalidRequest
from spyre_backend.preprocess.processor import Preprocessor
from spyre_backend.protocol import FinishReason
from spyre_backend.serving.llm_service import LLMService
from spyre_backend.vision.encoder import VisionEncoder
from tests.engine_harness import Stack
from testkit.structured_cases import CHOICES, REGEXES, SCHEMAS
from testkit.images import shape_png

MAX_TOKENS = 400  # far above what any bounded schema here needs: an output cut short fails the test
SAMPLES_PER_SCHEMA = 10  # x 23 schemas: 230 sampled requests


@pytest.fixture(scope="module")
def stack(checkpoint):
    raw = {"checkpoint": str(checkpoint), "compile_backend": "eager", "max_context": "1024", "max_running": "16",
           "decode_batch_sizes": "1 2 4 8 16", "prefill_chunk": "64"}
    s = Stack(LLMService(ServingConfig.from_strings(raw)), Preprocessor(str(checkpoint)), VisionEncoder(str(checkpoint)))
    yield s
    s.service.shutdown()


@pytest.fixture(autouse=True)
def no_leaks(stack):
    """Every test leaves no KV blocks, sessions or grammar matchers behind."""
    free = stack.engine.probe.free_blocks
    yield
    deadline = time.monotonic() + 10
    while stack.engine.probe.free_blocks != free and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stack.engine.probe.free_blocks == free
    assert stack.engine.probe.num_grammar_matchers == 0


def params(structured: dict, **values) -> SamplingParams:
    return SamplingParams.from_request(json.dumps({"max_tokens": MAX_TOKENS, **structured, **values}))


def run_all(stack, requests):
    handles = [stack.submit(question, images, params=p) for question, images, p in requests]
    return [h.wait(300) for h in handles]


def test_sampled_json_always_validates(stack):
    assert len(SCHEMAS) >= 20
    triangle = shape_png("triangle", "green", "white", (120, 90))
    requests = [(f"Answer as JSON ({name}).", [triangle] if seed % 3 == 0 else [],
                 params({"guided_json": schema}, temperature=1.0, seed=seed))
                for name, schema in SCHEMAS.items() for seed in range(SAMPLES_PER_SCHEMA)]
    outputs = run_all(stack, requests)
    for (question, _, p), handle in zip(requests, outputs):
        assert handle.final.error is None, handle.final.error
        assert handle.final.finish_reason == FinishReason.STOP, (question, handle.text)
        value = json.loads(handle.text)  # RFC 8259: no raw control characters in strings
        jsonschema.validate(value, json.loads(p.structured.spec))
        outside = re.sub(r'"(?:[^"\\]|\\.)*"', '""', handle.text)
        assert not re.search(r"\s", outside), handle.text  # compact: no whitespace outside strings


def test_sampled_regex_and_choice_always_match(stack):
    requests = [("Say something.", [], params({"structured_outputs": {"regex": rx}}, temperature=1.0, seed=s))
                for rx in REGEXES for s in range(10)]
    requests += [("Pick one.", [], params({"guided_choice": c}, temperature=1.0, seed=s, top_p=0.9))
                 for c in CHOICES for s in range(10)]
    for (_, _, p), handle in zip(requests, run_all(stack, requests)):
        assert handle.final.finish_reason == FinishReason.STOP, handle.text
        if p.structured.kind == "regex":
            assert re.fullmatch(p.structured.spec, handle.text), (p.structured.spec, handle.text)
        else:
            assert handle.text in json.loads(p.structured.spec)


@pytest.mark.parametrize("settings", [
    {"temperature": 0.0}, {"temperature": 1.5, "top_k": 5, "seed": 1}, {"temperature": 1.0, "top_p": 0.5, "seed": 2},
    {"temperature": 1.0, "min_p": 0.2, "seed": 3}, {"temperature": 0.0, "repetition_penalty": 1.5},
    {"temperature": 1.0, "presence_penalty": 1.0, "frequency_penalty": 1.0, "seed": 4},
    {"temperature": 1.0, "seed": 5, "logprobs": 3}, {"temperature": 0.0, "min_tokens": 30},
], ids=lambda s: "-".join(s))
def test_every_sampler_setting_keeps_the_grammar(stack, settings):
    schema = SCHEMAS["person"]
    handle = stack.submit("Who?", params=params({"response_format": {
        "type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}}, **settings)).wait()
    jsonschema.validate(json.loads(handle.text), schema)
    if "logprobs" in settings:  # the model's own distribution: the logprobs of the masked tokens are kept
        entries = [e for out in handle.outputs for e in (out.logprobs or [])]
        assert len(entries) == handle.final.num_output_tokens and all(len(e["top"]) == 3 for e in entries)


def test_max_tokens_cuts_json_short_with_length(stack):
    handle = stack.submit("Who?", params=params({"guided_json": SCHEMAS["person"]}, max_tokens=3)).wait()
    assert handle.final.finish_reason == FinishReason.LENGTH
    assert handle.final.num_output_tokens == 3
    with pytest.raises(json.JSONDecodeError):
        json.loads(handle.text)


def hf_constrained(reference, grammar: xgr.CompiledGrammar, question: str, images: list[bytes], max_new_tokens: int):
    return reference.generate(reference.chat_prompt(question, len(images)), images, max_new_tokens,
                              logits_processor=[xgr.contrib.hf.LogitsProcessor(grammar)])["text"]


@pytest.mark.parametrize("images", [[], [shape_png("circle", "red", "blue", (100, 80))]], ids=["text", "image"])
def test_greedy_under_a_schema_equals_transformers_with_xgrammar(stack, reference, images):
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(
        reference.processor.tokenizer, vocab_size=reference.model.config.text_config.vocab_size))
    for name in ("invoice", "person", "array_of_objects"):
        schema = SCHEMAS[name]
        want = hf_constrained(reference, compiler.compile_grammar(json_schema_grammar(json.dumps(schema))),
                              "What is in the image?", images, MAX_TOKENS)
        got = stack.submit("What is in the image?", images, params=params({"guided_json": schema})).wait().text
        assert got == want
        jsonschema.validate(json.loads(got), schema)


def test_bad_constraints_are_refused_and_good_requests_in_the_batch_are_untouched(stack):
    good = [stack.submit("Who?", params=params({"guided_json": SCHEMAS["person"]}, temperature=1.0, seed=s))
            for s in range(4)]
    refused = {
        "does not compile": {"guided_regex": "(("},
        "does not compile: EBNF": {"guided_grammar": 'root ::= "a" | b'},
    }
    bad = {why: stack.submit("Who?", params=params(form)) for why, form in refused.items()}
    for why, handle in bad.items():
        handle.wait()
        assert handle.final.finish_reason == FinishReason.ERROR and why.split(":")[0] in handle.final.error
    for handle in good:
        jsonschema.validate(json.loads(handle.wait().text), SCHEMAS["person"])


@pytest.mark.parametrize("form, message", [
    ({"guided_json": {"type": "strin"}}, "invalid JSON schema"),
    ({"guided_json": {"type": "integer", "multipleOf": 3}}, "unsupported JSON schema keyword(s) ['multipleOf']"),
    ({"guided_json": {"type": "array", "items": {"not": {"type": "null"}}}}, "['not'] at /items"),
    ({"guided_json": {"allOf": [{"type": "integer"}]}}, "['allOf']"),
    ({"guided_json": {"oneOf": [{"type": "integer"}, {"type": "number"}]}}, "['oneOf']"),
    ({"guided_json": "{not json"}, "not valid JSON"),
    ({"guided_json": "[" * 60_000}, "RecursionError"),  # nested past the parser, under max_grammar_bytes
    ({"structured_outputs": {"json": {}, "regex": "a"}}, "exactly one of"),
    ({"structured_outputs": {"lark": "a"}}, "unsupported field(s) ['lark']"),
    ({"guided_choice": []}, "non-empty list"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "at most one"),
    ({"response_format": {"type": "xml"}}, "response_format type"),
    ({"guided_json": {"enum": ["x" * 70_000]}}, "max_grammar_bytes=65536"),
])
def test_bad_constraints_are_refused_at_once(form, message):
    with pytest.raises(InvalidRequest) as refused:
        SamplingParams.from_request(json.dumps(form), limits=ServingConfig().engine)
    assert message in str(refused.value)


def test_schema_depth_limit_is_named():
    schema: dict = {"type": "integer"}
    for _ in range(40):
        schema = {"type": "array", "items": schema, "maxItems": 1}
    with pytest.raises(InvalidRequest, match="max_schema_depth=32"):
        SamplingParams.from_request(json.dumps({"guided_json": schema}), limits=ServingConfig().engine)


def test_one_compile_per_distinct_schema_and_cancel_while_compiling_releases(stack):
    probe = stack.engine.probe
    before = probe.num_grammar_compiles
    schema = {"type": "object", "properties": {"k": SCHEMAS["enum"]}, "required": ["k"]}
    spaced = json.dumps(schema, indent=2)  # the same canonical text
    handles = [stack.submit("Which?", params=params({"guided_json": s})) for s in (schema, spaced, schema)]
    texts = {h.wait().text for h in handles}
    assert probe.num_grammar_compiles == before + 1 and len(texts) == 1
    cancelled = stack.submit("Which?", params=params({"guided_json": SCHEMAS["deep"]}, max_tokens=200))
    cancelled.cancelled.set()
    assert cancelled.wait().final.finish_reason in (FinishReason.CANCELLED, FinishReason.STOP)


def test_min_tokens_never_forces_tokens_the_grammar_forbids(stack):
    handle = stack.submit("Yes?", params=params({"guided_choice": ["yes", "no"]}, min_tokens=20)).wait()
    assert handle.text in ("yes", "no") and handle.final.finish_reason == FinishReason.STOP


def test_logprobs_are_the_models_own_distribution(stack):
    """The grammar masks what is sampled, not what is reported: the first token's alternatives
    are those of the same request without a grammar."""
    free = stack.submit("Say hello.", params=params({}, max_tokens=1, logprobs=5)).wait()
    held = stack.submit("Say hello.", params=params({"guided_choice": ["zq"]}, logprobs=5)).wait()
    first_free, first_held = (next(e for o in h.outputs for e in (o.logprobs or [])) for h in (free, held))
    assert held.text == "zq"
    assert first_held["top"] == first_free["top"]
    assert first_held["logprob"] < first_free["top"][0]["logprob"]  # not the model's choice


def test_stop_strings_cut_a_constrained_answer(stack):
    handle = stack.submit("Say it.", params=params({"guided_regex": "alpha beta gamma"}, stop=[" gamma"])).wait()
    assert handle.text == "alpha beta" and handle.final.finish_reason == FinishReason.STOP


def test_preempted_requests_keep_their_grammar(checkpoint):
    raw = {"checkpoint": str(checkpoint), "compile_backend": "eager", "max_context": "1024", "max_running": "4",
           "decode_batch_sizes": "1 2 4", "prefill_chunk": "64", "num_kv_blocks": "6"}
    s = Stack(LLMService(ServingConfig.from_strings(raw)), Preprocessor(str(checkpoint)), VisionEncoder(str(checkpoint)))
    try:  # 5 usable blocks; each sequence grows to 2 (a ~45-token prompt and 60 letters): some are preempted
        letters = params({"guided_regex": "[a-z]{60}"}, max_tokens=100)
        solo = s.submit("Say hello.", params=letters).wait().text
        handles = [s.submit("Say hello.", params=letters) for _ in range(4)]
        assert [h.wait().text for h in handles] == [solo] * 4
        assert s.engine.stats().preemptions > 0 and re.fullmatch("[a-z]{60}", solo)
        assert s.engine.probe.num_grammar_matchers == 0
    finally:
        s.service.shutdown()


def test_a_compile_past_its_time_limit_is_refused_and_the_batch_goes_on(checkpoint, monkeypatch):
    from spyre_backend.engine.structured_output import StructuredOutputs

    compile_ = StructuredOutputs._compile
    monkeypatch.setattr(StructuredOutputs, "_compile", lambda self, s: time.sleep(1.0) or compile_(self, s))
    raw = {"checkpoint": str(checkpoint), "compile_backend": "eager", "max_context": "1024", "max_running": "4",
           "decode_batch_sizes": "1 2 4", "prefill_chunk": "64", "grammar_compile_timeout_s": "0.2"}
    s = Stack(LLMService(ServingConfig.from_strings(raw), warmup=False), Preprocessor(str(checkpoint)),
              VisionEncoder(str(checkpoint)))
    try:
        slow = s.submit("Who?", params=params({"guided_json": SCHEMAS["person"]}))
        free = s.submit("Say hello.", params=params({}, max_tokens=20))
        assert "did not compile within grammar_compile_timeout_s=0.2 s" in slow.wait().final.error
        assert free.wait().final.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
        time.sleep(1.5)  # the compile went on, off the engine thread: the next request finds it cached
        again = s.submit("Who?", params=params({"guided_json": SCHEMAS["person"]})).wait()
        jsonschema.validate(json.loads(again.text), SCHEMAS["person"])
    finally:
        s.service.shutdown()


@pytest.mark.parametrize("schema", [{"type": "string"}, {"type": "string", "maxLength": 30},
                                    {"type": "string", "minLength": 2}, {"type": "string", "pattern": "^.{1,5}$"}],
                         ids=["plain", "maxLength", "minLength", "pattern"])
def test_no_string_lets_a_raw_control_character_in(reference, schema):
    """RFC 8259: control characters in strings must be escaped (xgrammar 0.2.8 lets them into
    length-bounded strings; json_schema_grammar closes that)."""
    tokenizer = reference.processor.tokenizer
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=reference.model.config.text_config.vocab_size)
    matcher = xgr.GrammarMatcher(xgr.GrammarCompiler(info).compile_grammar(json_schema_grammar(json.dumps(schema))))
    assert matcher.accept_string('"')
    mask = xgr.allocate_token_bitmask(1, info.vocab_size)
    matcher.fill_next_token_bitmask(mask)
    allowed = [t for t in range(info.vocab_size) if (int(mask[0, t // 32]) >> (t % 32)) & 1]
    raw = [t for t in allowed if any(byte < 0x20 for byte in info.decoded_vocab[t])]
    assert len(allowed) > 100 and not raw, [info.decoded_vocab[t] for t in raw]


def test_plain_and_constrained_rows_share_a_batch(stack):
    """Rows with a grammar among rows without one, in any order: each gets its own mask or none."""
    plain = [("What is in the image?", [shape_png("circle", "red", "blue", (200, 150))], params({}, max_tokens=12))
             for _ in range(2)]
    alone = run_all(stack, plain[:1])[0].text
    constrained = ("Who?", [], params({"guided_json": SCHEMAS["person"]}, temperature=1.0, seed=3))
    outputs = run_all(stack, [plain[0], constrained, plain[1], constrained])
    assert outputs[0].text == alone and outputs[2].text == alone  # greedy, untouched by the grammar rows
    for out in (outputs[1], outputs[3]):
        jsonschema.validate(json.loads(out.text), SCHEMAS["person"])


def test_bitmask_rows_map_to_their_own_logits_rows():
    import torch

    from spyre_backend.engine.structured_output import apply_bitmasks

    only = {1: 0, 3: 37}  # logits row -> the one token its mask allows
    masks = []
    for token in only.values():
        mask = torch.zeros(1, 2, dtype=torch.int32)
        mask[0, token // 32] = 1 << (token % 32)
        masks.append(mask)
    logits = torch.randn(4, 50)
    before = logits.clone()
    apply_bitmasks(logits, masks, list(only))
    for row, token in only.items():
        assert logits[row].argmax() == token and torch.isinf(logits[row]).sum() == 49
    assert torch.equal(logits[[0, 2]], before[[0, 2]])
