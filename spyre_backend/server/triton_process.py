"""tritonserver as a child process on the project's model repository: its options, command line
and environment; started, waited on until ready, stopped cleanly.

The Python-backend stub embeds Python in isolated mode and finds site-packages through the
``python3`` on PATH, so the venv's bin/ goes first on PATH and the interpreter's libpython
directory onto LD_LIBRARY_PATH. The checkpoint reaches the models through SPYRE_CHECKPOINT.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from spyre_backend import DEFAULT_CHECKPOINT, MODEL_REPOSITORY
from spyre_backend.serving.routing import REPLICA_ENV, header_forward_args
from spyre_backend.server.child_process import ServerStartError, answers_ok, die_with_parent, port_is_free, stop_process
from spyre_backend.server.stub_watch import StubWatch
from spyre_backend.server.triton_install import find_triton, install_stub, libpython_dir

# how long the command lines (launcher, replicas) wait for a server to load
STARTUP_TIMEOUT_S = 900.0


@dataclass
class ServerOptions:
    checkpoint: Path = DEFAULT_CHECKPOINT
    model_repository: Path = MODEL_REPOSITORY
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    log_verbose: int = 0
    replica_id: str = ""  # names this server behind a proxy (Triton's server id; default: the host name)
    extra_env: dict[str, str] = field(default_factory=dict)
    extra_args: list[str] = field(default_factory=list)


def server_environment(options: ServerOptions) -> dict[str, str]:
    env = dict(os.environ)
    venv_bin = str(Path(sys.executable).parent)  # not resolved: the venv's own bin/
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libpython_dir(), env.get("LD_LIBRARY_PATH", "")) if p)
    env["SPYRE_CHECKPOINT"] = str(Path(options.checkpoint).resolve())
    # glibc's per-thread malloc arenas fragment under tritonserver's many threads: in a 10-minute
    # soak its RSS grew 7.1% with the default and 4.4% with two arenas (scripts/soak.py).
    env.setdefault("MALLOC_ARENA_MAX", "2")
    # Each model's stub is a process with its own OpenMP threads on the same cores. By default an
    # idle OpenMP thread spins for a while, taking the core from the other stubs: with the mid-size
    # vision tower and a decode step running at once on 2 cores, the step took 339-358 ms spinning,
    # 118 ms passive, and the tower 4.2-4.4 s against 2.6-2.8 s. (A process alone on the machine
    # loses up to ~10 % to passive waits: the bench's in-process paths keep the default.)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if options.replica_id:
        env[REPLICA_ENV] = options.replica_id
    env.update(options.extra_env)
    return env


def server_command(options: ServerOptions) -> list[str]:
    install = find_triton()
    install_stub(install)
    return [
        str(install.server_binary),
        f"--model-repository={Path(options.model_repository).resolve()}",
        f"--backend-directory={install.backends_dir}",
        f"--http-address={options.host}",
        f"--grpc-address={options.host}",
        f"--metrics-address={options.host}",
        f"--http-port={options.http_port}",
        f"--grpc-port={options.grpc_port}",
        f"--metrics-port={options.metrics_port}",
        # Configs are complete; auto-complete would import every model.py (and torch) twice.
        "--disable-auto-complete-config",
        "--model-control-mode=none",
        "--exit-on-error=true",
        f"--log-verbose={options.log_verbose}",
        *header_forward_args(),  # x-session-id reaches granite_vision, which checks it (serving/routing.py)
        *([f"--id={options.replica_id}"] if options.replica_id else []),
        *options.extra_args,
    ]


class TritonServer:
    """A tritonserver child process; used by the launcher CLI and by the tests."""

    def __init__(self, options: ServerOptions, log_path: Path | None = None):
        self.options = options
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self._log_file = None
        self.stub_watch = StubWatch()

    @property
    def http_url(self) -> str:
        return f"{self.options.host}:{self.options.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.options.host}:{self.options.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.options.host}:{self.options.metrics_port}/metrics"

    def check(self) -> None:
        """What can be refused before anything starts."""
        opts = self.options
        if not Path(opts.checkpoint).is_dir() or not (Path(opts.checkpoint) / "config.json").exists():
            raise ServerStartError(f"checkpoint directory {opts.checkpoint} has no config.json")
        for port in (opts.http_port, opts.grpc_port, opts.metrics_port):
            if not port_is_free(opts.host, port):
                raise ServerStartError(f"port {port} on {opts.host} is already in use")

    def start(self, timeout_s: float = 600.0) -> "TritonServer":
        opts = self.options
        self.check()
        stdout = None
        if self.log_path is not None:
            self._log_file = open(self.log_path, "w")
            stdout = self._log_file
        self.process = subprocess.Popen(
            server_command(opts),
            env=server_environment(opts),
            stdout=stdout,
            stderr=subprocess.STDOUT if stdout else None,
            start_new_session=True,  # our signals are forwarded explicitly
            preexec_fn=die_with_parent,
        )
        self._wait_ready(timeout_s)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                self.stub_watch.poll({})
                raise ServerStartError(f"tritonserver exited with code {code} before it was ready"
                                       f"{self.stub_watch.report()}{self._log_hint()}")
            # the metrics port opens a moment after HTTP says ready (a test once found it closed)
            if answers_ok(url) and (not self._metrics_on() or answers_ok(self.metrics_url)):
                return
            self._watch_stubs()
            time.sleep(0.5)
        self.stop()
        raise ServerStartError(f"tritonserver was not ready after {timeout_s:.0f} s{self.stub_watch.report()}"
                               f"{self._log_hint()}")

    def _metrics_on(self) -> bool:
        return not any(a.replace(" ", "=") in ("--allow-metrics=false", "--allow-metrics=0")
                       for a in self.options.extra_args)

    def _watch_stubs(self) -> None:
        try:
            self.stub_watch.poll(self.stub_pids())
        except OSError:
            pass  # tritonserver exited meanwhile: the next poll says so

    def _log_hint(self) -> str:
        return f" (see {self.log_path})" if self.log_path else ""

    def stub_pids(self) -> dict[str, int]:
        """The Python-backend stub process of each model, by model name (one instance each)."""
        pids = {}
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        for pid in map(int, children):
            try:
                args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except FileNotFoundError:
                continue  # exited meanwhile
            model = next((Path(a.decode()).parts[-3] for a in args if a.endswith(b"/model.py")), None)
            if model:
                pids[model] = pid
        return pids

    def send_signal(self, sig: int) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        return stop_process(self.process, signal.SIGINT, timeout_s, self._log_file)  # SIGINT: Triton's graceful shutdown
