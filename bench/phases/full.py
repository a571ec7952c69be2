"""The real size: the 2b-shaped checkpoint, ours against ``vllm serve`` and llama.cpp's ``llama-server``.

    python -m bench --checkpoints full                     # every server below, two rounds (hours)
    python -m bench --checkpoints full --full-servers ours-bf16,llama-f16 --full-rounds 1

One server at a time, in alternating rounds (every server once, then again), each started fresh:
its ready time and the peak resident memory of its process tree (loading included) are measured
too. Per server and round, per workload, per concurrency level: TTFT, ITL and tokens/s, every
request with an image of its own (no server sees an image twice: their caches stay out of it).
Workloads: a 384x288 image (1,364 prompt tokens here, in transformers and in vLLM) at concurrency
1 and 4, and a 576x768 page (2,990 tokens; the longest side Granite Vision 3.3's card advises) at 1.
llama.cpp tiles images its own way (775 prompt tokens for the 384x288 image): its prompt tokens are
reported beside ours, and TTFT per prompt token beside TTFT per request.

At concurrency 1, each server's phases against this machine's limits, measured at the start of the
run: the first token ((vision + prefill) FLOPs over the matmul rate, against TTFT) and a decode step
(weights and KV bytes over the memory bandwidth, against ITL p50).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import llama_cpp_peer, roofline, vllm_peer
from bench.loadgen import LlamaCppTarget, OpenAITarget, TritonTarget, closed_loop
from bench.phases import SERVER_ENV, our_server
from bench.process_memory import PeakMemory
from bench.stats import summarize, summary_metric
from bench.workload import Workload
from spyre_backend import PROJECT_ROOT

CHECKPOINT = PROJECT_ROOT / "results" / "checkpoints" / "granite-vision-3.2-2b"
ROUNDS = 2
MAX_TOKENS = 16
# name: (image size, concurrency levels); requests per level: REQUESTS[level]
WORKLOADS = {"image": ((384, 288), (1, 4)), "page": ((576, 768), (1,))}
REQUESTS = {1: 2, 4: 4}


@dataclass(frozen=True)
class Server:
    name: str
    kind: str  # ours | vllm | llama
    weights: str  # dtype (ours, vLLM) or GGUF weight type (llama.cpp)
    threads: int = 2
    weight_bytes: float = 2.0  # bytes per weight a decode step reads
    env: dict = field(default_factory=dict)


SERVERS = {s.name: s for s in [
    Server("ours-bf16", "ours", "bfloat16", env={"SPYRE_DTYPE": "bfloat16"}),
    Server("ours-fp32", "ours", "float32", weight_bytes=4.0, env={"SPYRE_DTYPE": "float32"}),
    Server("ours-int8", "ours", "bfloat16", weight_bytes=1.0, env={"SPYRE_DTYPE": "bfloat16",
                                                                    "SPYRE_QUANTIZATION": "int8"}),
    Server("vllm-fp32-t1", "vllm", "float32", threads=1, weight_bytes=4.0),
    Server("vllm-fp32-t2", "vllm", "float32", threads=2, weight_bytes=4.0),
    Server("vllm-bf16-t2", "vllm", "bfloat16", threads=2),
    Server("llama-f16", "llama", "f16"),
    Server("llama-q8_0", "llama", "q8_0", weight_bytes=34 / 32),  # 32 int8 weights + one f16 scale
]}


# -- one server's life ------------------------------------------------------------------------------
class _Running:
    """A started server of any kind: ``target(workload)`` sends requests to it, ``stop()`` ends it."""

    def __init__(self, server: Server, checkpoint: Path, out_dir: Path, rnd: int, slots: int, log):
        self.server, self.stop_fn, self.url = server, None, None
        self._process_of = lambda: None  # the server's Popen once it exists
        self.memory = PeakMemory(self._pid)
        log_path = out_dir / f"full-{server.name}-{rnd}.log"
        started = time.monotonic()
        try:
            if server.kind == "ours":
                self._start_ours(checkpoint, log_path)
            elif server.kind == "vllm":
                self._start_vllm(checkpoint, log_path, log)
            else:
                self._start_llama(checkpoint, log_path, slots, log)
        except BaseException:
            self.stop()
            raise
        self.ready_s = time.monotonic() - started

    def _pid(self) -> int | None:
        process = self._process_of()
        return None if process is None else process.pid

    def _start_ours(self, checkpoint: Path, log_path: Path) -> None:
        triton = our_server(checkpoint, log_path, {**SERVER_ENV, **self.server.env})
        self.stop_fn, self.url, self._process_of = triton.stop, triton.grpc_url, lambda: triton.process
        triton.start(timeout_s=1800)

    def _start_vllm(self, checkpoint: Path, log_path: Path, log) -> None:
        from spyre_backend.server.child_process import free_port

        vllm = vllm_peer.VllmServer(vllm_peer.ensure_installed(log), vllm_peer.servable_checkpoint(checkpoint),
                                    free_port(), self.server.threads, log_path, dtype=self.server.weights)
        self.stop_fn, self._process_of = vllm.stop, lambda: vllm.proc
        vllm.start(timeout_s=1800)
        self.url = vllm.url

    def _start_llama(self, checkpoint: Path, log_path: Path, slots: int, log) -> None:
        from spyre_backend.server.child_process import free_port

        llm, mmproj = llama_cpp_peer.ensure_converted(checkpoint, self.server.weights, log)
        llama = llama_cpp_peer.LlamaServer(llama_cpp_peer.ensure_built(log), llm, mmproj,
                                           checkpoint / "chat_template.jinja", free_port(), self.server.threads,
                                           slots, log_path)
        self.stop_fn, self._process_of = llama.stop, lambda: llama.proc
        llama.start()
        self.url = llama.url

    def target(self, workload: Workload, concurrency: int):
        if self.server.kind == "ours":
            return TritonTarget(self.url, workload, concurrency)
        return (LlamaCppTarget if self.server.kind == "llama" else OpenAITarget)(self.url, workload)

    def stop(self) -> float:
        if self.stop_fn is not None:
            self.stop_fn()
        return self.memory.stop()


def one_round(server: Server, checkpoint: Path, out_dir: Path, rnd: int, log, workloads: list[str]) -> dict:
    """Start ``server``, run the workloads and their levels on it, stop it."""
    slots = max(level for _, levels in WORKLOADS.values() for level in levels)
    running = _Running(server, checkpoint, out_dir, rnd, slots, log)
    out: dict = {"ready_s": running.ready_s, "workloads": {}}
    try:
        for number, name in enumerate(workloads):
            size, levels = WORKLOADS[name]
            workload = Workload(MAX_TOKENS, size)
            start = 0
            if number == 0:  # the first request of a fresh server pays for lazy work: not measured
                target = running.target(workload, 1)
                closed_loop(lambda c, i: target.send(c, 0), 1, 1)
                _close(target)
                start = 1
            out["workloads"][name] = {}
            for level in levels:
                n = REQUESTS[level]
                log(f"full round {rnd + 1}: {server.name}, {name} {size[0]}x{size[1]}, concurrency {level}, "
                    f"{n} requests")
                target = running.target(workload, level)
                try:
                    records = closed_loop(lambda c, i, s=start: target.send(c, s + i), n, level)
                finally:
                    _close(target)
                start += n
                summary = summarize(records)
                if isinstance(target, LlamaCppTarget) and target.prompt_tokens:
                    summary["prompt_tokens"] = target.prompt_tokens[-1]
                out["workloads"][name][level] = summary
    finally:
        out["peak_rss_gib"] = running.stop()
    return out


def _close(target) -> None:
    if hasattr(target, "close"):
        target.close()


# -- the phase ---------------------------------------------------------------------------------------
def run(machine: dict, out_dir: Path, log, servers: list[str] | None = None, rounds: int = ROUNDS,
        checkpoint: Path = CHECKPOINT, workloads: list[str] | None = None) -> dict:
    if not (checkpoint / "config.json").exists():
        from tools.tiny_checkpoint import random_checkpoint

        log(f"full: building the 2b-shaped random checkpoint in {checkpoint} (once)")
        random_checkpoint.build(random_checkpoint.parser().parse_args(
            ["--preset", "granite-vision-3.2-2b", "--out", str(checkpoint)]), log)
    names, workloads = servers or list(SERVERS), workloads or list(WORKLOADS)
    # ours as `make serve` runs it: the run's --compile and --cpu-gemm are for the other phases (at
    # this size the LLM's own default is eager: inductor's warmup of every shape would take an hour)
    run_wide = {k: os.environ.pop(k) for k in ("SPYRE_COMPILE_BACKEND", "SPYRE_CPU_GEMM") if k in os.environ}
    try:
        return _run(machine, out_dir, log, names, rounds, checkpoint, workloads)
    finally:
        os.environ.update(run_wide)


def _run(machine: dict, out_dir: Path, log, names: list[str], rounds: int, checkpoint: Path,
         workloads: list[str]) -> dict:
    # the machine's limits go in with the rounds, so a run stopped early can still be reported (main below)
    result: dict = {"checkpoint": str(checkpoint), "servers": names, "rounds": {n: [] for n in names},
                    "prompt_tokens": {}, "crops": {}, "failed": {}, "machine": machine}
    for name in workloads:
        size = WORKLOADS[name][0]
        result["prompt_tokens"][name], result["crops"][name] = _our_prompt(checkpoint, Workload(MAX_TOKENS, size))
    for rnd in range(rounds):
        for name in names:
            try:
                result["rounds"][name].append(one_round(SERVERS[name], checkpoint, out_dir, rnd, log, workloads))
            except Exception as exc:  # a peer that cannot start here is reported, not fatal to the run
                log(f"full: {name} failed in round {rnd + 1}: {exc!r}")
                result["failed"].setdefault(name, []).append(repr(exc))
            (out_dir / "full.json").write_text(json.dumps(result, indent=1, default=str))
    return with_table(result, machine)


def with_table(result: dict, machine: dict) -> dict:
    config = json.loads((Path(result["checkpoint"]) / "config.json").read_text())
    result["table"] = table(result, roofline.ModelShape.from_config(config), machine)
    return result


def _our_prompt(checkpoint: Path, workload: Workload) -> tuple[int, int]:
    """Prompt tokens and vision crops of the workload's request, by the HF processor (ours and vLLM's count)."""
    from spyre_backend.preprocess.processor import Preprocessor

    prompt = Preprocessor(str(checkpoint))(workload.question(0), [workload.image(0)], True)
    return len(prompt.input_ids), int(prompt.pixel_values.shape[1])


def table(result: dict, shape: roofline.ModelShape, machine: dict) -> list[dict]:
    """One row per (workload, level, server): each metric's rounds and best, per prompt token, and at
    concurrency 1 the fractions of the machine's limits."""
    peak, bandwidth = machine["matmul_gflops"] * 1e9, machine["bandwidth_gbs"] * 1e9
    rows = []
    for workload, (_, levels) in WORKLOADS.items():
        if workload not in result["prompt_tokens"]:
            continue
        for level in levels:
            for name in result["servers"]:
                rounds = [r["workloads"][workload][level] for r in result["rounds"][name]
                          if level in r["workloads"].get(workload, {})]
                if not rounds:
                    continue
                server = SERVERS[name]
                row = {"workload": workload, "level": level, "server": name,
                       "ready_s": [r["ready_s"] for r in result["rounds"][name]],
                       "peak_rss_gib": max(r["peak_rss_gib"] for r in result["rounds"][name]),
                       "prompt_tokens": rounds[0].get("prompt_tokens", result["prompt_tokens"][workload])}
                for metric in ("ttft_p50", "itl_p50", "tokens_per_s"):
                    values = [v for s in rounds if (v := summary_metric(s, metric)) is not None]
                    row[metric] = values
                    row[f"{metric}_best"] = (max if metric == "tokens_per_s" else min)(values) if values else None
                if row["ttft_p50_best"] is not None:
                    row["ttft_per_prompt_token_ms"] = row["ttft_p50_best"] / row["prompt_tokens"]
                if level == 1 and row["ttft_p50_best"] and row["itl_p50_best"]:
                    tokens, crops = result["prompt_tokens"][workload], result["crops"][workload]
                    if server.kind != "llama":  # llama.cpp's own tiling: its crops are not ours
                        first = roofline.vision_flops(shape, crops) + roofline.prefill_flops(shape, tokens)
                        row["first_token_of_compute_limit"] = first / peak / (row["ttft_p50_best"] / 1e3)
                    step_bytes = (server.weight_bytes * shape.text_weight_params
                                  + 2 * (tokens + MAX_TOKENS // 2) * shape.kv_bytes_per_token)
                    row["decode_of_bandwidth"] = step_bytes / bandwidth / (row["itl_p50_best"] / 1e3)
                rows.append(row)
    return rows


def markdown(result: dict) -> list[str]:
    def fmt(values, scale=1.0, digits=0):
        return ", ".join(f"{v * scale:.{digits}f}" for v in values) or "-"

    def frac(row, key):
        return f"{row[key]:.2f}" if key in row else "-"

    lines = ["", "The 2b shape (bench/phases/full.py): rounds alternate, values are the rounds' own; "
             "ours-* dtypes as named, vLLM t1/t2 = 1 or 2 model threads, llama.cpp 2 threads.", "",
             "| workload, c | server | ready s | prompt tokens | TTFT p50 s | ms / prompt token | ITL p50 ms | "
             "tok/s | peak GiB | first token / compute limit | decode / bandwidth |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["table"]:
        per_token = f"{row['ttft_per_prompt_token_ms']:.1f}" if "ttft_per_prompt_token_ms" in row else "-"
        lines.append(f"| {row['workload']}, {row['level']} | {row['server']} | {fmt(row['ready_s'])} | "
                     f"{row['prompt_tokens']} | {fmt(row['ttft_p50'], 1e-3, 1)} | {per_token} | "
                     f"{fmt(row['itl_p50'])} | {fmt(row['tokens_per_s'], digits=2)} | {row['peak_rss_gib']:.1f} | "
                     f"{frac(row, 'first_token_of_compute_limit')} | {frac(row, 'decode_of_bandwidth')} |")
    for name, errors in result.get("failed", {}).items():
        lines.append(f"\n{name} failed: {errors[0]}")
    return lines


# -- the targets -----------------------------------------------------------------------------
def targets(result: dict) -> list[dict]:
    best = {(r["workload"], r["level"], r["server"]): r for r in result["table"]}

    def value(server, metric, level=1):
        row = best.get(("image", level, server))
        return None if row is None else row[f"{metric}_best"]

    def best_of(kind, metric, level=1, exclude=("ours-int8",)):
        values = [value(s, metric, level) for s in SERVERS if s.startswith(kind) and s not in exclude]
        values = [v for v in values if v is not None]
        return None if not values else (max if metric == "tokens_per_s" else min)(values)

    checks = [
        ("ours-bf16 ITL p50, c=1 / llama.cpp f16's", value("ours-bf16", "itl_p50"), value("llama-f16", "itl_p50"),
         "<=", 0.9),
        ("ours-bf16 TTFT p50, c=1 / vLLM's best dtype", value("ours-bf16", "ttft_p50"), best_of("vllm", "ttft_p50"),
         "<=", 0.9),
        ("ours-bf16 tokens/s, c=4 / vLLM's best", value("ours-bf16", "tokens_per_s", 4),
         best_of("vllm", "tokens_per_s", 4), ">=", 1.2),
        ("ours-bf16 ITL p50, c=4 / vLLM's best", value("ours-bf16", "itl_p50", 4), best_of("vllm", "itl_p50", 4),
         "<=", 1.0),
        ("ours-int8 ITL p50, c=1 / llama.cpp q8_0's", value("ours-int8", "itl_p50"), value("llama-q8_0", "itl_p50"),
         "<=", 0.9),
    ]
    out = []
    for name, ours, peer, sense, goal in checks:
        if ours is None or peer is None:
            continue
        ratio = ours / peer
        out.append({"checkpoint": "full", "name": name, "target": f"{sense} {goal}", "value": ratio,
                    "met": ratio <= goal if sense == "<=" else ratio >= goal})
    return out


def main(argv=None) -> None:
    """The table and targets of a run's full.json, finished or stopped early (the rounds it has):
    ``python -m bench.phases.full results/bench-<time>/full.json``. The machine's limits are the
    run's own where full.json has them, else measured now."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__.split("\n")[0])
    p.add_argument("full_json", type=Path)
    args = p.parse_args(argv)
    result = json.loads(args.full_json.read_text())
    for rounds in result["rounds"].values():  # JSON made the concurrency levels strings
        for one in rounds:
            one["workloads"] = {w: {int(level): s for level, s in levels.items()} for w, levels in one["workloads"].items()}
    machine = result.get("machine") or roofline.measure_machine()
    result = with_table(result, machine)
    print("\n".join(markdown(result)))
    for check in targets(result):
        print(f"- {check['name']}: {check['value']:.2f} (target {check['target']}, {'met' if check['met'] else 'missed'})")


if __name__ == "__main__":
    main()
