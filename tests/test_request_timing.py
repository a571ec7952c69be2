"""The engine's per-request timing (arrival, first token, per-token gaps, finish) that granite_llm
turns into latency histograms, checked without Triton."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from spyre_backend.config import ServingConfig
from spyre_backend.engine.request import RequestTiming
from spyre_backend.serving import llm_service
from spyre_backend.serving.llm_service import GenerateInputs, LLMService


def test_timing_arithmetic():
    t = RequestTiming(arrival=10.0, first_token=10.5, last_token=12.5, finished=12.6, num_output_tokens=5)
    assert t.time_to_first_token == pytest.approx(0.5)
    assert t.time_per_output_token == pytest.approx(0.5)  # 2 s over the 4 gaps after the first token
    assert t.e2e_latency == pytest.approx(2.6)
    one = RequestTiming(10.0, 10.5, 10.5, 10.6, 1)
    assert one.time_per_output_token is None and one.time_to_first_token == pytest.approx(0.5)
    never = RequestTiming(10.0, None, None, 11.0, 0)
    assert never.time_to_first_token is None and never.time_per_output_token is None
    assert never.e2e_latency == pytest.approx(1.0)


@pytest.fixture(scope="module")
def service(checkpoint):
    raw = {"checkpoint": str(checkpoint), "compile_backend": "eager", "max_context": "512", "max_running": "2", "decode_batch_sizes": "1 2"}
    s = LLMService(ServingConfig.from_strings(raw), warmup=False)
    yield s
    s.shutdown()


def run(service, stream: bool, max_tokens: int, is_cancelled=lambda: False):
    ids = service.tokenizer("<|user|>\nSay hello.\n<|assistant|>\n", return_tensors="np")["input_ids"][0]
    outputs, done = [], threading.Event()

    def send(text, out):
        outputs.append(out)
        if out.finished:
            done.set()

    inputs = GenerateInputs(input_ids=ids.astype(np.int64), image_features=None, stream=stream,
                            max_tokens=max_tokens, sampling_parameters=json.dumps({"ignore_eos": True}))
    before = time.monotonic()
    service.submit(inputs, send, is_cancelled=is_cancelled)
    assert done.wait(120)
    return before, time.monotonic(), outputs


@pytest.mark.parametrize("stream", [True, False])
def test_a_finished_request_reports_its_timing(service, stream):
    before, after, outputs = run(service, stream, max_tokens=8)
    final = outputs[-1]
    assert all(o.timing is None for o in outputs[:-1])  # only the last response carries it
    t = final.timing
    assert before <= t.arrival <= t.first_token <= t.last_token <= t.finished <= after
    assert t.num_output_tokens == final.num_output_tokens == 8
    assert 0 < t.time_to_first_token <= t.e2e_latency
    assert t.time_per_output_token == pytest.approx((t.last_token - t.first_token) / 7)
    assert t.time_per_output_token > 0  # each decode step takes some time


def test_a_request_cancelled_before_its_prefill_has_no_first_token(service, monkeypatch):
    # Triton's cancellation is polled once per CANCEL_POLL_S, the first time one interval after
    # arrival: here it is asked at every step, so the engine sees it before the prefill.
    monkeypatch.setattr(llm_service, "polled_every", lambda check: check)
    _, _, outputs = run(service, True, max_tokens=8, is_cancelled=lambda: True)
    final = outputs[-1]
    assert final.finish_reason.value == "cancelled" and final.num_output_tokens == 0
    assert final.timing.time_to_first_token is None and final.timing.time_per_output_token is None
    assert final.timing.e2e_latency >= 0
