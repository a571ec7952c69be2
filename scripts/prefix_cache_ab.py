"""A/B of prefix caching on requests with an image each, in one process.

    .venv/bin/python -m scripts.prefix_cache_ab [--checkpoint DIR] [--concurrency 16] [--requests 64] [--rounds 3]

One LLMService with the server's settings; rounds alternate between prefix caching on and off
(the scheduler's block hasher set or removed), so machine noise hits both alike. What caching
costs requests that share no image: hashing their blocks (token ids and image features) at
admission and registering them as they fill (only a leading block of the chat template's text can
hit).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from bench.loadgen import EngineTarget, closed_loop
from bench.main import serving_config
from bench.stats import summarize
from bench.workload import Workload
from spyre_backend import DEFAULT_CHECKPOINT


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args(argv)

    from spyre_backend.preprocess.processor import Preprocessor
    from spyre_backend.serving.llm_service import LLMService
    from spyre_backend.vision.encoder import VisionEncoder

    checkpoint = Path(args.checkpoint)
    service = LLMService(serving_config("granite_llm", checkpoint))
    encoder = VisionEncoder(str(checkpoint), serving_config("vision_encoder", checkpoint).device.plan(str(checkpoint)))
    target = EngineTarget(service, Preprocessor(str(checkpoint)), encoder, Workload(args.max_tokens))
    scheduler = service.engine.scheduler
    hasher = scheduler.hasher
    closed_loop(target.send, 1, 1)
    service.seal_compiled()
    results: dict[str, list[float]] = {"on": [], "off": []}
    offset = 1
    try:
        for _ in range(args.rounds):
            for mode in ("on", "off"):
                scheduler.hasher = hasher if mode == "on" else None
                records = closed_loop(lambda c, i, s=offset: target.send(c, s + i), args.requests, args.concurrency)
                offset += args.requests
                tokens_per_s = summarize(records)["tokens_per_s"]
                results[mode].append(tokens_per_s)
                print(f"prefix caching {mode:3s}: {tokens_per_s:8.1f} tokens/s", flush=True)
        hits = scheduler.prefix_hits
        on, off = statistics.median(results["on"]), statistics.median(results["off"])
        print(f"median on / off: {on / off:.3f} (hit tokens over the run: {hits})")
    finally:
        service.seal_compiled(False)
        service.shutdown()


if __name__ == "__main__":
    main()
