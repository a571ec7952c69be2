"""Two real tritonserver replicas behind the real HAProxy on loopback (spyre_backend/server/proxy.py).

Affinity is checked twice over: HAProxy names the replica that answered (``x-served-by``), and a
session's later turns (no START) succeed only on the replica that holds its KV cache.
The tests run in order: the last one kills a replica and brings it back.
"""

from __future__ import annotations

import queue
import time

import httpx
import pytest
import tritonclient.grpc as grpcclient

from spyre_backend.server.child_process import free_port
from spyre_backend.server.proxy import Listen, haproxy_binary
from spyre_backend.server.replicas import ReplicaSet
from spyre_backend.server.triton_process import ServerOptions, TritonServer
from testkit.streaming import to_grpc_inputs
from tests.conftest import CHECKPOINT
from tests.proxied import HELLO, grpc_turn, http_generate

NEXT_TURN = {"text_input": "\n<|user|>\nAnd again.\n<|assistant|>\n", "apply_chat_template": False, "max_tokens": 4}
# Debian's packaged haproxy.cfg cuts idle connections after 50 s (timeout client/server 50000)
DEFAULT_PROXY_IDLE_S = 50


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    haproxy_binary()  # installed by scripts/setup.sh (Debian's haproxy): a missing one fails here, loudly
    logs = tmp_path_factory.mktemp("replicas")
    replicas = [(ServerOptions(checkpoint=CHECKPOINT, http_port=free_port(), grpc_port=free_port(),
                               metrics_port=free_port(), replica_id=f"replica-{i}"), free_port()) for i in range(2)]
    listen = Listen("127.0.0.1", free_port(), free_port(), free_port(), free_port())
    replica_set = ReplicaSet(replicas, listen, logs, check_interval_ms=300)
    try:
        replica_set.start(timeout_s=900)
        yield {"servers": replica_set.servers, "proxy": replica_set.proxy, "logs": logs,
               "grpc": f"127.0.0.1:{listen.grpc_port}", "http": f"127.0.0.1:{listen.http_port}",
               "openai": f"http://127.0.0.1:{listen.openai_port}"}
    finally:
        replica_set.stop()  # the restarted replica too: the last test puts it into servers


def _session(url: str, sequence_id: int, turns: int = 3) -> list[dict]:
    out = []
    for t in range(turns):
        out.append(grpc_turn(url, HELLO if t == 0 else NEXT_TURN, sequence_id=sequence_id,
                             start=t == 0, end=t == turns - 1))
    return out


def test_every_turn_of_a_session_lands_on_one_replica(cluster):
    homes = {}
    for sid in range(101, 109):
        turns = _session(cluster["grpc"], sid)
        assert all(t["error"] is None and t.get("finish_reason") for t in turns), turns  # later turns need its KV
        served = {t["served_by"] for t in turns}
        assert len(served) == 1 and None not in served, turns
        homes[sid] = served.pop()
    assert set(homes.values()) == {"replica-0", "replica-1"}, homes  # the hash spreads sessions


def test_requests_without_the_header_reach_both_replicas(cluster):
    grpc_served = {grpc_turn(cluster["grpc"], HELLO)["served_by"] for _ in range(6)}
    assert grpc_served == {"replica-0", "replica-1"}
    body = {"text_input": "Say hello.", "max_tokens": 4}
    http_served = {http_generate(cluster["http"], body)["served_by"] for _ in range(6)}
    assert http_served == {"replica-0", "replica-1"}
    # with the header, HTTP sticks too
    assert len({http_generate(cluster["http"], body, session_header="user-7")["served_by"] for _ in range(4)}) == 1


def test_a_mismatched_header_is_refused(cluster):
    refused = grpc_turn(cluster["grpc"], HELLO, sequence_id=5, start=True, end=True, session_header="999")
    assert "does not match the request's sequence id (5)" in (refused["error"] or ""), refused
    assert grpc_turn(cluster["grpc"], HELLO, sequence_id=5, start=True, end=True)["error"] is None


def test_openai_requests_follow_their_session_header(cluster):
    body = {"model": CHECKPOINT.resolve().name, "max_tokens": 4,
            "messages": [{"role": "user", "content": "Say hello."}]}
    with httpx.Client(base_url=cluster["openai"], timeout=120) as client:
        stuck = [client.post("/v1/chat/completions", json=body, headers={"x-session-id": "alice"}) for _ in range(4)]
        free = [client.post("/v1/chat/completions", json=body) for _ in range(6)]
    assert all(r.status_code == 200 for r in stuck + free), [r.text for r in stuck + free]
    # the replica's own name (x-replica-id, from the front) agrees with the proxy's (x-served-by)
    assert all(r.headers["x-replica-id"] == r.headers["x-served-by"] for r in stuck + free)
    assert len({r.headers["x-served-by"] for r in stuck}) == 1
    assert {r.headers["x-served-by"] for r in free} == {"replica-0", "replica-1"}


def _ids_on(url: str, replica: str, count: int, start: int) -> list[int]:
    """Fresh session ids that the proxy places on ``replica`` (asked with one-off requests, which
    also record them in the stick table, as a session's first turn would)."""
    found, sid = [], start
    while len(found) < count:
        if grpc_turn(url, HELLO, session_header=str(sid))["served_by"] == replica:
            found.append(sid)
        sid += 1
        assert sid < start + 200, "the hash never chose that replica"
    return found


def test_a_dead_replica_loses_only_its_sessions_and_comes_back(cluster):
    url, proxy = cluster["grpc"], cluster["proxy"]
    victim = cluster["servers"][0]
    doomed, kept_id = _ids_on(url, "replica-0", 1, 1000)[0], _ids_on(url, "replica-1", 1, 2000)[0]
    later_ids = _ids_on(url, "replica-0", 2, 3000)  # placed on replica-0, first used while it is down
    for sid in (doomed, kept_id):
        first = grpc_turn(url, HELLO, sequence_id=sid, start=True)
        assert first["error"] is None and first["served_by"] in ("replica-0", "replica-1"), first

    # a gRPC stream of the surviving session, then left idle for longer than a default proxy timeout
    results: queue.Queue = queue.Queue()
    idle_client = grpcclient.InferenceServerClient(url)
    idle_client.start_stream(callback=lambda result, error: results.put((result, error)),
                             headers={"x-session-id": str(kept_id)})

    def stream_turn(inputs):
        idle_client.async_stream_infer("granite_vision", to_grpc_inputs(inputs), sequence_id=kept_id)
        while True:
            result, error = results.get(timeout=120)
            assert error is None, error
            if result.as_numpy("finish_reason")[0]:
                return result.as_numpy("finish_reason")[0].decode()

    assert stream_turn(NEXT_TURN)
    idle_since = time.monotonic()

    victim.process.kill()  # kill -9 of tritonserver: its stubs follow (orphan watchdog)
    victim.stop()
    proxy.wait_for("replica-0", "DOWN")  # all three backends: the OpenAI front's /health asks Triton

    lost = grpc_turn(url, NEXT_TURN, sequence_id=doomed)
    assert lost["served_by"] == "replica-1", lost
    assert lost["error"] and "session lost: sequence" in lost["error"] and "START" in lost["error"], lost
    kept = grpc_turn(url, NEXT_TURN, sequence_id=kept_id)
    assert kept["error"] is None and kept["served_by"] == "replica-1", kept
    assert grpc_turn(url, HELLO)["error"] is None  # stateless requests go on
    # the lost session restarts (START) and new sessions placed on replica-0 open on the survivor
    restarted = grpc_turn(url, HELLO, sequence_id=doomed, start=True)
    assert restarted["error"] is None and restarted["served_by"] == "replica-1", restarted
    for sid in later_ids:
        opened = grpc_turn(url, HELLO, sequence_id=sid, start=True)
        assert opened["error"] is None and opened["served_by"] == "replica-1", opened

    back = TritonServer(victim.options, log_path=cluster["logs"] / "replica-0-restarted.log").start(timeout_s=900)
    cluster["servers"][0] = back
    proxy.wait_for("replica-0", "UP")
    # sessions started meanwhile stay where they are (the stick table, not the hash, decides)
    for sid in (doomed, *later_ids):
        turn = grpc_turn(url, NEXT_TURN, sequence_id=sid, end=True)
        assert turn["error"] is None and turn["served_by"] == "replica-1", (sid, turn)
    # and replica-0 takes new sessions again
    assert "replica-0" in {grpc_turn(url, HELLO, session_header=str(sid))["served_by"] for sid in range(5000, 5010)}

    # the idle stream still works, after longer than Debian's default proxy timeout
    time.sleep(max(0.0, DEFAULT_PROXY_IDLE_S + 5 - (time.monotonic() - idle_since)))
    assert stream_turn(dict(NEXT_TURN, text_input="\n<|user|>\nOnce more.\n<|assistant|>\n"))
    idle_client.stop_stream()
    idle_client.close()
    assert grpc_turn(url, NEXT_TURN, sequence_id=kept_id, end=True)["error"] is None
