"""The engine through the real tritonserver: concurrency, stop requests, cancellation, disconnects,
and the KV blocks coming back every time."""

from __future__ import annotations

import json
import queue
import threading
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from testkit.images import shape_png
from testkit.metrics import finished, kv_state, wait_for
from testkit.streaming import grpc_stream, to_grpc_inputs

STREAMS = [("What is in the image?", [shape_png("triangle", "green", "white", (200, 150))]),
           ("Say hello.", []),
           ("What shape is it?", [shape_png("square", "yellow", "black", (60, 200))]),
           ("What is the capital of France?", []),
           ("What color is the background?", [shape_png("circle", "red", "blue", (300, 40))]),
           ("What color is the shape?", [shape_png("circle", "purple", "yellow", (90, 90))]),
           ("What is in the second image?", [shape_png("circle", "red", "blue"), shape_png("square", "blue", "white")]),
           ("What is in the image?", [shape_png("square", "green", "red", (400, 30))])]


def request_inputs(question, images, max_tokens=24, **extra):
    inputs = {"text_input": question, "apply_chat_template": True, "max_tokens": max_tokens, "stream": True, **extra}
    if images:
        inputs["image"] = images
    return inputs


def test_sixteen_concurrent_streams_match_their_solo_outputs(server, reference):
    solo = [grpc_stream(server.grpc_url, request_inputs(q, imgs)) for q, imgs in STREAMS]
    for (q, imgs), out in zip(STREAMS, solo):
        assert out["text"] == reference.generate(reference.chat_prompt(q, len(imgs)), imgs, 24)["text"]
    results = [None] * 16

    def run(i):
        q, imgs = STREAMS[i % len(STREAMS)]
        results[i] = grpc_stream(server.grpc_url, request_inputs(q, imgs))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    for i, got in enumerate(results):
        assert got is not None and "error" not in got, got
        assert got["text"] == solo[i % len(STREAMS)]["text"]


def test_session_turns_through_the_server(server, reference):
    q, imgs = STREAMS[0]
    first = grpc_stream(server.grpc_url, request_inputs(q, imgs), model="granite_vision_ensemble",
                        sequence_id=9001, sequence_start=True)
    follow_up = "\n<|user|>\nWhat shape is it?\n<|assistant|>\n"
    second = grpc_stream(server.grpc_url, {"text_input": follow_up, "max_tokens": 24, "stream": True},
                         model="granite_vision_ensemble", sequence_id=9001, sequence_end=True)
    whole = reference.chat_prompt(q, 1) + first["text"] + reference.processor.tokenizer.eos_token + follow_up
    afresh = grpc_stream(server.grpc_url, {"text_input": whole, "image": imgs, "max_tokens": 24, "stream": True})
    assert "error" not in second, second
    assert second["text"] == afresh["text"]


def long_generation(**extra):
    return {"text_input": "Say hello.", "apply_chat_template": True, "max_tokens": 3000, "stream": True,
            # min_tokens, not ignore_eos: tokens after an eos decode to no text and send nothing, and an
            # HTTP client's disconnect is only noticed when the server next writes to it
            "sampling_parameters": json.dumps({"min_tokens": 3000}), **extra}


def open_stream(url, model, inputs, **kwargs):
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    client.async_stream_infer(model, to_grpc_inputs(inputs), **kwargs)
    return client, results


def next_result(results, timeout=120):
    result, error = results.get(timeout=timeout)
    return result, error


def test_stop_request_through_the_ensemble(server):
    client, results = open_stream(server.grpc_url, "granite_vision_ensemble", long_generation(),
                                  sequence_id=9100, sequence_start=True, sequence_end=True)
    try:
        assert next_result(results)[1] is None  # generating
        stop = grpc_stream(server.grpc_url, {"text_input": "", "stop": True}, model="granite_vision_ensemble",
                           sequence_id=9100, sequence_start=True, sequence_end=True)
        assert stop.get("finish_reason") == "stopped", stop
        reasons = []
        while not reasons:
            result, error = next_result(results)
            assert error is None
            reason = result.as_numpy("finish_reason")[0].decode()
            if reason:
                reasons.append(reason)
                tokens = int(result.as_numpy("num_output_tokens")[0])
        assert reasons == ["cancelled"] and tokens < 3000
    finally:
        client.stop_stream()
        client.close()


def test_stop_request_for_an_unknown_sequence_is_an_error(server):
    got = grpc_stream(server.grpc_url, {"text_input": "", "stop": True}, sequence_id=424242,
                      sequence_start=True, sequence_end=True)
    assert "no open session" in got.get("error", ""), got


def test_direct_cancel_on_granite_llm_frees_blocks(server, reference):
    ids = reference.processor.tokenizer(reference.chat_prompt("Say hello.", 0), return_tensors="np")["input_ids"][0]
    inputs = {"input_ids": ids.astype(np.int64), "image_features": np.zeros((0, 8), dtype=np.float32),
              "max_tokens": 3000, "stream": True, "sampling_parameters": json.dumps({"ignore_eos": True})}
    cancelled = finished(server.metrics_url, "cancelled")
    client, results = open_stream(server.grpc_url, "granite_llm", inputs, sequence_id=9200, sequence_start=True,
                                  sequence_end=True)
    assert next_result(results)[1] is None
    client.stop_stream(cancel_requests=True)
    client.close()
    assert wait_for(lambda: kv_state(server.metrics_url)[1] == 0, timeout=30)
    assert finished(server.metrics_url, "cancelled") == cancelled + 1  # it was cancelled, not run out


def test_http_disconnect_on_the_stateless_entry_stops_generation(server):
    cancelled = finished(server.metrics_url, "cancelled")
    body = json.dumps(long_generation()).encode()
    req = urllib.request.Request(f"http://{server.http_url}/v2/models/granite_vision/generate_stream", data=body)
    resp = urllib.request.urlopen(req, timeout=60)
    events = 0
    for raw in resp:
        if raw.startswith(b"data:"):
            events += 1
            if events == 3:
                break
    resp.close()  # the client goes away mid-stream
    assert wait_for(lambda: kv_state(server.metrics_url)[1] == 0, timeout=60)
    assert finished(server.metrics_url, "cancelled") == cancelled + 1  # stopped, not run to max_tokens


def test_trtllm_style_sampling_inputs(server):
    inputs = {"text_input": "Say hello.", "apply_chat_template": True, "max_tokens": 12, "stream": True,
              "temperature": np.array([1.5], dtype=np.float32), "random_seed": np.array([7], dtype=np.uint64),
              "sampling_parameters": json.dumps({"ignore_eos": True})}
    first, second = grpc_stream(server.grpc_url, inputs), grpc_stream(server.grpc_url, inputs)
    assert "error" not in first and first["text"] == second["text"]
    bad = grpc_stream(server.grpc_url, {**inputs, "top_p": np.array([0.0], dtype=np.float32)})
    assert "top_p" in bad.get("error", "")
