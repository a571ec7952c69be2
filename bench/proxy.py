"""What HAProxy costs: two replicas behind the proxy against one replica direct, in alternating rounds.

Both replicas stay up the whole time (the machine is in the same state for either path); the
direct path talks to replica-0's gRPC port, the proxied one to HAProxy's, which spreads the
clients' streams over both replicas (no x-session-id: round robin). Per request, the added
latency is the TTFT difference; per streamed response, the inter-token latency difference.
Every request has an image of its own (no encoder or prefix cache hits).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.loadgen import TritonTarget, closed_loop
from bench.peer_compare import summary_metric
from bench.stats import summarize
from bench.workload import Workload

ROUNDS = 3
LEVELS = (1, 4)
METRICS = ("ttft_p50", "itl_p50", "tokens_per_s")


def run(checkpoint: Path, workload: Workload, requests_of, out_dir: Path, log, server_env: dict | None = None) -> dict:
    from spyre_backend.server.launcher import ServerOptions, TritonServer, free_port
    from spyre_backend.server.proxy import HAProxy, Listen, Replica

    servers, proxy = [], None
    try:
        for i in range(2):
            options = ServerOptions(checkpoint=checkpoint, http_port=free_port(), grpc_port=free_port(),
                                    metrics_port=free_port(), replica_id=f"replica-{i}", extra_env=dict(server_env or {}))
            servers.append(TritonServer(options, log_path=out_dir / f"proxy-replica-{i}.log").start(timeout_s=1200))
        listen = Listen("127.0.0.1", free_port(), free_port(), 0, free_port())
        replicas = [Replica(s.options.replica_id, "127.0.0.1", s.options.http_port, s.options.grpc_port)
                    for s in servers]
        proxy = HAProxy(replicas, listen, Path(tempfile.mkdtemp(dir=out_dir, prefix="haproxy-"))).start()
        for r in replicas:
            proxy.wait_for(r.name, "UP")
        urls = {"direct": servers[0].grpc_url, "proxied": f"127.0.0.1:{listen.grpc_port}"}
        result: dict = {"levels": list(LEVELS), "rounds": {name: [] for name in urls}}
        start = 0
        for name, url in urls.items():  # warm both paths
            target = TritonTarget(url, workload, 2)
            closed_loop(lambda c, i, t=target, s=start: t.send(c, s + i), 2, 2)
            target.close()
            start += 2
        for rnd in range(ROUNDS):
            for name, url in urls.items():
                round_out = {}
                for level in LEVELS:
                    n = requests_of(level)
                    log(f"proxy round {rnd + 1}: {name}, concurrency {level}, {n} requests")
                    target = TritonTarget(url, workload, level)
                    try:
                        round_out[level] = summarize(closed_loop(lambda c, i, t=target, s=start: t.send(c, s + i),
                                                                 n, level))
                    finally:
                        target.close()
                    start += n
                result["rounds"][name].append(round_out)
    finally:
        if proxy is not None:
            proxy.stop()
        for server in servers:
            server.stop()
    result["comparison"] = compare(result)
    return result


def compare(result: dict) -> dict:
    """Per level and metric: both paths' rounds, their medians, and the proxy's added cost."""
    out = {}
    for level in result["levels"]:
        for metric in METRICS:
            rounds = {name: [v for r in result["rounds"][name] if (v := summary_metric(r.get(level), metric)) is not None]
                      for name in ("direct", "proxied")}
            if not all(rounds.values()):
                continue
            median = {name: sorted(vs)[len(vs) // 2] for name, vs in rounds.items()}
            out[f"c={level} {metric}"] = {**rounds, "median": median,
                                          "difference": median["proxied"] - median["direct"],
                                          "ratio": median["proxied"] / median["direct"]}
    return out


def markdown(result: dict) -> list[str]:
    lines = ["", "HAProxy in front of two replicas against one replica direct (gRPC streams, rounds alternate; "
             "medians of rounds):", "", "| level, metric | direct (rounds) | proxied (rounds) | proxied - direct | "
             "proxied / direct |", "|---|---|---|---|---|"]
    for key, row in result["comparison"].items():
        fmt = lambda vs: ", ".join(f"{v:.1f}" for v in vs)  # noqa: E731
        lines.append(f"| {key} | {fmt(row['direct'])} | {fmt(row['proxied'])} | {row['difference']:+.1f} | "
                     f"{row['ratio']:.3f} |")
    return lines
