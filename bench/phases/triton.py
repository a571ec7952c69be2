"""Phases ``triton`` and ``ensemble``: the Python load generator on ``granite_vision`` and
``granite_vision_ensemble`` of a fresh tritonserver; the ``session`` and ``perf_analyzer`` phases
run on the same server."""

from __future__ import annotations

import time
from pathlib import Path

from bench.loadgen import TritonTarget, closed_loop
from bench.phases import SERVER_ENV, loadavg, log, our_server, perf_analyzer, session
from bench.profiles import Profile
from bench.stats import summarize
from bench.workload import Workload


def run(prof: Profile, workload: Workload, levels: list[int], skip: set, out_dir: Path) -> dict:
    server = our_server(prof.checkpoint, out_dir / "server.log", SERVER_ENV)
    started = time.monotonic()
    server.start(timeout_s=1200)
    results: dict = {"server_start_s": time.monotonic() - started}
    try:
        paths = []
        if "triton" not in skip:
            paths.append(("triton", "granite_vision", levels))
        if "ensemble" not in skip:
            ensemble_levels = [c for c in levels if prof.ensemble_levels is None or c in prof.ensemble_levels]
            paths.append(("ensemble", "granite_vision_ensemble", ensemble_levels))
        for key, model, path_levels in paths:
            results[key] = {}
            for level in path_levels:
                target = TritonTarget(server.grpc_url, workload, level, model=model)
                try:
                    if level == path_levels[0]:
                        closed_loop(target.send, 1, 1)  # warm: first connection, first request of the model
                    log(f"{model} (Python client): concurrency {level}, {prof.requests(level)} requests")
                    records = closed_loop(target.send, prof.requests(level), level)
                finally:
                    target.close()
                results[key][level] = {**summarize(records), "loadavg": loadavg()}
        if "session" not in skip:
            log("session: second turn vs a fresh request with the whole conversation and the image")
            results["session"] = session.measure(server.grpc_url, workload)
        if "perf_analyzer" not in skip:
            results["perf_analyzer"], results["perf_analyzer_own"] = {}, {}
            for level in levels:
                log(f"perf_analyzer: concurrency {level}, {prof.requests(level)} requests")
                records, own = perf_analyzer.run(server.grpc_url, workload, level, prof.requests(level), out_dir)
                results["perf_analyzer"][level] = {**summarize(records), "loadavg": loadavg()}
                results["perf_analyzer_own"][level] = {"own": own}
    finally:
        results["server_exit_code"] = server.stop()
    return results
