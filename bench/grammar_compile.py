"""Grammar compile times of the structured-output test set's schemas on a checkpoint's tokenizer:
the first compile of each (a cache miss, on the compile thread) and a repeat (the cache, keyed by
the schema's canonical text), as the engine compiles them (``engine/structured_output.py``).

    .venv/bin/python -m bench.grammar_compile [--checkpoint DIR]
"""

from __future__ import annotations

import argparse
import json
import time


def compile_times(checkpoint: str) -> dict:
    """Per schema: first and cached compile in ms; and the tokenizer tables' build time."""
    from transformers import AutoTokenizer

    from spyre_backend.config import EngineLimits
    from spyre_backend.engine.sampling_params import SamplingParams
    from spyre_backend.engine.structured_output import StructuredOutputs
    from spyre_backend.models import get_spec
    from testkit.structured_cases import SCHEMAS

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    started = time.perf_counter()
    structured = StructuredOutputs(tokenizer, get_spec(checkpoint).text.vocab_size, EngineLimits())
    out = {"tokenizer_tables_ms": (time.perf_counter() - started) * 1e3, "schemas": {}}
    try:
        for name, schema in SCHEMAS.items():
            spec = SamplingParams(structured_outputs={"json": schema})
            spec.validate()
            times = []
            for _ in range(2):  # the first compiles, the second finds it cached
                started = time.perf_counter()
                structured.compile(spec.structured).result()
                times.append((time.perf_counter() - started) * 1e3)
            out["schemas"][name] = {"first_ms": round(times[0], 3), "cached_ms": round(times[1], 4)}
        out["num_compiles"] = structured.num_compiles
    finally:
        structured.shutdown()
    return out


def main(argv=None) -> None:
    from spyre_backend import DEFAULT_CHECKPOINT

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    args = p.parse_args(argv)
    out = compile_times(args.checkpoint)
    firsts = sorted(v["first_ms"] for v in out["schemas"].values())
    out["first_ms_median"] = firsts[len(firsts) // 2]
    out["first_ms_max"] = firsts[-1]
    print(json.dumps(out, indent=1), flush=True)


if __name__ == "__main__":
    main()
