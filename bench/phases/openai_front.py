"""What the OpenAI front costs: the same load through Triton's HTTP ``generate_stream`` and through
``/v1/chat/completions`` on the front beside it, on one server, in alternating rounds; then NVIDIA's
``aiperf`` against the front (images as data URIs), as a benchmark tool of its own would see it.

Every request has an image of its own within the server's life (no encoder or prefix cache hits).
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

from bench.loadgen import OpenAITarget, closed_loop, post_sse
from bench.phases import our_server
from bench.stats import RequestRecord, summarize, summary_metric
from bench.workload import IMAGE_SIZE, Workload
from spyre_backend import PROJECT_ROOT

ROUNDS = 3
LEVELS = (1, 16)
AIPERF_VERSION = "0.13.0"
AIPERF_VENV = PROJECT_ROOT / "results" / "peer" / "aiperf-venv"
# the front's cost at concurrency 16, against generate_stream in the same run
TARGETS = [(16, "tokens_per_s", "ratio", 0.9), (16, "ttft_p50", "difference_ms", 2.0)]


class GenerateStreamTarget:
    """Triton's HTTP ``generate_stream`` on ``granite_vision`` (server-sent events), the same
    request ``i`` as every other path: one connection per request, as curl or aiperf would."""

    def __init__(self, http_url: str, workload: Workload, timeout_s: float = 900.0):
        self.url, self.workload, self.timeout_s = http_url, workload, timeout_s

    def body(self, i: int) -> bytes:
        w = self.workload
        return json.dumps({"text_input": w.question(i), "image": [base64.b64encode(w.image(i)).decode()],
                           "apply_chat_template": True, "max_tokens": w.max_tokens, "stream": True,
                           "sampling_parameters": w.sampling_parameters}).encode()

    def send(self, c: int, i: int) -> RequestRecord:
        def on_event(data: bytes, arrived: float, record: RequestRecord) -> bool:
            event = json.loads(data)
            if "error" in event:
                record.error = event["error"]
                return True
            record.arrivals.append((arrived, int(event["num_output_tokens"])))
            return bool(event.get("finish_reason"))

        return post_sse(self.url, "/v2/models/granite_vision/generate_stream", self.body(i), on_event,
                        self.timeout_s)


def run(checkpoint: Path, workload: Workload, requests_of, out_dir: Path, log, server_env: dict | None = None,
        with_aiperf: bool = True) -> dict:
    from spyre_backend.server.child_process import free_port
    from spyre_backend.server.openai_front import OpenAIFront

    server = our_server(checkpoint, out_dir / "openai-triton.log", server_env).start(timeout_s=1200)
    front = OpenAIFront(server, free_port(), log_path=out_dir / "openai-front.log").start()
    model = Path(checkpoint).resolve().name
    targets = {"generate_stream": GenerateStreamTarget(server.http_url, workload),
               "openai": OpenAITarget(front.url.removeprefix("http://"), workload, model=model)}
    result: dict = {"levels": list(LEVELS), "rounds": {name: [] for name in targets}}
    start = 0
    try:
        for name, target in targets.items():  # warm both paths: first connection, first request
            closed_loop(lambda c, i, t=target, s=start: t.send(c, s + i), 1, 1)
            start += 1
        for rnd in range(ROUNDS):
            for name, target in targets.items():
                round_out = {}
                for level in LEVELS:
                    n = requests_of(level)
                    log(f"openai round {rnd + 1}: {name}, concurrency {level}, {n} requests")
                    round_out[level] = summarize(closed_loop(lambda c, i, t=target, s=start: t.send(c, s + i),
                                                             n, level))
                    start += n
                result["rounds"][name].append(round_out)
        if with_aiperf:
            result["aiperf"] = run_aiperf(front.url, checkpoint, model, workload, requests_of(16), 16,
                                          out_dir / "aiperf", log)
    finally:
        front.stop()
        server.stop()
    result["comparison"] = compare(result)
    return result


def compare(result: dict) -> dict:
    """Per level and metric: both paths' rounds, their bests, and front / generate_stream."""
    out = {}
    for level in result["levels"]:
        for metric in ("tokens_per_s", "ttft_p50", "itl_p50"):
            better = max if metric == "tokens_per_s" else min
            rounds = {name: [v for r in result["rounds"][name] if (v := summary_metric(r.get(level), metric)) is not None]
                      for name in ("generate_stream", "openai")}
            if not all(rounds.values()):
                continue
            best = {name: better(values) for name, values in rounds.items()}
            out[f"c={level} {metric}"] = {**rounds, "best": best, "ratio": best["openai"] / best["generate_stream"],
                                          "difference_ms": best["openai"] - best["generate_stream"]}
    return out


def targets(comparison: dict) -> list[dict]:
    out = []
    for level, metric, kind, goal in TARGETS:
        row = comparison.get(f"c={level} {metric}")
        if row is None:
            continue
        if kind == "ratio":
            out.append({"checkpoint": "tiny", "name": f"OpenAI front: c={level} {metric} (front / generate_stream)",
                        "target": f">= {goal}", "value": row["ratio"], "met": row["ratio"] >= goal})
        else:
            out.append({"checkpoint": "tiny", "name": f"OpenAI front: c={level} {metric} added (ms)",
                        "target": f"<= {goal}", "value": row["difference_ms"], "met": row["difference_ms"] <= goal})
    return out


def markdown(result: dict) -> list[str]:
    lines = ["", "The OpenAI front against Triton's generate_stream on the same server (rounds alternate; bests):",
             "", "| level, metric | generate_stream (rounds) | OpenAI front (rounds) | front / generate_stream | "
             "difference |", "|---|---|---|---|---|"]
    for key, row in result["comparison"].items():
        fmt = lambda vs: ", ".join(f"{v:.1f}" for v in vs)  # noqa: E731
        lines.append(f"| {key} | {fmt(row['generate_stream'])} | {fmt(row['openai'])} | {row['ratio']:.3f} | "
                     f"{row['difference_ms']:+.1f} |")
    a = result.get("aiperf")
    if a and "error" not in a:
        lines += ["", f"aiperf {AIPERF_VERSION} against the front (c={a['concurrency']}, {a['requests']} requests, "
                  f"a {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} PNG each): {a.get('request_throughput', float('nan')):.2f} "
                  f"requests/s, {a.get('output_token_throughput', float('nan')):.1f} output tokens/s, TTFT p50 "
                  f"{a.get('ttft_p50_ms', float('nan')):.0f} ms, ITL p50 {a.get('itl_p50_ms', float('nan')):.1f} ms "
                  "(its latencies are unreliable on 2 shared cores: see the notes)."]
    elif a:
        lines += ["", f"aiperf: {a['error']}"]
    return lines


# -- aiperf ---------------------------------------------------------------------------------------
def ensure_aiperf(log) -> Path:
    exe = AIPERF_VENV / "bin" / "aiperf"
    if exe.exists():
        return exe
    log(f"installing aiperf {AIPERF_VERSION} into {AIPERF_VENV} (first use only)")
    subprocess.run([sys.executable, "-m", "venv", str(AIPERF_VENV)], check=True)
    subprocess.run([str(AIPERF_VENV / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
                    f"aiperf=={AIPERF_VERSION}"], check=True)
    return exe


def run_aiperf(url: str, checkpoint: Path, model: str, workload: Workload, requests: int, concurrency: int,
               out_dir: Path, log) -> dict:
    try:
        exe = ensure_aiperf(log)
    except subprocess.CalledProcessError as exc:
        return {"error": f"aiperf could not be installed: {exc}"}
    out_dir.mkdir(parents=True, exist_ok=True)
    width, height = IMAGE_SIZE
    n = workload.max_tokens
    command = [str(exe), "profile", "--model", model, "--url", url, "--endpoint-type", "chat", "--streaming",
               "--tokenizer", str(Path(checkpoint).resolve()), "--concurrency", str(concurrency),
               "--request-count", str(requests), "--warmup-request-count", "1",
               "--image-width-mean", str(width), "--image-height-mean", str(height), "--image-format", "png",
               "--image-batch-size", "1", "--synthetic-input-tokens-mean", "8", "--output-tokens-mean", str(n),
               "--extra-inputs", f"min_tokens:{n}", "--extra-inputs", "temperature:0",
               "--workers-max", "1", "--record-processors", "1", "--no-gpu-telemetry", "--no-server-metrics",
               "--ui", "none", "--artifact-dir", str(out_dir)]
    log(f"aiperf: concurrency {concurrency}, {requests} requests with images")
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    (out_dir / "aiperf.log").write_text(done.stdout + done.stderr)
    found = sorted(out_dir.rglob("profile_export_aiperf.json"))
    if done.returncode != 0 or not found:
        return {"error": f"aiperf exited with {done.returncode} (see {out_dir / 'aiperf.log'})"}
    data = json.loads(found[-1].read_text())

    def stat(name, key="avg"):
        entry = data.get(name) or next((r for r in data.get("records", []) if r.get("tag") == name), None)
        return None if not isinstance(entry, dict) else entry.get(key)

    return {"concurrency": concurrency, "requests": requests, "command": " ".join(command),
            "request_throughput": stat("request_throughput"),
            "output_token_throughput": stat("output_token_throughput"),
            "ttft_p50_ms": stat("time_to_first_token", "p50"), "itl_p50_ms": stat("inter_token_latency", "p50"),
            "request_latency_p50_ms": stat("request_latency", "p50"), "errors": stat("error_request_count")}
