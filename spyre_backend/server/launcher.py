"""Start tritonserver on the project's model repository, wait until it is ready, stop it cleanly.

    python -m spyre_backend.server.launcher [--checkpoint DIR] [--http-port 8000] ...

The Python-backend stub embeds Python in isolated mode and finds site-packages through the
``python3`` on PATH, so the venv's bin/ goes first on PATH and the interpreter's libpython
directory onto LD_LIBRARY_PATH. The checkpoint reaches the models through SPYRE_CHECKPOINT.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from spyre_backend import DEFAULT_CHECKPOINT, MODEL_REPOSITORY
from spyre_backend.serving.routing import REPLICA_ENV, header_forward_args
from spyre_backend.server.triton_install import find_triton, install_stub, libpython_dir


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


class ServerStartError(RuntimeError):
    pass


PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the launcher dies, even by SIGKILL. tritonserver runs
    in a session of its own (our signals are forwarded explicitly), so nothing else would reach it
    and it would go on holding the ports; its stubs exit when it does."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def stop_process(process: subprocess.Popen | None, sig: int, timeout_s: float, log_file=None) -> int | None:
    """Signal a child, give it ``timeout_s`` to exit, then kill it; its exit code."""
    if process is None:
        return None
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if log_file:
        log_file.close()
    return process.returncode


def answers_ok(url: str) -> bool:
    """An HTTP GET of ``url`` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError, OSError):
        return False


def _proc_status(pid: int) -> dict[str, str]:
    try:
        return dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                    if ":\t" in line)
    except OSError:
        return {}


def _oom_kills() -> int | None:
    """The memory cgroup's count of OOM kills (cgroup v2 or v1), None where unreadable."""
    for path in ("/sys/fs/cgroup/memory.events", "/sys/fs/cgroup/memory/memory.oom_control"):
        try:
            for line in Path(path).read_text().splitlines():
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
        except (OSError, ValueError):
            continue
    return None


def _kernel_says_killed(pid: int) -> str:
    """The kernel log's line about killing ``pid``, where dmesg can be read."""
    try:
        out = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return next((line.split("] ", 1)[-1] for line in reversed(out.splitlines())
                 if f"Killed process {pid} " in line), "")


class StubWatch:
    """Tells how a model's stub died while tritonserver loaded: Triton itself only says "Stub process
    ... is not healthy", which says nothing about the OOM killer. Polled while waiting for ready;
    the stubs are tritonserver's children, so their exit status is seen only while a stub is a
    zombie; the kernel log and the cgroup's OOM-kill counter say the rest."""

    def __init__(self):
        self.seen: dict[int, tuple[str, int]] = {}  # pid -> (model, last resident bytes)
        self.deaths: list[str] = []
        self.oom_kills_at_start = _oom_kills()

    def poll(self, stubs: dict[str, int]) -> None:
        """``stubs``: the live stubs by model (a zombie has no command line, so it is not among them)."""
        for model, pid in stubs.items():
            rss = int(_proc_status(pid).get("VmRSS", "0 kB").split()[0]) * 1024
            self.seen[pid] = (model, rss or self.seen.get(pid, (model, 0))[1])
        for pid in [p for p in self.seen if p not in stubs.values()]:
            state = _proc_status(pid).get("State", "")
            if not state or state.startswith(("Z", "X")):  # reaped, or a zombie with its exit status
                self._died(pid, self._zombie_signal(pid) if state else None)

    @staticmethod
    def _zombie_signal(pid: int) -> int | None:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            code = int(fields[-1])  # exit_code (field 52): the raw wait status
        except (OSError, ValueError, IndexError):
            return None
        return code & 0x7F or None

    def _died(self, pid: int, sig: int | None) -> None:
        model, rss = self.seen.pop(pid)
        kernel = _kernel_says_killed(pid)
        oom = kernel or (self.oom_kills_at_start is not None and (_oom_kills() or 0) > self.oom_kills_at_start)
        if sig is None and oom:
            sig = signal.SIGKILL
        how = f"was killed by {signal.Signals(sig).name}" if sig else "died"
        cause = (f" from the kernel's OOM killer ({kernel})" if kernel else " from the kernel's OOM killer"
                 if oom else "")
        at = f" at {rss / 2**30:.1f} GiB resident" if rss else ""
        self.deaths.append(f"the {model} stub (pid {pid}) {how}{cause}{at} while loading; "
                           "a stub killed for memory needs a smaller max_context, dtype=bfloat16 or more memory")

    def report(self) -> str:
        return "".join(f"; {d}" for d in self.deaths)


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


class OpenAIFront:
    """The OpenAI-compatible front (``spyre_backend.openai_api.app``) as a child process beside
    tritonserver, bound where Triton binds; used by the launcher CLI and by the tests."""

    def __init__(self, server: TritonServer, port: int = 9000, *, model_name: str = "",
                 allowed_media_domains: str = "", allow_private_media_addresses: bool = False,
                 log_path: Path | None = None):
        self.server, self.port = server, port
        self.args = ["--served-model-name", model_name, "--allowed-media-domains", allowed_media_domains]
        if allow_private_media_addresses:
            self.args.append("--allow-private-media-addresses")
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Serve Granite Vision with tritonserver (Python backend, ensemble) "
                                            "and an OpenAI-compatible API beside it.")
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT,
                   help="HF LlavaNext checkpoint directory (default: the shipped tiny Granite Vision)")
    p.add_argument("--model-repository", type=Path, default=MODEL_REPOSITORY)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--openai-port", type=int, default=9000, help="the OpenAI-compatible API (default 9000)")
    p.add_argument("--no-openai", action="store_true", help="serve Triton's endpoints only")
    p.add_argument("--served-model-name", default="", help="OpenAI model id (default: the checkpoint dir name)")
    p.add_argument("--allowed-media-domains", default="",
                   help="comma-separated domains whose http(s) image URLs the OpenAI API fetches (default: none)")
    p.add_argument("--allow-private-media-addresses", action="store_true",
                   help="let allowed image URLs resolve to private, loopback or link-local addresses")
    p.add_argument("--log-verbose", type=int, default=0)
    p.add_argument("--replica-id", default="", help="this server's name behind a proxy (default: the host name)")
    p.add_argument("--startup-timeout", type=float, default=900.0)
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
        allow_private_media_addresses=a.allow_private_media_addresses)

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
