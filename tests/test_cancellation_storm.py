"""200 streams through the real server, half of them ended early at random points in three ways:
gRPC cancel, a ``stop`` request on the stream's sequence id, and HTTP disconnects on the
stateless entry. Every survivor must equal its solo output, every ended stream must really have
stopped (the engine counts it as cancelled, not run to max_tokens), and no KV block or session may
leak (checked by the autouse ``server_returns_to_idle`` fixture).

Not part of `make test` yet (`make stress` runs it): under this storm the granite_vision front's
stub process segfaults inside libpython (kernel log: "segfault at 0 ... in libpython3.11"), and
the front's in-flight streams are lost. On a run without that crash it also failed: a few
2000-token streams ran to their end before the client (48 threads in one process) had read 30
responses, so their stop found nothing open: responses queue up without bound behind a slow
reader. Move it into `make test` once both are fixed.
"""

from __future__ import annotations

import json
import queue
import random
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import tritonclient.grpc as grpcclient

from tests.images import shape_png
from tests.metrics import finished, wait_for
from tests.streaming import grpc_stream, to_grpc_inputs

PROMPTS = [
    ("What is in the image?", [shape_png("triangle", "green", "white", (200, 150))]),
    ("Say hello.", []),
    ("What shape is it?", [shape_png("square", "yellow", "black", (60, 200))]),
    ("What color is the background?", [shape_png("circle", "red", "blue", (300, 40))]),
]
# A stream that runs long enough to be cut: min_tokens bans eos, so every step makes text and
# the stream sends a response per token or so (an eos-only tail would send nothing until the end).
# Long, because a client that reads slowly would otherwise find the stream over before its cut.
LONG_TOKENS = 2000
LONG = {"text_input": "Say hello.", "apply_chat_template": True, "max_tokens": LONG_TOKENS, "stream": True,
        "sampling_parameters": json.dumps({"min_tokens": LONG_TOKENS})}
CUT_KINDS = ("grpc-cancel", "stop-request", "http-disconnect")


def survivor_inputs(i: int) -> dict:
    question, images = PROMPTS[i % len(PROMPTS)]
    inputs = {"text_input": question, "apply_chat_template": True, "max_tokens": 24, "stream": True}
    if images:
        inputs["image"] = images
    return inputs


def cut_grpc_stream(url: str, after: int, sequence_id: int, via_stop: bool) -> str:
    """Reads ``after`` responses of a long stream, then cancels it or sends a stop request."""
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer("granite_vision", to_grpc_inputs(LONG), sequence_id=sequence_id,
                                  sequence_start=bool(sequence_id), sequence_end=bool(sequence_id))
        for _ in range(after):
            result, error = results.get(timeout=300)
            if error is not None:
                return f"error before the cut: {error}"
            if result.as_numpy("finish_reason")[0]:
                return "finished before the cut"
        if not via_stop:
            client.stop_stream(cancel_requests=True)
            return "cancelled"
        stop = grpc_stream(url, {"text_input": "", "stop": True}, sequence_id=sequence_id,
                           sequence_start=False, sequence_end=True)
        if stop.get("finish_reason") != "stopped":
            while True:
                result, error = results.get(timeout=300)
                if error is not None:
                    return f"stop request failed: {stop}; stream error {error}"
                if result.as_numpy("finish_reason")[0]:
                    return f"stop request failed: {stop}; stream ended {result.as_numpy('finish_reason')[0]}"
        while True:  # the stopped stream still ends with a final response
            result, error = results.get(timeout=300)
            if error is not None:
                return f"error after the stop: {error}"
            reason = result.as_numpy("finish_reason")[0].decode()
            if reason:
                return "stopped" if reason == "cancelled" else f"stream ended with {reason!r}"
    finally:
        client.stop_stream()
        client.close()


def cut_http_stream(http_url: str, after: int) -> str:
    """Reads ``after`` server-sent events of a long generate_stream, then hangs up."""
    request = urllib.request.Request(f"http://{http_url}/v2/models/granite_vision/generate_stream",
                                     data=json.dumps(LONG).encode())
    with urllib.request.urlopen(request, timeout=300) as response:
        seen = 0
        for raw in response:
            if raw.startswith(b"data:"):
                if json.loads(raw[5:]).get("finish_reason"):
                    return "finished before the cut"
                seen += 1
                if seen >= after:
                    return "disconnected"
    return "the stream ended without a final event"


@pytest.mark.stress
def test_cancellation_storm(server):
    solo = [grpc_stream(server.grpc_url, survivor_inputs(i))["text"] for i in range(len(PROMPTS))]
    cancelled_before = finished(server.metrics_url, "cancelled")
    rng = random.Random(7)
    jobs = list(range(200))
    rng.shuffle(jobs)
    cut_kind = {job: CUT_KINDS[n % 3] for n, job in enumerate(jobs[:100])}
    cut_after = {job: rng.randint(1, 30) for job in jobs}

    def run(job: int):
        kind = cut_kind.get(job)
        if kind is None:
            return grpc_stream(server.grpc_url, survivor_inputs(job))
        if kind == "http-disconnect":
            return cut_http_stream(server.http_url, cut_after[job])
        via_stop = kind == "stop-request"
        return cut_grpc_stream(server.grpc_url, cut_after[job], sequence_id=(900_000 + job) if via_stop else 0,
                               via_stop=via_stop)

    with ThreadPoolExecutor(max_workers=48) as pool:
        results = dict(zip(jobs, pool.map(run, jobs)))

    survivors = [job for job in jobs if job not in cut_kind]
    for job in survivors:
        assert "error" not in results[job], results[job]
        assert results[job]["text"] == solo[job % len(PROMPTS)], job
    expected = {"grpc-cancel": "cancelled", "stop-request": "stopped", "http-disconnect": "disconnected"}
    wrong = {job: (kind, results[job]) for job, kind in cut_kind.items() if results[job] != expected[kind]}
    assert not wrong, wrong
    # Every cut stream really stopped in the engine (none ran its LONG_TOKENS to the end).
    assert wait_for(lambda: finished(server.metrics_url, "cancelled") - cancelled_before == len(cut_kind),
                    timeout=120), finished(server.metrics_url, "cancelled") - cancelled_before
