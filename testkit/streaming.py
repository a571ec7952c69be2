"""Minimal streaming clients (tests, bench, scripts): gRPC (tritonclient) and HTTP generate_stream (SSE)."""

from __future__ import annotations

import base64
import json
import queue
import urllib.request

import tritonclient.grpc as grpcclient

from spyre_backend.protocol.client import finish_and_counts, infer_inputs


def grpc_stream(url: str, inputs: dict, model: str = "granite_vision", sequence_id=0,
                sequence_start=False, sequence_end=False, timeout=300, headers: dict | None = None) -> dict:
    """Sends one request on a gRPC stream; returns the text pieces, the last response or the error.
    A session's id goes as the x-session-id header too, as the project's clients send it, unless
    ``headers`` says otherwise."""
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    if headers is None and sequence_id:
        headers = {"x-session-id": str(sequence_id)}
    client.start_stream(callback=lambda result, error: results.put((result, error)), headers=headers or None)
    try:
        client.async_stream_infer(model, to_grpc_inputs(inputs), sequence_id=sequence_id,
                                  sequence_start=sequence_start, sequence_end=sequence_end)
        pieces, logprobs = [], []
        while True:
            result, error = results.get(timeout=timeout)
            if error is not None:
                return {"error": str(error), "pieces": pieces}
            pieces.append(result.as_numpy("text_output")[0].decode("utf-8"))
            raw = result.as_numpy("logprobs")
            if raw is not None and raw[0]:
                logprobs.append(json.loads(raw[0]))  # this response's tokens, when asked for
            final = finish_and_counts(result)
            if final["finish_reason"]:
                return {"pieces": pieces, "text": "".join(pieces), "logprobs": logprobs, **final}
    finally:
        client.stop_stream()
        client.close()


def to_grpc_inputs(inputs: dict) -> list:
    """``inputs`` (name -> value) as gRPC InferInputs typed by the schema (numpy arrays go as they are)."""
    return infer_inputs(inputs, grpcclient)


def http_generate_stream(http_url: str, body: dict, model: str = "granite_vision", timeout=300) -> dict:
    """POST /v2/models/<model>/generate_stream; images are sent base64-encoded."""
    body = dict(body)
    if "image" in body:
        body["image"] = [base64.b64encode(b).decode() for b in body["image"]]
    req = urllib.request.Request(f"http://{http_url}/v2/models/{model}/generate_stream",
                                 data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    events = []
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            for raw in resp:
                line = raw.decode("utf-8").strip()
                if line.startswith("data:"):
                    events.append(json.loads(line[5:]))
    except urllib.error.HTTPError as exc:
        return {"error": exc.read().decode(), "pieces": []}
    errors = [e["error"] for e in events if "error" in e]
    if errors:
        return {"error": errors[0], "pieces": []}
    pieces = [e["text_output"] for e in events]
    last = events[-1]
    return {"pieces": pieces, "text": "".join(pieces), "finish_reason": last["finish_reason"],
            "num_input_tokens": last["num_input_tokens"], "num_output_tokens": last["num_output_tokens"],
            "num_cached_tokens": last["num_cached_tokens"]}
