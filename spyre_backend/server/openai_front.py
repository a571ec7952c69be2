"""The OpenAI-compatible front (``spyre_backend.openai_api.app``) as a child process beside a
tritonserver, bound where Triton binds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from spyre_backend.serving.routing import REPLICA_ENV
from spyre_backend.server.child_process import ServerStartError, answers_ok, die_with_parent, port_is_free, stop_process
from spyre_backend.server.triton_process import TritonServer

OPENAI_PORT = 9000


class OpenAIFront:
    """The front beside ``server``; used by the launcher CLI and by the tests."""

    def __init__(self, server: TritonServer, port: int = OPENAI_PORT, *, model_name: str = "",
                 allowed_media_domains: str = "", allow_private_media_addresses: bool = False,
                 cache_salt_from_user: bool = False, log_path: Path | None = None):
        self.server, self.port = server, port
        self.args = ["--served-model-name", model_name, "--allowed-media-domains", allowed_media_domains]
        if allow_private_media_addresses:
            self.args.append("--allow-private-media-addresses")
        if cache_salt_from_user:
            self.args.append("--cache-salt-from-user")
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self._log_file = None

    @property
    def url(self) -> str:
        return f"http://{self.server.options.host}:{self.port}"

    def start(self, timeout_s: float = 60.0) -> "OpenAIFront":
        opts = self.server.options
        if not port_is_free(opts.host, self.port):
            raise ServerStartError(f"port {self.port} on {opts.host} is already in use (--openai-port)")
        if self.log_path is not None:
            self._log_file = open(self.log_path, "w")
        env = dict(os.environ, **({REPLICA_ENV: opts.replica_id} if opts.replica_id else {}))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "spyre_backend.openai_api.app", "--triton-url", self.server.grpc_url,
             "--checkpoint", str(Path(opts.checkpoint).resolve()), "--host", opts.host, "--port", str(self.port),
             *self.args],
            stdout=self._log_file, stderr=subprocess.STDOUT if self._log_file else None, env=env,
            preexec_fn=die_with_parent,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:  # /v1/models answers before Triton is ready
            if self.process.poll() is not None:
                raise ServerStartError(f"the OpenAI front exited with code {self.process.returncode}")
            if answers_ok(f"{self.url}/v1/models"):
                return self
            time.sleep(0.2)
        self.stop()
        raise ServerStartError(f"the OpenAI front did not answer on {self.url} within {timeout_s:.0f} s")

    def stop(self, timeout_s: float = 10.0) -> int | None:
        return stop_process(self.process, signal.SIGTERM, timeout_s, self._log_file)
