"""What HAProxy costs: two replicas behind the proxy against one replica direct, in alternating rounds.

Both replicas stay up the whole time (the machine is in the same state for every path). Three paths:
- ``direct``: the clients' gRPC streams straight to one replica;
- ``proxied``: the same streams through HAProxy with one x-session-id, so they reach that same
  replica: the difference to ``direct`` is the proxy's own cost (per request: TTFT; per streamed
  response: inter-token latency);
- ``spread``: through HAProxy without the header: the streams go round robin over both replicas,
  what two replicas bring on this machine.
Every request has an image of its own (no encoder or prefix cache hits).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import urllib.request
from pathlib import Path

from bench.loadgen import TritonTarget, closed_loop
from bench.stats import summarize, summary_metric
from bench.workload import Workload
from spyre_backend.serving.routing import SESSION_HEADER

ROUNDS = 5
LEVELS = (1, 4)
MIN_REQUESTS = 32  # per level and round: a request is ~0.2 s on the tiny checkpoint
PATHS = ("direct", "proxied", "spread")
KEY = "bench-session"
METRICS = ("ttft_p50", "itl_p50", "tokens_per_s")


def run(checkpoint: Path, workload: Workload, requests_of, out_dir: Path, log, server_env: dict | None = None) -> dict:
    from spyre_backend.server.child_process import free_port
    from spyre_backend.server.proxy import Listen
    from spyre_backend.server.replicas import ReplicaSet
    from spyre_backend.server.triton_process import ServerOptions

    replicas = [(ServerOptions(checkpoint=checkpoint, http_port=free_port(), grpc_port=free_port(),
                               metrics_port=free_port(), replica_id=f"replica-{i}",
                               extra_env=dict(server_env or {})), 0) for i in range(2)]
    listen = Listen("127.0.0.1", free_port(), free_port(), 0, free_port())
    replica_set = ReplicaSet(replicas, listen, Path(tempfile.mkdtemp(dir=out_dir, prefix="proxy-")))
    try:
        replica_set.start(timeout_s=1200)
        servers = replica_set.servers
        proxied = f"127.0.0.1:{listen.grpc_port}"
        home = _replica_of(f"127.0.0.1:{listen.http_port}", KEY)  # where the key's streams land
        direct = next(s.grpc_url for s in servers if s.options.replica_id == home)
        paths = {"direct": (direct, None), "proxied": (proxied, {SESSION_HEADER: KEY}), "spread": (proxied, None)}
        result: dict = {"levels": list(LEVELS), "replica": home, "rounds": {name: [] for name in paths}}
        start = 0
        for name, (url, headers) in paths.items():  # warm every path
            target = TritonTarget(url, workload, 2, headers=headers)
            closed_loop(lambda c, i, t=target, s=start: t.send(c, s + i), 2, 2)
            target.close()
            start += 2
        for rnd in range(ROUNDS):
            for name, (url, headers) in paths.items():
                round_out = {}
                for level in LEVELS:
                    n = max(MIN_REQUESTS, requests_of(level))
                    log(f"proxy round {rnd + 1}: {name}, concurrency {level}, {n} requests")
                    target = TritonTarget(url, workload, level, headers=headers)
                    try:
                        round_out[level] = summarize(closed_loop(lambda c, i, t=target, s=start: t.send(c, s + i),
                                                                 n, level))
                    finally:
                        target.close()
                    start += n
                result["rounds"][name].append(round_out)
    finally:
        replica_set.stop()
    result["comparison"] = compare(result)
    return result


def _replica_of(http_url: str, key: str) -> str:
    """The replica HAProxy gives ``key`` (its x-served-by on one request; the gRPC backend hashes
    the key over the same server ids, and its stick table then remembers the same choice)."""
    body = json.dumps({"text_input": "Say hello.", "max_tokens": 1}).encode()
    request = urllib.request.Request(f"http://{http_url}/v2/models/granite_vision/generate", data=body,
                                     headers={"Content-Type": "application/json", SESSION_HEADER: key})
    with urllib.request.urlopen(request, timeout=120) as resp:
        return resp.headers["x-served-by"]


def compare(result: dict) -> dict:
    """Per level and metric: each path's rounds, their medians, and each against ``direct``."""
    out = {}
    for level in result["levels"]:
        for metric in METRICS:
            rounds = {name: [v for r in result["rounds"].get(name, []) if (v := summary_metric(r.get(level), metric)) is not None]
                      for name in PATHS}
            if not rounds["direct"] or not rounds["proxied"]:
                continue
            median = {name: statistics.median(vs) for name, vs in rounds.items() if vs}
            out[f"c={level} {metric}"] = {**rounds, "median": median,
                                          "difference": median["proxied"] - median["direct"],
                                          "ratio": median["proxied"] / median["direct"],
                                          "spread_ratio": median["spread"] / median["direct"] if "spread" in median else None}
    return out


def markdown(result: dict) -> list[str]:
    lines = ["", "HAProxy in front of two replicas against one replica direct (gRPC streams, rounds alternate; "
             "medians of rounds). proxied: through HAProxy to the same replica (one x-session-id); spread: "
             "through HAProxy, round robin over both:", "",
             "| level, metric | direct (rounds) | proxied (rounds) | proxied - direct | proxied / direct | "
             "spread (rounds) | spread / direct |", "|---|---|---|---|---|---|---|"]
    for key, row in result["comparison"].items():
        fmt = lambda vs: ", ".join(f"{v:.2f}" for v in vs)  # noqa: E731
        spread = f"{row['spread_ratio']:.3f}" if row.get("spread_ratio") is not None else "-"
        lines.append(f"| {key} | {fmt(row['direct'])} | {fmt(row['proxied'])} | {row['difference']:+.2f} | "
                     f"{row['ratio']:.3f} | {fmt(row.get('spread', [])) or '-'} | {spread} |")
    return lines
