"""N replicas on one machine behind HAProxy, for trying the scale-out (``scripts/serve_replicas.sh N``).

    python -m spyre_backend.server.replicas 2 [--checkpoint DIR] [--base-port 18000]

Each replica is what ``make serve`` runs (tritonserver and the OpenAI front beside it), named
``replica-<i>`` and listening on ``base + 100 i`` (+0 HTTP, +1 gRPC, +2 metrics, +9 OpenAI); the
proxy takes the usual ports (8000 HTTP, 8001 gRPC, 9000 OpenAI, 8404 its stats). The replicas
start one after the other: on a small machine two loading at once only compete for the cores.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import threading
from pathlib import Path

from spyre_backend import DEFAULT_CHECKPOINT
from spyre_backend.server.launcher import OpenAIFront, ServerOptions, ServerStartError, TritonServer
from spyre_backend.server.proxy import HAProxy, Listen, Replica


def replica_options(index: int, checkpoint: Path, base_port: int, host: str = "127.0.0.1",
                    extra_args: list[str] | None = None) -> tuple[ServerOptions, int]:
    """The server options and OpenAI port of replica ``index``."""
    base = base_port + 100 * index
    return ServerOptions(checkpoint=checkpoint, host=host, http_port=base, grpc_port=base + 1,
                         metrics_port=base + 2, replica_id=f"replica-{index}",
                         extra_args=list(extra_args or [])), base + 9


def as_replica(options: ServerOptions, openai_port: int) -> Replica:
    return Replica(options.replica_id, options.host, options.http_port, options.grpc_port, openai_port)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("replicas", type=int, help="how many replicas")
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--base-port", type=int, default=18000, help="replica i listens on base + 100 i (+0..+9)")
    p.add_argument("--host", default="127.0.0.1", help="where the proxy listens")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--openai-port", type=int, default=9000)
    p.add_argument("--stats-port", type=int, default=8404)
    p.add_argument("--logs", type=Path, default=None, help="log directory (default: a temporary one)")
    p.add_argument("--startup-timeout", type=float, default=900.0)
    p.add_argument("tritonserver_args", nargs="*", help="extra tritonserver flags for every replica, after --")
    a = p.parse_args(argv)
    if a.replicas < 1:
        p.error("at least one replica")
    logs = a.logs or Path(tempfile.mkdtemp(prefix="granite-replicas-"))
    logs.mkdir(parents=True, exist_ok=True)

    servers, fronts, proxy, code = [], [], None, 0
    stopping = threading.Event()

    def stop_all(*_):
        stopping.set()

    signal.signal(signal.SIGINT, stop_all)
    signal.signal(signal.SIGTERM, stop_all)
    try:
        for i in range(a.replicas):
            options, openai_port = replica_options(i, a.checkpoint, a.base_port, extra_args=a.tritonserver_args)
            server = TritonServer(options, log_path=logs / f"replica-{i}.log")
            servers.append(server)
            fronts.append(OpenAIFront(server, openai_port, log_path=logs / f"replica-{i}-openai.log").start())
            server.start(timeout_s=a.startup_timeout)
            print(f"[replicas] replica-{i} ready: HTTP {server.http_url}, gRPC {server.grpc_url}, "
                  f"OpenAI {fronts[-1].url}", flush=True)
            if stopping.is_set():
                return 1  # (the finally stops what started)
        listen = Listen(a.host, a.http_port, a.grpc_port, a.openai_port, a.stats_port)
        proxy = HAProxy([as_replica(s.options, f.port) for s, f in zip(servers, fronts)], listen, logs).start()
    except (ServerStartError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 1
    else:
        print(f"\n{a.replicas} replicas behind HAProxy\n"
              f"  HTTP   : http://{a.host}:{a.http_port}\n"
              f"  gRPC   : {a.host}:{a.grpc_port}  (sessions: send x-session-id: <sequence id>)\n"
              f"  OpenAI : http://{a.host}:{a.openai_port}/v1\n"
              f"  stats  : http://{a.host}:{a.stats_port}/stats  (Prometheus: /metrics)\n"
              f"  logs   : {logs}\n", flush=True)
        while not stopping.wait(1.0):
            if proxy.process.poll() is not None:
                print(f"error: haproxy exited with {proxy.process.returncode} (see {proxy.log_path})", file=sys.stderr)
                code = 1
                break
            # a replica that exits stays down (HAProxy routes around it); restart it by hand to try failover
    finally:
        if proxy is not None:
            proxy.stop()
        for front in fronts:
            front.stop()
        for server in servers:
            server.stop()
    return code


if __name__ == "__main__":
    sys.exit(main())
