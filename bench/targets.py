"""What the run is held to: the ratios between paths of one checkpoint, and the issue's targets."""

from __future__ import annotations


def ratios(ck: dict, levels: list[int]) -> dict:
    lo, hi = min(levels), max(levels)
    out = {}

    def get(path, level, *keys):
        value = ck.get(path, {}).get(level, {})
        for key in keys:
            value = value.get(key, {}) if isinstance(value, dict) else {}
        return value if isinstance(value, (int, float)) else None

    itl_t, itl_e = get("triton", lo, "itl_ms", "mean"), get("engine", lo, "itl_ms", "mean")
    if itl_t is not None and itl_e is not None:
        out[f"Triton overhead per token, ms (mean ITL, Triton - engine, c={lo})"] = itl_t - itl_e
    for level in levels:
        tt, te = get("triton", level, "tokens_per_s"), get("engine", level, "tokens_per_s")
        if tt and te:
            out[f"Triton overhead per token, ms (1/throughput, Triton - engine, c={level})"] = 1e3 / tt - 1e3 / te
    for path in ("triton", "engine", "perf_analyzer"):
        a, b = get(path, hi, "tokens_per_s"), get(path, lo, "tokens_per_s")
        if a and b:
            out[f"batching gain {path} (tokens/s c={hi} / c={lo})"] = a / b
    hf = ck.get("transformers", {}).get("tokens_per_s")
    for level in (lo, hi):
        tt = get("triton", level, "tokens_per_s")
        if hf and tt:
            out[f"speed-up over transformers (Triton c={level} / transformers serial, tokens/s)"] = tt / hf
    return out


# The issue sets the serving targets for the tiny checkpoint (where the serving path, not the
# matmuls, is what is measured) and the roofline targets for the mid-size one.
SERVING_TARGETS_FOR = ("tiny",)


def targets(name: str, ck: dict, levels: list[int]) -> list[dict]:
    lo, hi = min(levels), max(levels)
    serving = name in SERVING_TARGETS_FOR
    r = ck.get("ratios", {}) if serving else {}
    wanted = [(f"Triton overhead per token, ms (mean ITL, Triton - engine, c={lo})", "<= 1 ms", lambda v: v <= 1.0),
              (f"batching gain triton (tokens/s c={hi} / c={lo})", ">= 6x", lambda v: v >= 6.0),
              (f"speed-up over transformers (Triton c={hi} / transformers serial, tokens/s)", ">= 10x",
               lambda v: v >= 10.0)]
    out = [{"checkpoint": name, "name": key, "target": goal, "value": r[key], "met": ok(r[key])}
           for key, goal, ok in wanted if key in r]
    if "session" in ck and serving:
        value = ck["session"]["ratio"]
        out.append({"checkpoint": name, "name": "session second-turn TTFT vs fresh whole conversation (p50 ratio)",
                    "target": ">= 5x", "value": value, "met": value >= 5.0})
    roof = ck.get("roofline") or {}
    for phase in ("prefill", "vision"):
        if phase in roof:
            value = roof[phase]["fraction"]
            out.append({"checkpoint": name, "name": f"{phase} fraction of roofline", "target": ">= 0.7",
                        "value": value, "met": value >= 0.7})
    return out
