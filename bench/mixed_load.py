"""Concurrent long prompts through the engine alone (no Triton, no vision): N requests of P prompt
tokens arrive at once and each generates M tokens, so every stream decodes while the others'
prompts are prefilled. Reports TTFT, each stream's mean time per output token (ITL), the gaps
between its responses, and tokens/s, for one configuration per process:

    .venv/bin/python -m bench.mixed_load --checkpoint results/checkpoints/granite-vision-3.2-2b \\
        --requests 4 --prompt 1364 --new 16 --set mixed_prefill_chunk=128
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="a serving parameter (config.py), e.g. mixed_prefill_chunk=128; repeatable")
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--prompt", type=int, default=1364, help="prompt tokens per request")
    p.add_argument("--new", type=int, default=16, help="tokens each request generates")
    args = p.parse_args(argv)

    import torch

    from spyre_backend.config import ServingConfig
    from spyre_backend.engine.request import Request
    from spyre_backend.engine.sampling_params import SamplingParams
    from spyre_backend.serving.llm_service import LLMService

    params = dict(item.split("=", 1) for item in args.set)
    raw = {"checkpoint": args.checkpoint, "compile_backend": "eager", "enable_prefix_caching": "false",
           "max_context": str(max(2048, args.prompt + args.new + 64)), **params}
    service = LLMService(ServingConfig.from_strings(raw), warmup=False)
    vocabulary = service.tokenizer.vocab_size
    generator = torch.Generator().manual_seed(0)
    token_times: list[list[float]] = [[] for _ in range(args.requests)]
    per_token: list[float] = []  # each request's mean gap between tokens (RequestTiming)
    finished = threading.Semaphore(0)

    def on_output(i):
        def record(out):
            now = time.monotonic()
            token_times[i].extend([now] * (out.num_output_tokens - len(token_times[i])))
            if out.finished:
                per_token.append(out.timing.time_per_output_token)
                finished.release()
        return record

    sampling = SamplingParams(max_tokens=args.new, min_tokens=args.new, ignore_eos=True)
    started = time.monotonic()
    for i in range(args.requests):
        prompt = torch.randint(100, vocabulary - 100, (args.prompt,), generator=generator)
        service.engine.add_request(Request(prompt, None, sampling, on_output(i)))
    for _ in range(args.requests):
        finished.acquire()
    wall = time.monotonic() - started
    ttft = sorted(times[0] - started for times in token_times)
    # gaps between responses; tokens that came out in one response (text held back) count once
    gaps = sorted(b - a for times in token_times for a, b in zip(times, times[1:]) if b > a) or [0.0]
    out = {"parameters": params, "requests": args.requests, "prompt": args.prompt, "new": args.new,
           "wall_s": round(wall, 2), "tokens_per_s": round(args.requests * args.new / wall, 2),
           "ttft_p50_s": round(statistics.median(ttft), 2), "ttft_max_s": round(ttft[-1], 2),
           "itl_mean_p50_ms": round(statistics.median(per_token) * 1e3, 1),
           "gap_p50_ms": round(statistics.median(gaps) * 1e3, 1),
           "gap_p90_ms": round(gaps[int(0.9 * (len(gaps) - 1))] * 1e3, 1), "gap_max_ms": round(gaps[-1] * 1e3, 1)}
    print(json.dumps(out), flush=True)
    service.shutdown()


if __name__ == "__main__":
    main()
