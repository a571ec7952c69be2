"""Latency of a repeated image request, with the vision encoder's cache on and off.

For each server setting (``encoder_cache_mb`` 256, then 0) it starts a fresh server, then sends
``--repeats`` new images twice each, one request at a time, and reports for the second (repeated)
request: time to first streamed response and to the last one (client side), and the
vision_encoder's compute time for it (Triton's nv_inference_compute_infer_duration_us).

    .venv/bin/python scripts/encoder_cache_latency.py --repeats 5
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import sys
import time
from pathlib import Path

import tritonclient.grpc as grpcclient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spyre_backend.server.launcher import ServerOptions, TritonServer, free_port  # noqa: E402
from testkit.images import shape_png  # noqa: E402
from testkit.metrics import read_metrics  # noqa: E402
from testkit.streaming import to_grpc_inputs  # noqa: E402

ENCODER_US = 'nv_inference_compute_infer_duration_us{model="vision_encoder",version="1"}'
SHAPES = ["circle", "square", "triangle"]
COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]


def timed_request(url: str, image: bytes, max_tokens: int) -> tuple[float, float, str]:
    """(seconds to the first response, seconds to the last, text)."""
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: results.put((time.perf_counter(), result, error)))
    inputs = {"text_input": "What is in the image?", "apply_chat_template": True, "image": [image],
              "max_tokens": max_tokens, "stream": True}
    try:
        started = time.perf_counter()
        client.async_stream_infer("granite_vision", to_grpc_inputs(inputs))
        first, pieces = None, []
        while True:
            at, result, error = results.get(timeout=300)
            if error is not None:
                raise RuntimeError(str(error))
            first = first or at
            pieces.append(result.as_numpy("text_output")[0].decode())
            if result.as_numpy("finish_reason")[0]:
                return first - started, at - started, "".join(pieces)
    finally:
        client.stop_stream()
        client.close()


def measure(cache_mb: int, repeats: int, max_tokens: int, size: tuple[int, int]) -> dict:
    options = ServerOptions(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                            extra_env={"SPYRE_ENCODER_CACHE_MB": str(cache_mb)})
    log_path = ROOT / ".triton" / f"encoder-cache-latency-{cache_mb}.log"
    log_path.parent.mkdir(exist_ok=True)
    server = TritonServer(options, log_path=log_path).start()
    try:
        timed_request(server.grpc_url, shape_png("circle", "white", "black", size), max_tokens)  # settle
        ttft, e2e, encoder_ms, texts = [], [], [], []
        for i in range(repeats):
            image = shape_png(SHAPES[i % 3], COLORS[i % 6], COLORS[(i + 1) % 6], (size[0] + i, size[1]))
            first = timed_request(server.grpc_url, image, max_tokens)
            before = read_metrics(server.metrics_url).get(ENCODER_US, 0.0)
            second = timed_request(server.grpc_url, image, max_tokens)
            encoder_ms.append((read_metrics(server.metrics_url).get(ENCODER_US, 0.0) - before) / 1000)
            ttft.append(second[0] * 1000)
            e2e.append(second[1] * 1000)
            texts.append(first[2] == second[2])
        return {"encoder_cache_mb": cache_mb, "repeats": repeats, "image_size": size,
                "repeat_ttft_ms": [round(x, 1) for x in ttft], "repeat_ttft_ms_median": round(statistics.median(ttft), 1),
                "repeat_e2e_ms_median": round(statistics.median(e2e), 1),
                "repeat_vision_encoder_ms_median": round(statistics.median(encoder_ms), 2),
                "same_text_both_times": all(texts)}
    finally:
        server.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--width", type=int, default=300)
    p.add_argument("--height", type=int, default=200)
    a = p.parse_args()
    for cache_mb in (256, 0):
        print(json.dumps(measure(cache_mb, a.repeats, a.max_tokens, (a.width, a.height))), flush=True)


if __name__ == "__main__":
    main()
