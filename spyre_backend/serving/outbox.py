"""Sends the engine's stream outputs from a thread of their own, merging when sending falls behind.

The engine makes a token for every running request each step. Handing each one to Triton costs
an IPC round trip, so under load the engine can outrun delivery: responses then queue up without
bound, latency grows, and a client's stop can arrive after its stream is long finished. Here the
engine thread only records outputs; one sender thread delivers them, and the outputs a request
accumulates while the sender is busy go out as one response (text joined, the latest counts and
finish reason). When delivery keeps up, every token still gets its own response.

``min_gap_s`` (config ``stream_interval_ms``) also holds a stream's next response until that long
after its previous one, merging what the engine makes meanwhile: each response costs CPU in every
process it crosses (this stub, tritonserver twice, the front, the client), so fewer, fuller
responses leave the engine more of the machine. A stream's first response and its final one are
never held.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import replace
from typing import Callable

from spyre_backend.engine.request import RequestOutput

log = logging.getLogger(__name__)

Deliver = Callable[[str, RequestOutput], None]


class Outbox:
    def __init__(self, name: str = "outbox", min_gap_s: float = 0.0):
        self._pending: dict[int, list] = {}  # stream key -> [deliver, text, output], oldest first
        self._last_sent: dict[int, float] = {}  # stream key -> when its last response went out
        self._min_gap_s = min_gap_s
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
            if output.finished:
                self._ready.notify()  # a held stream's final response goes out at once

    def _due(self, key: int, output: RequestOutput, now: float) -> float:
        """When the pending response of stream ``key`` may go out."""
        last = self._last_sent.get(key)
        return now if last is None or output.finished else last + self._min_gap_s

    def _next(self) -> tuple[int, float]:
        """The oldest stream whose response may go out now, else (-1, seconds until one may)."""
        now = time.monotonic()
        soonest = None
        for key, (_, _, output) in self._pending.items():
            due = self._due(key, output, now)
            if due <= now:
                return key, 0.0
            soonest = due if soonest is None else min(soonest, due)
        return -1, soonest - now

    def _run(self) -> None:
        while True:
            with self._ready:
                while True:
                    if not self._pending:
                        if self._closed:
                            return  # closed and drained
                        self._ready.wait()
                        continue
                    key, wait_s = self._next() if not self._closed else (next(iter(self._pending)), 0.0)
                    if key >= 0:
                        break
                    self._ready.wait(wait_s)
                deliver, text, output = self._pending.pop(key)
                if output.finished:
                    self._last_sent.pop(key, None)
                elif self._min_gap_s:
                    self._last_sent[key] = time.monotonic()
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
