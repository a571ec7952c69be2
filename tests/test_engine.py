"""The engine driven directly (no Triton): continuous batching, chunked prefill, paged KV
accounting, sessions, sampling, stop strings, cancellation and queueing."""

from __future__ import annotations

import time

import pytest
import torch

from spyre_backend.config import ServingConfig
from spyre_backend.engine.sampling_params import SamplingParams
from spyre_backend.errors import InvalidRequest
from spyre_backend.preprocess.processor import Preprocessor
from spyre_backend.serving.llm_service import LLMService
from spyre_backend.vision.encoder import VisionEncoder
from tests.engine_harness import Stack
from testkit.images import shape_png

TRIANGLE = shape_png("triangle", "green", "white", (200, 150))


def make_stack(checkpoint, **params) -> Stack:
    # prefill_chunk 64: every image prompt (100+ tokens) is prefilled in several chunks
    # eager: the engine's logic, against the exact reference (inductor is checked against it in
    # test_device_and_compile, and serves in the tritonserver the end-to-end tests talk to)
    raw = {"checkpoint": str(checkpoint), "compile_backend": "eager", "max_context": "1024", "max_running": "4",
           "decode_batch_sizes": "1 2 4", "prefill_chunk": "64", **params}
    return Stack(LLMService(ServingConfig.from_strings(raw)), Preprocessor(str(checkpoint)),
                 VisionEncoder(str(checkpoint)))


@pytest.fixture(scope="module")
def stack(checkpoint):
    s = make_stack(checkpoint)
    yield s
    s.service.shutdown()


@pytest.fixture(autouse=True)
def no_leaks(stack):
    """Every test must leave the KV cache and the session table as it found them."""
    free, sessions = stack.engine.probe.free_blocks, stack.engine.probe.num_sessions
    yield
    deadline = time.monotonic() + 10
    while stack.engine.probe.free_blocks != free and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stack.engine.probe.free_blocks == free
    assert stack.engine.probe.num_sessions == sessions


CASES = [("What is in the image?", [TRIANGLE]),
         ("Say hello.", []),
         ("What shape is it?", [shape_png("square", "yellow", "black", (60, 200))]),
         ("What is the capital of France?", []),
         ("What color is the background?", [shape_png("circle", "red", "blue", (300, 40))]),
         ("What is in the second image?", [shape_png("circle", "red", "blue"), shape_png("square", "blue", "white")])]


def test_concurrent_requests_match_solo_runs_and_transformers(stack, reference):
    solo = [stack.submit(q, imgs).wait().text for q, imgs in CASES]
    together = [stack.submit(q, imgs) for q, imgs in CASES * 2]  # 12 > max_running 4: some queue
    assert [h.wait().text for h in together] == solo * 2
    for (q, imgs), text in zip(CASES, solo):
        assert text == reference.generate(reference.chat_prompt(q, len(imgs)), imgs, 20)["text"]


def test_request_that_can_never_fit_is_refused_at_once(stack):
    with pytest.raises(InvalidRequest, match="maximum context length"):
        stack.submit("Say hello.", max_tokens=5000)


def test_session_second_turn_prefills_only_new_tokens(stack, reference):
    tok = stack.pre.tokenizer
    first = stack.submit("What is in the image?", [TRIANGLE], sequence_id=11, sequence_start=True,
                         sequence_end=False).wait()
    # the second turn is the chat template's continuation after the first answer
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": first.text}]},
                    {"role": "user", "content": [{"type": "text", "text": "What shape is it?"}]}]
    full = reference.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    turn1 = reference.chat_prompt("What is in the image?", 1) + first.text + tok.eos_token
    assert full.startswith(turn1)
    new_ids = torch.tensor(tok(full[len(turn1):])["input_ids"])
    second = stack.submit("", ids=new_ids, sequence_id=11, sequence_start=False, sequence_end=True).wait()
    # only the new tokens and the first turn's last (sampled, never fed back) token are computed
    assert second.final.num_prefill_tokens == len(new_ids) + 1
    afresh = stack.submit(full, [TRIANGLE], chat=False).wait()
    assert second.text == afresh.text
    # the whole conversation, image included, of which the first turn's full blocks came from the
    # prefix cache (the session registered them)
    assert afresh.final.num_prefill_tokens + afresh.final.num_cached_tokens > 100
    assert afresh.final.num_cached_tokens >= 64


def test_turns_of_one_session_run_in_order(stack):
    tok = stack.pre.tokenizer
    ids = lambda text: torch.tensor(tok(text)["input_ids"])  # noqa: E731
    first = stack.submit("Say hello.", sequence_id=12, sequence_start=True, sequence_end=False, max_tokens=20)
    second = stack.submit("", ids=ids("\n<|user|>\nSay hello.\n<|assistant|>\n"), sequence_id=12,
                          sequence_start=False, sequence_end=True, max_tokens=5)
    assert second.wait().final.finish_reason is not None
    assert first.done.is_set()  # the second turn only started after the first ended
    assert first.final.finish_reason.value in ("stop", "length")


def test_turn_of_an_unknown_session_is_refused(stack):
    out = stack.submit("Say hello.", sequence_id=999, sequence_start=False, sequence_end=True).wait()
    assert "resend the whole conversation" in out.final.error


def test_seeded_sampling_is_reproducible_in_any_batch(stack):
    # a high temperature: the trained checkpoint is so confident that mild sampling is greedy
    params = lambda: SamplingParams(max_tokens=12, temperature=20.0, seed=1234, ignore_eos=True)  # noqa: E731
    alone = stack.submit("Say hello.", params=params()).wait().text
    others = [stack.submit(q, imgs) for q, imgs in CASES[:3]]
    batched = stack.submit("Say hello.", params=params())
    assert batched.wait().text == alone
    for h in others:
        h.wait()
    other_seed = stack.submit("Say hello.", params=SamplingParams(max_tokens=12, temperature=20.0, seed=99,
                                                                  ignore_eos=True)).wait().text
    assert other_seed != alone


def test_stop_strings_match_across_token_boundaries(stack):
    full = stack.submit("What is in the image?", [TRIANGLE]).wait().text
    words = full.split()
    assert len(words) >= 3
    # a stop string that starts inside one token and ends inside the next
    stop = words[1][1:] + " " + words[2][:2]
    out = stack.submit("What is in the image?", [TRIANGLE],
                       params=SamplingParams(max_tokens=20, stop=[stop])).wait()
    assert out.text == full[: full.index(stop)]
    assert out.final.finish_reason.value == "stop"
    assert all(stop not in o.text for o in out.outputs)


def test_min_tokens_logprobs_and_penalties(stack):
    out = stack.submit("Say hello.", params=SamplingParams(max_tokens=30, min_tokens=25, logprobs=3)).wait()
    assert out.final.num_output_tokens >= 25
    logprobs = [lp for o in out.outputs for lp in (o.logprobs or [])]
    assert len(logprobs) == out.final.num_output_tokens
    assert all(len(lp["top"]) == 3 and lp["top"][0]["logprob"] >= lp["logprob"] - 1e-6 for lp in logprobs)
    plain = stack.submit("Say hello.", params=SamplingParams(max_tokens=30, ignore_eos=True)).wait()
    # past the answer the model repeats <|end_of_text|>; a frequency penalty grows with each one
    penalised = stack.submit("Say hello.", params=SamplingParams(max_tokens=30, ignore_eos=True,
                                                                 frequency_penalty=2.0)).wait()
    assert penalised.text != plain.text


def test_cancel_and_stop_free_blocks(stack):
    cancelled = stack.submit("Say hello.", params=SamplingParams(max_tokens=500, ignore_eos=True))
    while not cancelled.outputs:
        time.sleep(0.01)
    cancelled.cancelled.set()
    assert cancelled.wait().final.finish_reason.value == "cancelled"
    assert cancelled.final.num_output_tokens < 100

    stopped = stack.submit("Say hello.", params=SamplingParams(max_tokens=500, ignore_eos=True), sequence_id=21,
                           sequence_start=True, sequence_end=False)
    while not stopped.outputs:
        time.sleep(0.01)
    replies = []
    stack.engine.stop_sequence(21, True, replies.append)
    assert stopped.wait().final.finish_reason.value == "cancelled"
    assert replies == [None]
    unknown = []
    stack.engine.stop_sequence(12345, True, unknown.append)
    deadline = time.monotonic() + 5
    while not unknown and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "no open session" in unknown[0]


def test_wall_clock_limit(stack):
    """A request past its deadline ends with "timeout" at the next step, wherever it is (the
    deadline is moved into the past once it has streamed, so no machine is too fast for this)."""
    from spyre_backend.engine.request import Request
    from tests.engine_harness import Handle

    handle = Handle()
    ids, _ = stack.prompt("Say hello.", [])

    def on_output(out):
        request.deadline = 0.0  # its time is up
        handle.on_output(out)

    request = Request(ids, None, SamplingParams(max_tokens=900, ignore_eos=True), on_output)
    stack.engine.add_request(request)
    out = handle.wait(60)
    assert out.final.finish_reason.value == "timeout"
    assert 1 <= out.final.num_output_tokens < 900


def test_blocks_on_demand_preemption_and_session_eviction(checkpoint):
    # 5 usable blocks of 64 tokens; a text request grows to 2 (prompt ~45 + 40 new tokens)
    s = make_stack(checkpoint, num_kv_blocks="6")
    long = dict(params=SamplingParams(max_tokens=40, ignore_eos=True))
    try:
        solo = s.submit("Say hello.", **long).wait().text
        # blocks are taken as sequences grow: all four start, then the pool runs out and the most
        # recently admitted are preempted and recomputed later; their output is unchanged
        handles = [s.submit("Say hello.", **long) for _ in range(4)]
        assert [h.wait().text for h in handles] == [solo] * 4
        preempted = s.engine.stats().preemptions
        assert preempted > 0
        # an idle session's blocks are evicted before any running request is preempted
        s.submit("Say hello.", sequence_id=5, sequence_start=True, sequence_end=False, **long).wait()
        assert s.engine.probe.num_sessions == 1
        others = [s.submit("Say hello.", **long) for _ in range(2)]
        assert [h.wait().text for h in others] == [solo] * 2
        assert s.engine.probe.num_sessions == 0
        assert s.engine.stats().preemptions == preempted
        late = s.submit("Hi", sequence_id=5, sequence_start=False, sequence_end=True).wait()
        assert "evicted" in late.final.error
        assert s.engine.probe.free_blocks == 5
        # a request that could never fit the pool alone is refused at once
        with pytest.raises(InvalidRequest, match="KV blocks"):
            s.submit("Say hello.", max_tokens=400)
    finally:
        s.service.shutdown()


def test_a_short_answer_holds_only_the_blocks_it_uses(stack):
    handle = stack.submit("Say hello.", params=SamplingParams(max_tokens=900, ignore_eos=True))
    deadline = time.monotonic() + 60
    while not handle.outputs and time.monotonic() < deadline:
        time.sleep(0.005)
    held = stack.engine.probe.usable_blocks - stack.engine.probe.free_blocks
    handle.cancelled.set()
    handle.wait()
    assert 1 <= held < stack.engine.probe.blocks_for(900)  # not the whole max_tokens at admission


def test_idle_sessions_expire(checkpoint):
    s = make_stack(checkpoint, session_ttl_s="1")
    try:
        s.submit("Say hello.", sequence_id=31, sequence_start=True, sequence_end=False).wait()
        assert s.engine.probe.has_session(31)
        time.sleep(1.2)
        s.submit("Say hello.", max_tokens=2).wait()  # any step runs the expiry
        assert not s.engine.probe.has_session(31)
    finally:
        s.service.shutdown()


def test_the_image_placeholder_is_never_sampled(stack):
    """A sampled <image> would be taken for an image without features (it ended the request with
    an error mid-stream): at temperature 100, seed 0, the tiny model drew it within 130 tokens."""
    params = SamplingParams(max_tokens=300, temperature=100.0, seed=0, ignore_eos=True)
    handle = stack.submit("hi", chat=False, params=params).wait()
    out = handle.final
    assert out.error is None and out.num_output_tokens == 300, out
    placeholder = stack.engine.probe.image_token_id
    params = SamplingParams(max_tokens=300, temperature=100.0, seed=0, ignore_eos=True, logprobs=0)
    entries = [e for o in stack.submit("hi", chat=False, params=params).wait().outputs for e in (o.logprobs or [])]
    assert len(entries) == 300 and placeholder not in [e["token_id"] for e in entries]


def test_max_tokens_none_means_what_the_context_leaves(stack):
    ids, _ = stack.prompt("Say hello.", [], chat=True)
    room = stack.engine.room_for(len(ids))
    assert room == 1024 - len(ids)  # max_context of this stack; the pool holds 4 full contexts
    from spyre_backend.serving.llm_service import GenerateInputs

    sent = []
    inputs = GenerateInputs(input_ids=ids.numpy(), image_features=None, prompt_text="", stream=True,
                            exclude_input_in_output=True, max_tokens=None,
                            sampling_parameters='{"max_tokens": null, "ignore_eos": true}', sampling_overrides={},
                            sequence_id=None, sequence_start=True, sequence_end=True)
    stack.service.submit(inputs, lambda text, out: sent.append(out))
    deadline = time.monotonic() + 300
    while not (sent and sent[-1].finished) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sent[-1].finish_reason.value == "length" and sent[-1].num_output_tokens == room


def test_warmup_measures_the_mixed_chunk_unless_one_is_set(checkpoint, monkeypatch):
    """mixed_prefill_chunk -1 (the default): warmup times a decode step and prompt chunks on the
    real model and the scheduler takes the chooser's size; a size set in the config is kept."""
    from spyre_backend.engine import llm_engine
    from spyre_backend.engine.scheduler import choose_mixed_chunk

    calls = []

    def recording(time_chunk, decode_s, slowdown, align, block_size, prefill_chunk):
        chosen = choose_mixed_chunk(time_chunk, decode_s, slowdown, align, block_size, prefill_chunk)
        calls.append((time_chunk(align), decode_s, slowdown, block_size, prefill_chunk, chosen))
        return chosen

    monkeypatch.setattr(llm_engine, "choose_mixed_chunk", recording)
    raw = {"checkpoint": str(checkpoint), "compile_backend": "eager", "max_context": "1024", "prefill_chunk": "256",
           "block_size": "16", "mixed_step_slowdown": "3"}
    for mixed, measured in (("-1", True), ("32", False)):
        service = LLMService(ServingConfig.from_strings({**raw, "mixed_prefill_chunk": mixed}))
        try:
            if measured:
                [(chunk_s, decode_s, slowdown, block, prefill_chunk, chosen)] = calls
                assert chunk_s > 0 and decode_s > 0 and (slowdown, block, prefill_chunk) == (3.0, 16, 256)
                assert service.engine.probe.mixed_chunk == chosen and chosen % service.engine.probe.prefill_align == 0
                assert service.engine.probe.prefill_align <= chosen <= 256
            else:
                assert len(calls) == 1 and service.engine.probe.mixed_chunk == 32
        finally:
            service.shutdown()
