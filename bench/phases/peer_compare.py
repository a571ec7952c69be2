"""Ours against ``vllm serve`` on the CPU, side by side in one run.

One server at a time, in alternating rounds: ours (tritonserver, ``granite_vision``), then vLLM
with 1 model thread, then vLLM with 2; then the same again. Every request has an image of its own
within a server's life (vLLM caches prefixes and multimodal inputs by default, and a repeated image
would measure that instead). Ratios compare each side's best round (vLLM: its better thread
setting); the spread between rounds is the run's noise.
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
VLLM_THREADS = (1, 2)
# where the issue sets targets: (concurrency, metric, "max"|"min" is better, goal ratio ours/vLLM)
TARGETS = {
    "tiny": [(16, "tokens_per_s", 1.3), (16, "ttft_p50", 0.5), (1, "tokens_per_s", 1.5)],
    "mid": [(8, "tokens_per_s", 1.15), (1, "ttft_p50", 0.9), (1, "itl_p50", 0.85)],
}


def _levels_of(name: str) -> list[int]:
    return sorted({level for level, _, _ in TARGETS[name]})


def _load(send, levels: list[int], requests_of, log, label: str) -> dict:
    """Every level on one server; request indexes never repeat within it (no image twice)."""
    closed_loop(lambda c, i: send(c, 0), 1, 1)  # warm: first connection, first request
    out, start = {}, 1
    for level in levels:
        n = requests_of(level)
        log(f"{label}: concurrency {level}, {n} requests")
        out[level] = summarize(closed_loop(lambda c, i, s=start: send(c, s + i), n, level))
        start += n
    return out


def run(name: str, checkpoint: Path, workload: Workload, requests_of, out_dir: Path, log,
        server_env: dict | None = None) -> dict:
    from spyre_backend.server.child_process import free_port

    levels = _levels_of(name)
    exe = vllm_peer.ensure_installed(log)
    peer_checkpoint = vllm_peer.servable_checkpoint(checkpoint)
    result: dict = {"levels": levels, "peer_checkpoint": str(peer_checkpoint), "ours": [],
                    **{f"vllm_t{t}": [] for t in VLLM_THREADS}, "start_s": {}}
    for rnd in range(ROUNDS):
        server = our_server(checkpoint, out_dir / f"peer-ours-{rnd}.log", server_env)
        started = time.monotonic()
        server.start(timeout_s=1200)
        result["start_s"].setdefault("ours", []).append(time.monotonic() - started)
        target = TritonTarget(server.grpc_url, workload, max(levels))
        try:
            round_out = _load(target.send, levels, requests_of, log, f"peer round {rnd + 1}: ours")
        finally:
            target.close()
            server.stop()
        result["ours"].append(round_out)
        for threads in VLLM_THREADS:
            vllm = vllm_peer.VllmServer(exe, peer_checkpoint, free_port(), threads,
                                        out_dir / f"peer-vllm-t{threads}-{rnd}.log")
            result["start_s"].setdefault(f"vllm_t{threads}", []).append(vllm.start())
            try:
                target = OpenAITarget(vllm.url, workload)
                result[f"vllm_t{threads}"].append(
                    _load(target.send, levels, requests_of, log, f"peer round {rnd + 1}: vLLM {threads} thread(s)"))
            finally:
                vllm.stop()
    result["comparison"] = compare(result, levels)
    return result


def compare(result: dict, levels: list[int]) -> dict:
    """Per level and metric: each side's rounds, its best, and the ratio ours / vLLM of the bests."""
    out = {}
    for level in levels:
        for metric in ("tokens_per_s", "ttft_p50", "itl_p50"):
            better = max if metric == "tokens_per_s" else min
            ours = [v for r in result["ours"] if (v := summary_metric(r.get(level), metric)) is not None]
            peer = {f"t{t}": [v for r in result[f"vllm_t{t}"] if (v := summary_metric(r.get(level), metric)) is not None]
                    for t in VLLM_THREADS}
            peer_best = [better(v) for v in peer.values() if v]
            if not ours or not peer_best:
                continue
            out[f"c={level} {metric}"] = {"ours": ours, "vllm": peer, "ours_best": better(ours),
                                          "vllm_best": better(peer_best), "ratio": better(ours) / better(peer_best)}
    return out


def targets(name: str, comparison: dict) -> list[dict]:
    out = []
    for level, metric, goal in TARGETS.get(name, []):
        row = comparison.get(f"c={level} {metric}")
        if row is None:
            continue
        higher = metric == "tokens_per_s"
        met = row["ratio"] >= goal if higher else row["ratio"] <= goal
        out.append({"checkpoint": name, "name": f"vs vLLM CPU: c={level} {metric} (ours / vLLM)",
                    "target": f"{'>=' if higher else '<='} {goal}", "value": row["ratio"], "met": met})
    return out


def markdown(comparison: dict) -> list[str]:
    lines = ["", "Side by side with vLLM CPU (rounds alternate; best of each side; vLLM t1/t2 = 1 or 2 model threads):",
             "", "| level, metric | ours (rounds) | vLLM t1 (rounds) | vLLM t2 (rounds) | ours / vLLM (bests) |",
             "|---|---|---|---|---|"]
    for key, row in comparison.items():
        fmt = lambda vs: ", ".join(f"{v:.1f}" for v in vs)  # noqa: E731
        lines.append(f"| {key} | {fmt(row['ours'])} | {fmt(row['vllm'].get('t1', []))} | "
                     f"{fmt(row['vllm'].get('t2', []))} | {row['ratio']:.2f} |")
    return lines
