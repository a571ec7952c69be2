"""perf_analyzer (from the tritonclient wheel) against granite_vision, streaming, one concurrency level.

It sends a fixed number of requests (``--request-count``) with the workload's inputs and writes a
profile export: per request its send time, every response's time and outputs (including
``num_output_tokens``), so its TTFT and ITL are computed exactly as for the Python load generator.
Its own summary (infer/sec, p50..p99 of the first-response latency) is kept alongside.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

from bench.stats import RequestRecord
from bench.workload import Workload


def binary() -> Path:
    return Path(sys.executable).parent / "perf_analyzer"


def environment() -> dict[str, str]:
    # The wheel's perf_analyzer links libcudart.so.12 even without a GPU; nvidia-cuda-runtime-cu12
    # (in requirements.txt) ships it.
    import nvidia.cuda_runtime

    lib = str(Path(nvidia.cuda_runtime.__path__[0]) / "lib")
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (lib, env.get("LD_LIBRARY_PATH", "")) if p)
    return env


def run(grpc_url: str, workload: Workload, concurrency: int, n_requests: int, out_dir: Path,
        model: str = "granite_vision", timeout_s: float = 1800.0) -> tuple[list[RequestRecord], dict]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"pa-c{concurrency}"
    data = stem.with_suffix(".input.json")
    data.write_text(json.dumps(workload.perf_analyzer_data(n_requests)))
    export, report = stem.with_suffix(".profile.json"), stem.with_suffix(".csv")
    cmd = [str(binary()), "-m", model, "-i", "grpc", "--streaming", "-u", grpc_url, "--input-data", str(data),
           "--concurrency-range", str(concurrency), "--request-count", str(n_requests),
           "--profile-export-file", str(export), "-f", str(report)]
    proc = subprocess.run(cmd, env=environment(), capture_output=True, text=True, timeout=timeout_s)
    stem.with_suffix(".log").write_text(" ".join(cmd) + "\n\n" + proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"perf_analyzer exited with {proc.returncode}: {(proc.stdout + proc.stderr)[-600:]}")
    return records_from_export(json.loads(export.read_text())), own_summary(report)


def records_from_export(export: dict) -> list[RequestRecord]:
    records = []
    for experiment in export["experiments"]:
        for request in experiment["requests"]:
            record = RequestRecord(request["timestamp"] / 1e9)
            outputs = request.get("response_outputs") or [{}] * len(request["response_timestamps"])
            for t, out in zip(request["response_timestamps"], outputs):
                record.arrivals.append((t / 1e9, int(out.get("num_output_tokens", 0))))
            records.append(record)
    return records


def own_summary(report: Path) -> dict:
    """perf_analyzer's CSV line: its throughput and latency percentiles (ms). Its log says it
    measures the first response of a decoupled model, but its latencies match send-to-last-response."""
    rows = list(csv.DictReader(report.open()))
    if not rows:
        return {}
    row = rows[-1]
    return {"infer_per_s": float(row["Inferences/Second"]),
            "responses_per_s": float(row.get("Response Throughput") or "nan"),
            **{f"latency_p{q}_ms": float(row[f"p{q} latency"]) / 1000.0 for q in (50, 95, 99)}}
