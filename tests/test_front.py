"""The granite_vision front's relay without Triton: fakes stand in for the BLS stream and the client."""

from __future__ import annotations

import time

import pytest

from spyre_backend.serving.front import FrontService, ResponseKind


class Client:
    def __init__(self, gone_after: int | None = None):
        self.sent, self.errors, self.gone_after = [], [], gone_after

    def forward(self, response, last):
        if self.gone_after is not None and len(self.sent) >= self.gone_after:
            raise RuntimeError("client disconnected")
        self.sent.append((response, last))

    def send_error(self, message):
        self.errors.append(message)


def stream(items, read):
    for item in items:
        read.append(item)
        yield item


def kind(item):
    return {"err": ResponseKind(error="boom"), "empty": ResponseKind(empty=True),
            "last": ResponseKind(last=True)}.get(item, ResponseKind())


def make(stops):
    return FrontService(2, stop=stops.append, stop_with_reply=lambda sid, end: None if sid == 5 else "nothing open")


def test_relays_every_response_and_reads_the_stream_to_its_end():
    stops, read, client = [], [], Client()
    front = make(stops)
    items = ["a", "b", "empty", "last", "empty"]
    how = front.relay(stream(items, read), 9, kind=kind, forward=client.forward, send_error=client.send_error,
                      is_cancelled=lambda: False)
    assert how == "done" and read == items  # the closing response is read too
    assert client.sent == [("a", False), ("b", False), ("last", True)] and not client.errors and not stops


def test_an_error_response_ends_the_request_with_it():
    stops, read, client = [], [], Client()
    how = make(stops).relay(stream(["a", "err", "empty"], read), 9, kind=kind, forward=client.forward,
                            send_error=client.send_error, is_cancelled=lambda: False)
    assert how == "error" and client.errors == ["boom"] and read == ["a", "err", "empty"]


def test_a_client_gone_mid_stream_stops_the_generation_twice_and_drains():
    stops, read, client = [], [], Client(gone_after=1)
    how = make(stops).relay(stream(["a", "b", "c", "last"], read), 9, kind=kind, forward=client.forward,
                            send_error=client.send_error, is_cancelled=lambda: False)
    assert how == "abandoned" and read == ["a", "b", "c", "last"]
    assert stops == [9, 9]  # once at once, once more after the pipeline answered (it had reached granite_llm)
    assert client.errors == ["request cancelled"]


def test_cancellation_is_noticed_between_responses():
    stops, read, client = [], [], Client()

    def slow(items):
        for item in items:
            time.sleep(0.06)  # past the cancellation poll interval
            read.append(item)
            yield item

    how = make(stops).relay(slow(["a", "b", "c", "last"]), 3, kind=kind, forward=client.forward,
                            send_error=client.send_error, is_cancelled=lambda: True)
    assert how == "abandoned" and stops and stops[0] == 3 and read == ["a", "b", "c", "last"]
    assert len(client.sent) < 4 and client.errors == ["request cancelled"]


def test_a_stream_without_a_final_response_is_an_error():
    stops, read, client = [], [], Client()
    how = make(stops).relay(stream(["a"], read), 1, kind=kind, forward=client.forward,
                            send_error=client.send_error, is_cancelled=lambda: False)
    assert how == "truncated" and "without a final response" in client.errors[0]


def test_sequence_ids_and_stops():
    front = make([])
    assert front.sequence_for(42, 1, 3) == (42, 1)  # the client's own sequence and flags
    a, b = front.sequence_for(0, 0, 3), front.sequence_for(0, 0, 3)
    assert a[1] == b[1] == 3 and a[0] != b[0] and a[0] > 1 << 62
    assert front.stop(0, True) == "a stop request needs the sequence id of the turn to stop"
    assert front.stop(5, True) is None and front.stop(6, False) == "nothing open"
    assert front.pipeline_starts.acquire(blocking=False) and front.pipeline_starts.acquire(blocking=False)
    assert not front.pipeline_starts.acquire(blocking=False)  # max_pipeline_starts=2
    with pytest.raises(ValueError, match="max_pipeline_starts"):
        FrontService(0)


def test_configuration_from_the_model_config(monkeypatch):
    config = {"parameters": {"max_pipeline_starts": {"string_value": "3"}}}
    assert FrontService.from_model_config(config).pipeline_starts._initial_value == 3
    monkeypatch.setenv("SPYRE_MAX_PIPELINE_STARTS", "0")
    with pytest.raises(ValueError, match="'max_pipeline_starts'"):
        FrontService.from_model_config(config)


def test_a_silent_stream_is_stopped_when_its_client_cancels():
    """No response arrives while the client goes away (a long prefill, tokens without text): the
    watcher stops the sequence all the same, and the relay ends when the pipeline closes."""
    import threading

    stops, client = [], Client()
    front = make(stops)
    front.watch_interval_s = 0.01
    gone = threading.Event()
    stopped = threading.Event()

    def silent():
        gone.set()  # the client cancels while nothing is streaming
        assert wait(lambda: stops == [9]), stops
        stopped.set()
        yield "last"

    def wait(predicate, timeout=5.0):
        deadline = time.monotonic() + timeout
        while not predicate() and time.monotonic() < deadline:
            time.sleep(0.005)
        return predicate()

    how = front.relay(silent(), 9, kind=kind, forward=client.forward, send_error=client.send_error,
                      is_cancelled=gone.is_set)
    assert stopped.is_set() and how in ("done", "abandoned")
    assert not front._watched  # nothing left to watch


def test_the_watcher_never_asks_after_the_final_response():
    """Asking a finished request crashed tritonserver (its response factory is freed)."""
    import threading

    stops, client = [], Client()
    front = make(stops)
    front.watch_interval_s = 0.001
    finished = threading.Event()
    late = []

    def is_cancelled():
        if finished.is_set():
            late.append(True)
        time.sleep(0.002)  # a question in flight while the relay sends the final response
        return False

    def forward(response, last):
        client.forward(response, last)
        if last:
            finished.set()

    for sequence_id in range(20):
        finished.clear()
        front.relay(iter(["a", "b", "last"]), sequence_id, kind=kind, forward=forward,
                    send_error=client.send_error, is_cancelled=is_cancelled)
        time.sleep(0.005)
    assert not late and not stops
