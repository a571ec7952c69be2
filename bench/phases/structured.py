"""Structured output's cost: the same image requests with and without a JSON schema, ours and
``vllm serve`` (given the same schema as OpenAI's ``response_format``), side by side.

One server at a time, two alternating rounds (ours, then vLLM with 1 model thread: the better
setting for the tiny model, 2 for the mid-size one); on each server the plain requests, then the
same number with the schema, at the checkpoint's level (tiny 16 streams, mid-size 8), every request
with an image of its own. The grammar's overhead is ITL p50 with the schema over ITL p50 without,
minus one, on each side; the ratio to vLLM is taken with and without the schema. Compile times of
the test set's schemas (first and cached) come from ``bench.grammar_compile``.
"""

from __future__ import annotations

import time
from pathlib import Path

from bench import vllm_peer
from bench.loadgen import OpenAITarget, TritonTarget, closed_loop
from bench.phases import our_server
from bench.stats import summarize, summary_metric
from bench.workload import Workload

ROUNDS = 2
# checkpoint: (streams, requests per mode, vLLM model threads, overhead target as a fraction of ITL p50)
LEVELS = {"tiny": (16, 32, 1, 0.05), "mid": (8, 8, 2, 0.03)}
# an answer that must say something (minLength) in bounded room: every request decodes for a while
SCHEMA = {"type": "object", "properties": {
    "shape": {"type": "string", "enum": ["circle", "square", "triangle", "star"]},
    "caption": {"type": "string", "minLength": 40, "maxLength": 160},
    "colors": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 3},
}, "required": ["shape", "caption", "colors"], "additionalProperties": False}


def _modes(workload: Workload) -> dict[str, Workload]:
    return {"plain": workload, "schema": Workload(workload.max_tokens, workload.image_size, SCHEMA)}


def _on_one_server(target_of, level: int, n: int, workload: Workload, log, label: str) -> dict:
    """Plain, then schema, on one server's life; request indexes never repeat (no image twice)."""
    warm = target_of(workload, 1)
    closed_loop(lambda c, i: warm.send(c, 0), 1, 1)
    getattr(warm, "close", lambda: None)()
    out, start = {}, 1
    for mode, w in _modes(workload).items():
        log(f"{label}: {mode}, {n} requests at {level} streams")
        target = target_of(w, level)
        try:
            out[mode] = summarize(closed_loop(lambda c, i, s=start: target.send(c, s + i), n, level))
        finally:
            getattr(target, "close", lambda: None)()
        start += n
    return out


def run(name: str, checkpoint: Path, workload: Workload, out_dir: Path, log, server_env: dict | None = None) -> dict:
    from bench.grammar_compile import compile_times
    from spyre_backend.server.child_process import free_port

    level, n, threads, _ = LEVELS[name]
    exe = vllm_peer.ensure_installed(log)
    peer_checkpoint = vllm_peer.servable_checkpoint(checkpoint)
    result: dict = {"level": level, "requests": n, "vllm_threads": threads, "ours": [], "vllm": []}
    for rnd in range(ROUNDS):
        server = our_server(checkpoint, out_dir / f"structured-ours-{rnd}.log", server_env)
        server.start(timeout_s=1200)
        try:
            result["ours"].append(_on_one_server(lambda w, c: TritonTarget(server.grpc_url, w, c), level, n, workload,
                                                 log, f"structured round {rnd + 1}: ours"))
        finally:
            server.stop()
        vllm = vllm_peer.VllmServer(exe, peer_checkpoint, free_port(), threads,
                                    out_dir / f"structured-vllm-{rnd}.log")
        vllm.start()
        try:
            result["vllm"].append(_on_one_server(lambda w, c: OpenAITarget(vllm.url, w), level, n, workload, log,
                                                 f"structured round {rnd + 1}: vLLM"))
        finally:
            vllm.stop()
    result["summary"] = summary(result)
    started = time.monotonic()
    result["compile"] = compile_times(str(checkpoint))
    result["compile"]["wall_s"] = time.monotonic() - started
    return result


def _best(rounds: list[dict], mode: str, metric: str) -> float | None:
    values = [v for r in rounds if (v := summary_metric(r.get(mode), metric)) is not None]
    return None if not values else (max if metric == "tokens_per_s" else min)(values)


def summary(result: dict) -> dict:
    """Each side's best round per mode; overheads and ratios to vLLM from those."""
    out: dict = {}
    for side in ("ours", "vllm"):
        for mode in ("plain", "schema"):
            for metric in ("itl_p50", "ttft_p50", "tokens_per_s"):
                out[f"{side} {mode} {metric}"] = _best(result[side], mode, metric)
    for side in ("ours", "vllm"):
        plain, schema = out[f"{side} plain itl_p50"], out[f"{side} schema itl_p50"]
        if plain and schema:
            out[f"{side} grammar overhead (ITL p50)"] = schema / plain - 1
    for mode in ("plain", "schema"):
        ours, peer = out[f"ours {mode} itl_p50"], out[f"vllm {mode} itl_p50"]
        if ours and peer:
            out[f"ours / vLLM ITL p50, {mode}"] = ours / peer
    return out


def targets(name: str, result: dict) -> list[dict]:
    s, goal = result["summary"], LEVELS[name][3]
    out = []
    overhead = s.get("ours grammar overhead (ITL p50)")
    if overhead is not None:
        out.append({"checkpoint": name, "name": f"structured: grammar overhead on ITL p50 at {result['level']} streams",
                    "target": f"<= {goal}", "value": overhead, "met": overhead <= goal})
    plain, schema = s.get("ours / vLLM ITL p50, plain"), s.get("ours / vLLM ITL p50, schema")
    if plain and schema:
        out.append({"checkpoint": name, "name": "structured: ours / vLLM ITL p50 with a schema, over without",
                    "target": "<= 1.0", "value": schema / plain, "met": schema <= plain})
    return out


def markdown(result: dict) -> list[str]:
    def fmt(side, mode, metric):
        values = [summary_metric(r.get(mode), metric) for r in result[side]]
        return ", ".join(f"{v:.1f}" for v in values if v is not None) or "-"

    lines = ["", f"Structured output (a JSON schema, {result['level']} streams, {result['requests']} requests per "
                 f"mode; rounds alternate, each round shown):", "",
             "| side, mode | ITL p50 ms | TTFT p50 ms | tokens/s |", "|---|---|---|---|"]
    for side in ("ours", "vllm"):
        for mode in ("plain", "schema"):
            lines.append(f"| {side}, {mode} | {fmt(side, mode, 'itl_p50')} | {fmt(side, mode, 'ttft_p50')} | "
                         f"{fmt(side, mode, 'tokens_per_s')} |")
    for key, value in result["summary"].items():
        if ("overhead" in key or "/" in key) and value is not None:
            lines.append(f"\n{key}: {value:.3f}")
    compile_ = result.get("compile", {})
    if compile_.get("schemas"):
        firsts = sorted(v["first_ms"] for v in compile_["schemas"].values())
        cached = sorted(v["cached_ms"] for v in compile_["schemas"].values())
        lines.append(f"\nGrammar compiles of the test set's {len(firsts)} schemas: first median "
                     f"{firsts[len(firsts) // 2]:.2f} ms, max {firsts[-1]:.2f} ms; cached median "
                     f"{cached[len(cached) // 2]:.4f} ms (tokenizer tables {compile_['tokenizer_tables_ms']:.0f} ms).")
    return lines
