"""What the launcher's child processes share: free ports, the parent-death signal, an HTTP
readiness probe, a stop that ends in a kill, and the error a refused start raises."""

from __future__ import annotations

import ctypes
import signal
import socket
import subprocess
import urllib.error
import urllib.request


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
