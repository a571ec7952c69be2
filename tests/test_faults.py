"""Faults, on servers of their own (the session server is shared): a model's stub process dies,
the server restarts; and the API restriction flags docs/operations.md documents.

Triton 2.51's Python backend does not restart a dead stub: that model answers "not healthy"
until the server restarts, while every other model keeps serving.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.error
import urllib.request

import pytest

from spyre_backend.server.child_process import free_port
from spyre_backend.server.triton_process import ServerOptions, TritonServer
from testkit.streaming import grpc_stream

HELLO = {"text_input": "Say hello.", "apply_chat_template": True, "max_tokens": 24, "stream": True}
ADMIN_KEY = "test-admin-key"


@pytest.fixture(scope="module")
def restricted_server(checkpoint, tmp_path_factory):
    """A server whose model-repository API needs a key; tests may replace it by a restarted one."""
    logs = tmp_path_factory.mktemp("faults")
    options = ServerOptions(checkpoint=checkpoint, http_port=free_port(), grpc_port=free_port(),
                            metrics_port=free_port(),
                            extra_args=[f"--http-restricted-api=model-repository:admin-key={ADMIN_KEY}"])
    holder = {"server": TritonServer(options, log_path=logs / "server.log").start(timeout_s=600), "logs": logs}
    yield holder
    holder["server"].stop()


def _alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def http_status(url: str, headers: dict | None = None) -> int:
    request = urllib.request.Request(url, data=b"{}", headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_repository_api_needs_the_admin_key_and_unload_is_refused(restricted_server):
    base = f"http://{restricted_server['server'].http_url}/v2/repository"
    assert http_status(f"{base}/index") == 403
    assert http_status(f"{base}/index", {"admin-key": ADMIN_KEY}) == 200
    # Even with the key, model control is off: nothing can be unloaded.
    assert http_status(f"{base}/models/granite_llm/unload", {"admin-key": ADMIN_KEY}) != 200
    assert grpc_stream(restricted_server["server"].grpc_url, HELLO).get("text")  # inference is open


def test_a_dead_stub_fails_clearly_and_a_restart_recovers(restricted_server):
    server = restricted_server["server"]
    answer = grpc_stream(server.grpc_url, HELLO)
    assert answer.get("text"), answer
    # A session is open when things go wrong.
    first_turn = grpc_stream(server.grpc_url, HELLO, sequence_id=4242, sequence_start=True)
    assert first_turn.get("text") == answer["text"], first_turn

    front = server.stub_pids()["granite_vision"]
    os.kill(front, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{front}") and time.monotonic() < deadline:
        time.sleep(0.1)

    failed = grpc_stream(server.grpc_url, HELLO, timeout=60)
    assert "not healthy" in failed.get("error", ""), failed
    # Everything else still serves: the ensemble behind the front gives the same answer.
    direct = grpc_stream(server.grpc_url, HELLO, model="granite_vision_ensemble", sequence_id=4243,
                         sequence_start=True, sequence_end=True)
    assert direct.get("text") == answer["text"], direct

    # tritonserver itself crashes: its stubs must not live on as orphans (they did after a SIGSEGV)
    stubs = list(server.stub_pids().values())
    assert len(stubs) == 3, stubs  # the front's was killed above
    busy = threading.Thread(target=grpc_stream, daemon=True, args=(server.grpc_url, dict(
        HELLO, max_tokens=3000, sampling_parameters='{"ignore_eos": true}')), kwargs={
        "model": "granite_vision_ensemble", "sequence_id": 4244, "sequence_start": True, "sequence_end": True})
    busy.start()  # the LLM's stub is generating when tritonserver dies
    time.sleep(2)
    server.process.kill()
    assert server.stop() == -signal.SIGKILL
    deadline = time.monotonic() + 30
    while any(map(_alive, stubs)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(map(_alive, stubs)), [p for p in stubs if _alive(p)]
    restarted = TritonServer(server.options, log_path=restricted_server["logs"] / "restarted.log")
    restricted_server["server"] = restarted.start(timeout_s=600)
    assert grpc_stream(restarted.grpc_url, HELLO).get("text") == answer["text"]
    # The session died with the old server: Triton's sequence batcher no longer knows the id, and
    # its next turn is told that the session was lost and must start again.
    second_turn = grpc_stream(restarted.grpc_url, HELLO, sequence_id=4242)
    assert "session lost: sequence 4242" in second_turn.get("error", "") and "START" in second_turn["error"], second_turn
