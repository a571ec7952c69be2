"""A session's second turn vs a fresh request carrying the whole conversation and the image.

The second turn of a session prefills only its own tokens on top of the kept KV cache; a client
without sessions resends the conversation and the image, which preprocessing, the vision encoder
and a full prefill then redo. Time to first token of each, one request at a time.
"""

from __future__ import annotations

import queue
import statistics
import time

import tritonclient.grpc as grpcclient

from bench.workload import Workload
from testkit.streaming import to_grpc_inputs

TURN_1 = "<|user|>\n<image>\n{question}\n<|assistant|>\n"
TURN_2 = "\n<|user|>\nWhat color is the background?\n<|assistant|>\n"
FIRST_SESSION_ID = 770_000  # far from the ids perf_analyzer and the load generator use


class TritonStream:
    """One gRPC stream kept open for every request, as a chat client keeps its connection: the
    connection's setup is not part of any request's time to first token."""

    def __init__(self, url: str):
        self.arrivals: queue.Queue = queue.Queue()
        self.client = grpcclient.InferenceServerClient(url)
        self.client.start_stream(callback=lambda result, error: self.arrivals.put((time.perf_counter(), result, error)))

    def first_token_ms(self, inputs: dict, **sequence) -> tuple[float, str]:
        """Time to the first response with text, and the whole answer."""
        sent = time.perf_counter()
        self.client.async_stream_infer("granite_vision", to_grpc_inputs(inputs), **sequence)
        first, pieces = None, []
        while True:
            at, result, error = self.arrivals.get(timeout=1200)
            if error is not None:
                raise RuntimeError(f"session benchmark request failed: {error}")
            text = result.as_numpy("text_output")[0].decode()
            if text and first is None:
                first = at
            pieces.append(text)
            if result.as_numpy("finish_reason")[0]:
                return ((first or at) - sent) * 1000, "".join(pieces)

    def close(self) -> None:
        self.client.stop_stream()
        self.client.close()


def measure(url: str, workload: Workload, repeats: int = 8) -> dict:
    second, fresh = [], []
    stream = TritonStream(url)
    try:
        stream.first_token_ms({"text_input": "Hello", "max_tokens": 1, "stream": True})  # connect
        for i in range(repeats):
            image = [workload.image(i)]
            turn_1 = TURN_1.format(question=workload.question(i))
            plain = {"max_tokens": workload.max_tokens, "stream": True}
            sid = FIRST_SESSION_ID + i
            _, answer = stream.first_token_ms({"text_input": turn_1, "image": image, **plain},
                                              sequence_id=sid, sequence_start=True)
            ms, _ = stream.first_token_ms({"text_input": TURN_2, **plain}, sequence_id=sid, sequence_end=True)
            second.append(ms)
            ms, _ = stream.first_token_ms({"text_input": turn_1 + answer + TURN_2, "image": image, **plain})
            fresh.append(ms)
    finally:
        stream.close()
    return {"second_turn_ttft_ms": second, "fresh_ttft_ms": fresh,
            "ratio": statistics.median(fresh) / statistics.median(second)}
