"""Serve Granite Vision: tritonserver on the project's model repository and the OpenAI-compatible
front beside it, until a signal stops them (``make serve``, ``granite-vision-serve``).

    python -m spyre_backend.server.launcher [--checkpoint DIR] [--http-port 8000] ...

The children themselves: triton_process.py (tritonserver) and openai_front.py.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from spyre_backend.server.child_process import ServerStartError
from spyre_backend.server.openai_front import OPENAI_PORT, OpenAIFront
from spyre_backend.server.triton_process import STARTUP_TIMEOUT_S, ServerOptions, TritonServer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = ServerOptions()  # the defaults
    p = argparse.ArgumentParser(description="Serve Granite Vision with tritonserver (Python backend, ensemble) "
                                            "and an OpenAI-compatible API beside it.")
    p.add_argument("--checkpoint", type=Path, default=d.checkpoint,
                   help="HF LlavaNext checkpoint directory (default: the shipped tiny Granite Vision)")
    p.add_argument("--model-repository", type=Path, default=d.model_repository)
    p.add_argument("--host", default=d.host, help="address to bind (default: localhost only)")
    p.add_argument("--http-port", type=int, default=d.http_port)
    p.add_argument("--grpc-port", type=int, default=d.grpc_port)
    p.add_argument("--metrics-port", type=int, default=d.metrics_port)
    p.add_argument("--openai-port", type=int, default=OPENAI_PORT,
                   help=f"the OpenAI-compatible API (default {OPENAI_PORT})")
    p.add_argument("--no-openai", action="store_true", help="serve Triton's endpoints only")
    p.add_argument("--served-model-name", default="", help="OpenAI model id (default: the checkpoint dir name)")
    p.add_argument("--allowed-media-domains", default="",
                   help="comma-separated domains whose http(s) image URLs the OpenAI API fetches (default: none)")
    p.add_argument("--allow-private-media-addresses", action="store_true",
                   help="let allowed image URLs resolve to private, loopback or link-local addresses")
    p.add_argument("--cache-salt-from-user", action="store_true",
                   help="OpenAI API: a request without cache_salt shares caches only with its own user")
    p.add_argument("--log-verbose", type=int, default=d.log_verbose)
    p.add_argument("--replica-id", default=d.replica_id, help="this server's name behind a proxy (default: the host name)")
    p.add_argument("--startup-timeout", type=float, default=STARTUP_TIMEOUT_S)
    p.add_argument("tritonserver_args", nargs="*", help="extra tritonserver flags, after --")
    return p.parse_args(argv)


def server_options(a: argparse.Namespace) -> ServerOptions:
    return ServerOptions(
        checkpoint=a.checkpoint, model_repository=a.model_repository, host=a.host,
        http_port=a.http_port, grpc_port=a.grpc_port, metrics_port=a.metrics_port,
        log_verbose=a.log_verbose, replica_id=a.replica_id, extra_args=a.tritonserver_args,
    )


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    server = TritonServer(server_options(a))
    front = None if a.no_openai else OpenAIFront(
        server, a.openai_port, model_name=a.served_model_name, allowed_media_domains=a.allowed_media_domains,
        allow_private_media_addresses=a.allow_private_media_addresses,
        cache_salt_from_user=a.cache_salt_from_user)

    def forward(sig, _frame):
        server.send_signal(signal.SIGINT if sig == signal.SIGINT else sig)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    try:
        server.check()
        if front is not None:
            front.start()  # first: its /health says 503 while tritonserver loads
        server.start(timeout_s=a.startup_timeout)
    except ServerStartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if front is not None:
            front.stop()
        server.stop()
        return 1
    openai_line = (f"  OpenAI     : {front.url}/v1  (chat/completions, completions, models; model "
                   f"{a.served_model_name or Path(a.checkpoint).resolve().name!r})\n" if front else "")
    print(
        "\nGranite Vision is ready\n"
        f"  checkpoint : {Path(a.checkpoint).resolve()}\n"
        f"  HTTP       : http://{server.http_url}  (POST /v2/models/granite_vision/generate_stream)\n"
        f"  gRPC       : {server.grpc_url}  (model granite_vision, streaming)\n"
        f"{openai_line}"
        f"  metrics    : {server.metrics_url}\n",
        flush=True,
    )
    code = server.process.wait()
    if front is not None:
        front.stop()
    return code


if __name__ == "__main__":
    sys.exit(main())
