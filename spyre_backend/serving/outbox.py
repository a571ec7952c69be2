"""Sends the engine's stream outputs from a thread of their own, merging when sending falls behind.

The engine makes a token for every running request each step. Handing each one to Triton costs
an IPC round trip, so under load the engine can outrun delivery: responses then queue up without
bound, latency grows, and a client's stop can arrive after its stream is long finished. Here the
engine thread only records outputs; one sender thread delivers them, and the outputs a request
accumulates while the sender is busy go out as one response (text joined, the latest counts and
finish reason). When delivery keeps up, every token still gets its own response.
"""

from __future__ import annotations

import itertools
import logging
import threading
from dataclasses import replace
from typing import Callable

from spyre_backend.engine.request import RequestOutput

log = logging.getLogger(__name__)

Deliver = Callable[[str, RequestOutput], None]


class Outbox:
    def __init__(self, name: str = "outbox"):
        self._pending: dict[int, list] = {}  # stream key -> [deliver, text, output], oldest first
        self._ready = threading.Condition()
        self._keys = itertools.count()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def stream(self, deliver: Deliver) -> Deliver:
        """A ``send(text, output)`` for one request whose responses go through ``deliver``."""
        key = next(self._keys)
        return lambda text, output: self._put(key, deliver, text, output)

    def _put(self, key: int, deliver: Deliver, text: str, output: RequestOutput) -> None:
        with self._ready:
            waiting = self._pending.get(key)
            if waiting is None:
                self._pending[key] = [deliver, text, output]
                self._ready.notify()
                return
            _, waiting_text, waiting_output = waiting
            logprobs = output.logprobs
            if waiting_output.logprobs is not None and logprobs is not None:
                logprobs = waiting_output.logprobs + logprobs
            waiting[1] = waiting_text + text
            waiting[2] = replace(output, text=waiting_text + text, logprobs=logprobs)

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._pending and not self._closed:
                    self._ready.wait()
                if not self._pending:
                    return  # closed and drained
                key = next(iter(self._pending))
                deliver, text, output = self._pending.pop(key)
            try:
                deliver(text, output)
            except Exception:  # one client's failure must not stop the others' streams
                log.exception("sending a response failed")

    def close(self, timeout: float = 10.0) -> None:
        """Delivers what is pending, then stops the sender thread."""
        with self._ready:
            self._closed = True
            self._ready.notify()
        self._thread.join(timeout)
