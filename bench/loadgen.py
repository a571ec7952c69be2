"""Closed-loop load: ``concurrency`` clients, each sending its next request when the last one ends.

Two targets share the loop and the recording (every response's arrival time and token count):
- ``TritonTarget``: gRPC streaming to a running tritonserver, one stream per client (as
  perf_analyzer does), on ``granite_vision`` or on ``granite_vision_ensemble`` (which needs a
  sequence id: each request gets a fresh one with START and END);
- ``OpenAITarget``: the peer, ``vllm serve``, over its OpenAI chat API (streaming, the image as a data URI),
  and ``LlamaCppTarget``, the same for llama.cpp's ``llama-server``;
- ``EngineTarget``: the same work in-process without Triton: the HF processor, the vision
  encoder and ``LLMService.submit`` (the code the Triton models wrap). Preprocessing and vision
  each run one request at a time, as their single Triton instances do.
"""

from __future__ import annotations

import base64
import http.client
import itertools
import json
import queue
import threading
import time

import numpy as np
import torch
import tritonclient.grpc as grpcclient

from bench.stats import RequestRecord
from bench.workload import Workload
from testkit.streaming import to_grpc_inputs


def closed_loop(send, n_requests: int, concurrency: int) -> list[RequestRecord]:
    """Runs requests 0..n-1 with ``concurrency`` client threads; ``send(client, i)`` blocks until
    request ``i`` is done and returns its RequestRecord."""
    next_index = itertools.count()
    records: list[RequestRecord | None] = [None] * n_requests
    lock = threading.Lock()

    def client(c: int) -> None:
        while True:
            with lock:
                i = next(next_index)
            if i >= n_requests:
                return
            try:
                records[i] = send(c, i)
            except Exception as exc:  # one failed request is reported, not fatal to the run
                records[i] = RequestRecord(time.monotonic(), error=repr(exc))

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records


class TritonTarget:
    def __init__(self, grpc_url: str, workload: Workload, concurrency: int, model: str = "granite_vision",
                 timeout_s: float = 900.0, headers: dict | None = None):
        self.model, self.workload, self.timeout_s = model, workload, timeout_s
        self.streams = []
        for _ in range(concurrency):
            results: queue.Queue = queue.Queue()
            client = grpcclient.InferenceServerClient(grpc_url)
            # arrival time taken in the callback, before anything else is done with the response
            client.start_stream(callback=lambda result, error, q=results: q.put((time.monotonic(), result, error)),
                                headers=headers)
            self.streams.append((client, results))
        self._ids = itertools.count(1)

    def send(self, c: int, i: int) -> RequestRecord:
        client, results = self.streams[c]
        kwargs = {}
        if self.model == "granite_vision_ensemble":
            kwargs = {"sequence_id": 1_000_000 + next(self._ids), "sequence_start": True, "sequence_end": True}
        inputs = to_grpc_inputs(self.workload.triton_inputs(i))
        record = RequestRecord(time.monotonic())
        client.async_stream_infer(self.model, inputs, **kwargs)
        while True:
            arrived, result, error = results.get(timeout=self.timeout_s)
            if error is not None:
                record.error = str(error)
                return record
            record.arrivals.append((arrived, int(result.as_numpy("num_output_tokens")[0])))
            if result.as_numpy("finish_reason")[0]:
                return record

    def close(self) -> None:
        for client, _ in self.streams:
            client.stop_stream()
            client.close()


class EngineTarget:
    def __init__(self, service, preprocessor, encoder, workload: Workload, timeout_s: float = 900.0):
        self.service, self.pre, self.encoder = service, preprocessor, encoder
        self.workload, self.timeout_s = workload, timeout_s
        self._pre_lock, self._vision_lock = threading.Lock(), threading.Lock()

    def send(self, c: int, i: int) -> RequestRecord:
        from spyre_backend.serving.llm_service import GenerateInputs

        record = RequestRecord(time.monotonic())
        with self._pre_lock:
            prompt = self.pre(self.workload.question(i), [self.workload.image(i)], apply_chat_template=True)
        with self._vision_lock:
            features = self.encoder.encode(torch.from_numpy(prompt.pixel_values), torch.from_numpy(prompt.image_sizes))
        done = threading.Event()

        def on_response(text, out):  # called on the engine thread, as granite_llm's sender is
            record.arrivals.append((time.monotonic(), out.num_output_tokens))
            if out.error:
                record.error = out.error
            if out.finished:
                done.set()

        inputs = GenerateInputs(input_ids=prompt.input_ids,
                                image_features=np.ascontiguousarray(features.float().numpy()), stream=True,
                                max_tokens=self.workload.max_tokens,
                                sampling_parameters=self.workload.sampling_parameters)
        self.service.submit(inputs, on_response)
        if not done.wait(self.timeout_s):
            record.error = f"no final response after {self.timeout_s:.0f} s"
        return record


class OpenAITarget:
    """Streaming ``/v1/chat/completions`` (the peer, ``vllm serve``): the same request ``i`` as the
    Triton targets (question, image as a data URI, greedy, ``min_tokens = max_tokens``), one HTTP
    connection per client. Token counts come from vLLM's per-chunk usage (``continuous_usage_stats``)."""

    def __init__(self, url: str, workload: Workload, model: str = "peer", timeout_s: float = 900.0):
        self.url, self.workload, self.model, self.timeout_s = url, workload, model, timeout_s

    def body(self, i: int) -> bytes:
        image = "data:image/png;base64," + base64.b64encode(self.workload.image(i)).decode()
        return json.dumps({
            "model": self.model, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                      {"type": "text", "text": self.workload.question(i)}]}],
            "max_tokens": self.workload.max_tokens, "temperature": 0,
            **({"min_tokens": self.workload.max_tokens} if self.workload.schema is None else
               {"response_format": {"type": "json_schema",
                                    "json_schema": {"name": "answer", "schema": self.workload.schema}}}),
        }).encode()

    def send(self, c: int, i: int) -> RequestRecord:
        def on_event(data: bytes, arrived: float, record: RequestRecord) -> bool:
            if data == b"[DONE]":
                return True
            chunk = json.loads(data)
            usage = chunk.get("usage") or {}
            if chunk.get("choices") and "completion_tokens" in usage:
                record.arrivals.append((arrived, int(usage["completion_tokens"])))
            return False

        return post_sse(self.url, "/v1/chat/completions", self.body(i), on_event, self.timeout_s)


class LlamaCppTarget(OpenAITarget):
    """The same requests to ``llama-server``: ``ignore_eos`` instead of vLLM's ``min_tokens``, and the
    cumulative token count from its per-chunk ``timings`` (``timings_per_token``). llama.cpp tiles
    images its own way, so the prompt's token count (its final ``usage``) is kept per request."""

    def __init__(self, url: str, workload: Workload, model: str = "peer", timeout_s: float = 900.0):
        super().__init__(url, workload, model, timeout_s)
        self.prompt_tokens: list[int] = []

    def body(self, i: int) -> bytes:
        body = json.loads(super().body(i))
        body.pop("min_tokens", None)
        body["stream_options"] = {"include_usage": True}
        body.update(ignore_eos=True, timings_per_token=True)
        return json.dumps(body).encode()

    def send(self, c: int, i: int) -> RequestRecord:
        def on_event(data: bytes, arrived: float, record: RequestRecord) -> bool:
            if data == b"[DONE]":
                return True
            chunk = json.loads(data)
            if chunk.get("usage"):
                self.prompt_tokens.append(int(chunk["usage"]["prompt_tokens"]))
            predicted = (chunk.get("timings") or {}).get("predicted_n")
            if chunk.get("choices") and predicted:
                record.arrivals.append((arrived, int(predicted)))
            return False

        return post_sse(self.url, "/v1/chat/completions", self.body(i), on_event, self.timeout_s)


def post_sse(url: str, path: str, body: bytes, on_event, timeout_s: float) -> RequestRecord:
    """POSTs ``body`` and reads server-sent events: ``on_event(data, arrival time, record)`` per
    ``data:`` line, True when the stream is done. One connection per request."""
    host, port = url.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout_s)
    record = RequestRecord(time.monotonic())
    try:
        conn.request("POST", path, body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            record.error = f"HTTP {response.status}: {response.read()[:500]!r}"
            return record
        for line in response:
            arrived = time.monotonic()
            if line.startswith(b"data: ") and on_event(line[6:].strip(), arrived, record):
                break
    finally:
        conn.close()
    return record
