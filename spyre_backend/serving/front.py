"""The ``granite_vision`` front: sequence ids for clients that send none, and the relay of the
ensemble's stream, with what happens when a client goes away. No Triton types here: the adapter
(``model_repository/granite_vision/1/model.py``) passes callables that touch Triton's objects.

granite_llm is sequence-batched, so every request into the ensemble needs a correlation id, and
Triton 2.51's Python backend cannot assign one inside an ensemble step. Triton 2.51 also does not
forward a client's cancellation into an ensemble: when the client is cancelled (gRPC cancel,
HTTP disconnect) the front tells granite_llm to stop that sequence over the side channel of
``serving/control.py``.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, TypeVar

from spyre_backend.serving.control import polled_every, request_stop, send_stop

R = TypeVar("R")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResponseKind:
    """What the relay needs to know of one pipeline response."""

    error: str | None = None
    empty: bool = False  # the pipeline's closing response, with no outputs
    last: bool = False  # granite_llm sets a finish reason on its last response only


class FrontService:
    def __init__(self, max_pipeline_starts: int = 24, *, stop=send_stop, stop_with_reply=request_stop):
        if max_pipeline_starts < 1:
            raise ValueError(f"max_pipeline_starts must be >= 1, got {max_pipeline_starts}")
        # a BLS exec(decoupled=True) holds a thread of the backend's pool until the pipeline's first
        # response, and that pool also delivers every streamed response: at most this many at once
        self.pipeline_starts = threading.BoundedSemaphore(max_pipeline_starts)
        # ids for clients that send none: a per-process range far from small client-chosen ids
        self._ids = itertools.count((1 << 62) + (os.getpid() << 24))
        self._stop, self._stop_with_reply = stop, stop_with_reply
        # relays in progress (sequence id -> is_cancelled): asked by one watcher thread, because
        # a relay itself asks only when a response arrives, and a stream can be silent for long
        # (a long prefill; tokens without text, e.g. end-of-text repeated under ignore_eos)
        self._watched: dict[int, _Watched] = {}
        self._watch_lock = threading.Lock()
        self._watcher: threading.Thread | None = None
        self.watch_interval_s = 0.2  # each ask is an IPC round trip, per relay in progress

    @classmethod
    def from_model_config(cls, model_config: dict) -> "FrontService":
        """From granite_vision's config.pbtxt parameters (``SPYRE_MAX_PIPELINE_STARTS`` overrides).
        Not ServingConfig: this light process never imports torch."""
        raw = model_config.get("parameters", {}).get("max_pipeline_starts", {}).get("string_value", "24")
        raw = os.environ.get("SPYRE_MAX_PIPELINE_STARTS", raw)
        try:
            return cls(int(raw))
        except ValueError:
            raise ValueError(f"parameter 'max_pipeline_starts': must be an integer >= 1 (got {raw!r})") from None

    def sequence_for(self, correlation_id: int, flags: int, start_end: int) -> tuple[int, int]:
        """The client's own sequence (id and START/END bits) or a fresh one-turn sequence."""
        if correlation_id:
            return correlation_id, flags
        return next(self._ids), start_end

    def stop(self, correlation_id: int, end: bool) -> str | None:
        """A client's stop request, straight to granite_llm (through the ensemble it would queue
        behind the very turn it stops); None when stopped, else the error to answer."""
        if not correlation_id:
            return "a stop request needs the sequence id of the turn to stop"
        return self._stop_with_reply(correlation_id, end)

    def relay(self, responses: Iterable[R], sequence_id: int, *, kind: Callable[[R], ResponseKind],
              forward: Callable[[R, bool], None], send_error: Callable[[str], None],
              is_cancelled: Callable[[], bool]) -> str:
        """Relay the pipeline's stream to the client, reading it to its end whatever happens.

        ``forward(response, last)`` sends one response on (it raises when the client is gone);
        ``send_error`` sends the client's final error. Returns how the relay ended:
        "done", "error", "abandoned" or "truncated".
        """
        watched = _Watched(is_cancelled)
        self._watch(sequence_id, watched)

        def forward_watched(response, last):
            if last:
                watched.close()
            forward(response, last)

        def send_error_watched(message):
            watched.close()
            send_error(message)

        try:
            return self._relay(responses, sequence_id, kind, forward_watched, send_error_watched, is_cancelled)
        finally:
            watched.close()
            with self._watch_lock:
                self._watched.pop(sequence_id, None)

    def _relay(self, responses, sequence_id, kind, forward, send_error, is_cancelled) -> str:
        iterator = iter(responses)
        cancelled = polled_every(is_cancelled)  # an IPC round trip: not once per token
        for response in iterator:
            if cancelled():
                return self.abandon(sequence_id, iterator, send_error)
            k = kind(response)
            if k.error is not None:
                send_error(k.error)
                _drain(iterator)
                return "error"
            if k.empty:
                continue
            try:
                forward(response, k.last)
            except Exception:  # the client is gone (cancelled or disconnected) before we noticed
                return self.abandon(sequence_id, iterator, send_error)
            if k.last:
                _drain(iterator)
                return "done"
        send_error("the pipeline ended without a final response")
        return "truncated"

    def _watch(self, sequence_id: int, watched: "_Watched") -> None:
        with self._watch_lock:
            self._watched[sequence_id] = watched
            if self._watcher is None:
                self._watcher = threading.Thread(target=self._watch_loop, name="granite_vision-cancel", daemon=True)
                self._watcher.start()

    def _watch_loop(self) -> None:
        while True:
            time.sleep(self.watch_interval_s)
            with self._watch_lock:
                watched = list(self._watched.items())
            for sequence_id, entry in watched:
                try:
                    if entry.cancelled():
                        with self._watch_lock:  # stopped once; the relay ends the request
                            self._watched.pop(sequence_id, None)
                        self._stop(sequence_id)
                except Exception:
                    log.exception("checking sequence %s for cancellation failed", sequence_id)

    def abandon(self, sequence_id: int, responses: Iterable, send_error: Callable[[str], None],
                message: str = "request cancelled") -> str:
        """The client went away: stop the generation, let the pipeline close, end the request."""
        self._stop(sequence_id)
        resent = False
        for _ in responses:
            if not resent:  # it may not have reached granite_llm at the first stop: now it has
                self._stop(sequence_id)
                resent = True
        try:
            send_error(message)
        except Exception:
            pass  # nobody is listening; the request still ends
        return "abandoned"


class _Watched:
    """A relay's ``is_cancelled``, asked by the watcher only while the request is open: after its
    final response Triton frees the request's response factory, and asking then crashed
    tritonserver (SIGSEGV in TRITONBACKEND_ResponseFactoryIsCancelled). The relay closes it before
    it sends the final response, waiting for a question in flight."""

    def __init__(self, is_cancelled: Callable[[], bool]):
        self._is_cancelled = is_cancelled
        self._lock = threading.Lock()
        self._open = True

    def cancelled(self) -> bool:
        with self._lock:
            return self._open and self._is_cancelled()

    def close(self) -> None:
        with self._lock:
            self._open = False


def _drain(responses: Iterable) -> None:
    for _ in responses:  # the iterator must reach its end to be let go (see DeferredRelease)
        pass
