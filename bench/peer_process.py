"""What the peers' servers (``vllm serve``, ``llama-server``) share: waiting until an HTTP endpoint
answers 200, and stopping the process group they were started in."""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import time


def wait_until_ready(proc: subprocess.Popen, port: int, path: str, timeout_s: float, name: str, log_path,
                     started: float, poll_s: float = 1.0) -> float:
    """Seconds from ``started`` until GET ``path`` answers 200; the process is stopped and an error
    raised if it exits or ``timeout_s`` passes first."""
    while time.monotonic() - started < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}; log: {log_path}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", path)
            if conn.getresponse().status == 200:
                return time.monotonic() - started
        except OSError:
            pass
        time.sleep(poll_s)
    stop_group(proc, signal.SIGTERM, 30)
    raise RuntimeError(f"{name} not ready after {timeout_s:.0f} s; log: {log_path}")


def stop_group(proc: subprocess.Popen | None, first: int, wait_s: float) -> int | None:
    """``first`` to the process group, SIGKILL after ``wait_s``; its exit code (None: never started
    or already gone)."""
    if proc is None or proc.poll() is not None:
        return None if proc is None else proc.returncode
    os.killpg(proc.pid, first)
    try:
        return proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait(30)
