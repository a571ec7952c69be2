"""A side channel from the granite_vision front to granite_llm for stopping a sequence.

Triton 2.51 forwards no cancellation into an ensemble, and a ``stop`` request sent from the
front as BLS through the ensemble can wait behind the very sequence it should stop (the stub
handles BLS calls one at a time). Both models run as Python-backend stubs of one tritonserver,
so a Unix datagram socket named after that server's pid reaches the engine at once. A sender
that binds its own (abstract, autobound) address gets the engine's answer back.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

# on_stop(sequence_id, end, reply): reply(None) when a turn was stopped, reply(error) otherwise.
OnStop = Callable[[int | str, bool, Callable[[str | None], None]], None]


def socket_path(server_pid: int | None = None) -> Path:
    pid = server_pid if server_pid is not None else os.getppid()  # stubs are children of tritonserver
    return Path(tempfile.gettempdir()) / f"spyre-backend-{pid}" / "granite_llm.sock"


class StopListener:
    """Receives ``{"stop": sequence_id, "end": bool}`` datagrams and calls ``on_stop``."""

    def __init__(self, on_stop: OnStop, path: Path | None = None):
        self.path = path or socket_path()
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.on_stop = on_stop
        threading.Thread(target=self._serve, name="stop-listener", daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                data, sender = self.sock.recvfrom(4096)
            except OSError:
                return  # closed
            try:
                message = json.loads(data)
                self.on_stop(message["stop"], bool(message.get("end", True)), self._replier(sender))
            except Exception:
                log.exception("bad stop message %r", data[:100])

    def _replier(self, sender) -> Callable[[str | None], None]:
        def reply(error: str | None) -> None:
            if not sender:  # fire and forget
                return
            try:
                self.sock.sendto(json.dumps({"error": error}).encode(), sender)
            except OSError:
                pass  # the sender gave up waiting

        return reply

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)


def send_stop(sequence_id: int | str, path: Path | None = None) -> bool:
    """Fire and forget; False when no granite_llm listens (then the request runs to its end)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(json.dumps({"stop": sequence_id, "end": True}).encode(), str(path or socket_path()))
        return True
    except OSError:
        return False


def request_stop(sequence_id: int | str, end: bool, timeout: float = 10.0, path: Path | None = None) -> str | None:
    """Stops the running turn of ``sequence_id`` and waits for the engine's answer.

    Returns None when a turn was stopped, else the engine's error message.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("")  # autobind to a unique abstract address, so the listener can answer
        s.settimeout(timeout)
        try:
            s.sendto(json.dumps({"stop": sequence_id, "end": end}).encode(), str(path or socket_path()))
            return json.loads(s.recv(4096))["error"]
        except socket.timeout:
            return f"granite_llm did not answer the stop request within {timeout:.0f} s"
        except OSError:
            return "granite_llm is not running"


# Cancellation, the other way a generation ends early: Triton's is_cancelled() is an IPC round
# trip, and the engine (every request, every step) and the front (every response) would ask it
# constantly; each asks at most this often per request.
CANCEL_POLL_S = 0.05


def polled_every(check: Callable[[], bool], interval_s: float = CANCEL_POLL_S) -> Callable[[], bool]:
    """``check`` asked at most once per ``interval_s``, the first time ``interval_s`` after this
    call; in between the answer is "not yet". The first ask is not at once: the request has just
    arrived, and a round trip there would sit on its time to first token."""
    next_at = time.monotonic() + interval_s

    def poll() -> bool:
        nonlocal next_at
        now = time.monotonic()
        if now < next_at:
            return False
        next_at = now + interval_s
        return check()

    return poll
