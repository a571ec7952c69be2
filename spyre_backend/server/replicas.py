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
from spyre_backend.server.child_process import ServerStartError
from spyre_backend.server.openai_front import OpenAIFront
from spyre_backend.server.proxy import HAProxy, Listen, Replica
from spyre_backend.server.triton_process import STARTUP_TIMEOUT_S, ServerOptions, TritonServer


def replica_options(index: int, checkpoint: Path, base_port: int, host: str = "127.0.0.1",
                    extra_args: list[str] | None = None) -> tuple[ServerOptions, int]:
    """The server options and OpenAI port of replica ``index``."""
    base = base_port + 100 * index
    return ServerOptions(checkpoint=checkpoint, host=host, http_port=base, grpc_port=base + 1,
                         metrics_port=base + 2, replica_id=f"replica-{index}",
                         extra_args=list(extra_args or [])), base + 9


class ReplicaSet:
    """Replicas started one after the other (tritonserver, and the OpenAI front where it has a
    port), then HAProxy in front; stopped in the reverse order. ``replicas``: each one's server
    options and OpenAI port (0: none). Used by ``main``, the tests and the bench."""

    def __init__(self, replicas: list[tuple[ServerOptions, int]], listen: Listen, logs: Path, **proxy_config):
        self.replicas, self.listen, self.logs, self.proxy_config = replicas, listen, Path(logs), proxy_config
        self.servers: list[TritonServer] = []
        self.fronts: list[OpenAIFront] = []
        self.proxy: HAProxy | None = None

    def start(self, timeout_s: float = STARTUP_TIMEOUT_S, on_ready=lambda server: None, should_stop=lambda: False) -> "ReplicaSet":
        for options, openai_port in self.replicas:
            server = TritonServer(options, log_path=self.logs / f"{options.replica_id}.log")
            self.servers.append(server)
            if openai_port:  # first: its /health says 503 while tritonserver loads
                self.fronts.append(OpenAIFront(server, openai_port,
                                               log_path=self.logs / f"{options.replica_id}-openai.log").start())
            server.start(timeout_s=timeout_s)
            on_ready(server)
            if should_stop():
                return self
        servers = [Replica(o.replica_id, o.host, o.http_port, o.grpc_port, port) for o, port in self.replicas]
        self.proxy = HAProxy(servers, self.listen, self.logs, **self.proxy_config).start()
        for server in servers:
            self.proxy.wait_for(server.name, "UP")
        return self

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
        for front in self.fronts:
            front.stop()
        for server in self.servers:
            server.stop()


def main(argv: list[str] | None = None) -> int:
    d = Listen()  # the proxy's default address and ports
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("replicas", type=int, help="how many replicas")
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--base-port", type=int, default=18000, help="replica i listens on base + 100 i (+0..+9)")
    p.add_argument("--host", default=d.host, help="where the proxy listens")
    p.add_argument("--http-port", type=int, default=d.http_port)
    p.add_argument("--grpc-port", type=int, default=d.grpc_port)
    p.add_argument("--openai-port", type=int, default=d.openai_port)
    p.add_argument("--stats-port", type=int, default=d.stats_port)
    p.add_argument("--logs", type=Path, default=None, help="log directory (default: a temporary one)")
    p.add_argument("--startup-timeout", type=float, default=STARTUP_TIMEOUT_S)
    p.add_argument("tritonserver_args", nargs="*", help="extra tritonserver flags for every replica, after --")
    a = p.parse_args(argv)
    if a.replicas < 1:
        p.error("at least one replica")
    logs = a.logs or Path(tempfile.mkdtemp(prefix="granite-replicas-"))
    logs.mkdir(parents=True, exist_ok=True)

    stopping = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    replicas = [replica_options(i, a.checkpoint, a.base_port, extra_args=a.tritonserver_args) for i in range(a.replicas)]
    listen = Listen(a.host, a.http_port, a.grpc_port, a.openai_port, a.stats_port)
    cluster = ReplicaSet(replicas, listen, logs)

    def ready(server: TritonServer) -> None:
        print(f"[replicas] {server.options.replica_id} ready: HTTP {server.http_url}, gRPC {server.grpc_url}", flush=True)

    code = 0
    try:
        cluster.start(a.startup_timeout, on_ready=ready, should_stop=stopping.is_set)
        if stopping.is_set():
            return 1  # (the finally stops what started)
        print(f"\n{a.replicas} replicas behind HAProxy\n"
              f"  HTTP   : http://{a.host}:{a.http_port}\n"
              f"  gRPC   : {a.host}:{a.grpc_port}  (sessions: send x-session-id: <sequence id>)\n"
              f"  OpenAI : http://{a.host}:{a.openai_port}/v1\n"
              f"  stats  : http://{a.host}:{a.stats_port}/stats  (Prometheus: /metrics)\n"
              f"  logs   : {logs}\n", flush=True)
        while not stopping.wait(1.0):
            if cluster.proxy.process.poll() is not None:
                print(f"error: haproxy exited with {cluster.proxy.process.returncode} (see {cluster.proxy.log_path})",
                      file=sys.stderr)
                code = 1
                break
            # a replica that exits stays down (HAProxy routes around it); restart it by hand to try failover
    except (ServerStartError, RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 1
    finally:
        cluster.stop()
    return code


if __name__ == "__main__":
    sys.exit(main())
