"""Single engine steps of one configuration, timed on the idle engine (``engine.probe``): decode at
batch 1 and 4, one prefill chunk, with load time and memory. One configuration per process, so
each starts from a clean heap; alternate configurations over rounds to see the noise.

    .venv/bin/python -m bench.step_times --checkpoint results/checkpoints/granite-vision-3.2-2b \\
        --set dtype=bfloat16 --set cpu_gemm=mkl
"""

from __future__ import annotations

import argparse
import json
import time


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="a serving parameter (config.py), e.g. dtype=bfloat16; repeatable")
    p.add_argument("--context", type=int, default=1400, help="the decode rows' position")
    p.add_argument("--prefill", type=int, default=512, help="tokens of the timed prefill")
    args = p.parse_args(argv)

    from spyre_backend.config import ServingConfig
    from spyre_backend.device import memory
    from spyre_backend.serving.llm_service import LLMService

    params = dict(item.split("=", 1) for item in args.set)
    raw = {"checkpoint": args.checkpoint, "compile_backend": "eager",
           "max_context": str(max(2048, args.context + 64)), **params}
    started = time.monotonic()
    service = LLMService(ServingConfig.from_strings(raw), warmup=False)
    loaded = time.monotonic() - started
    probe = service.engine.probe
    resident, peak = memory.resident_bytes()
    out = {"parameters": params, "load_s": round(loaded, 1), "weights_gib": round(probe.weight_bytes / 2**30, 2),
           "kv_gib": round(probe.kv_pool_bytes / 2**30, 2), "resident_gib": round(resident / 2**30, 2),
           "peak_gib": round(peak / 2**30, 2), "layers_prepared": probe.layers_prepared}
    for batch in (1, 4):
        out[f"decode_b{batch}_ms"] = round(probe.time_decode(batch, args.context) * 1e3, 1)
    out["decode_b1_weights_gbps"] = round(probe.weight_bytes / 1e9 / (out["decode_b1_ms"] / 1e3), 1)
    out[f"prefill_{args.prefill}_s"] = round(probe.time_prefill(args.prefill, repeats=1), 3)
    print(json.dumps(out), flush=True)
    service.shutdown()


if __name__ == "__main__":
    main()
