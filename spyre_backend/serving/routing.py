"""Session routing across replicas: the ``x-session-id`` header and what a replica says about it.

A session's KV blocks live in one replica, and Triton carries the sequence id inside the request
body, where no proxy looks. Clients that use sessions therefore also send the id as the header
``x-session-id`` (gRPC metadata, HTTP header); HAProxy routes by it (``server/proxy.py``).
tritonserver runs with ``--grpc-header-forward-pattern`` / ``--http-header-forward-pattern``, which
turn the header into a request parameter, and the ``granite_vision`` front refuses a request whose
header names another session than its sequence id: such a request would be routed by one id and
served as another. A header without a sequence id is a routing key only (the OpenAI front sends
its ``user`` that way, so a user's requests meet their prefix cache on one replica).
"""

from __future__ import annotations

import json
import os
import socket

from spyre_backend.errors import SESSION_LOST

SESSION_HEADER = "x-session-id"
REPLICA_ENV = "SPYRE_REPLICA_ID"
# Triton's own refusal of a turn without START for a sequence its sequence batcher does not know
_TRITON_NEEDS_START = "must specify the START flag"


def replica_id() -> str:
    """This replica's name: SPYRE_REPLICA_ID (the launcher's --replica-id, a pod's name), else the host name."""
    return os.environ.get(REPLICA_ENV) or socket.gethostname()


def header_forward_args() -> list[str]:
    """The tritonserver flags that make the header a request parameter, on both protocols."""
    return [f"--grpc-header-forward-pattern={SESSION_HEADER}", f"--http-header-forward-pattern=(?i){SESSION_HEADER}"]


def session_header(parameters: str | dict | None) -> str | None:
    """The forwarded header's value among a request's parameters (JSON as the Python backend gives
    them); None when the request has none. HTTP header names may come in any case."""
    if isinstance(parameters, str):
        try:
            parameters = json.loads(parameters) if parameters else {}
        except ValueError:
            return None
    for key, value in (parameters or {}).items():
        if key.lower() == SESSION_HEADER:
            text = str(value).strip()
            return text or None
    return None


def header_mismatch(correlation_id, header: str | None) -> str | None:
    """The error for a request whose header and sequence id disagree; None when they agree, or
    when either is absent."""
    if header is None or not correlation_id or str(correlation_id) == header:
        return None
    return (f"the {SESSION_HEADER} header ({header!r}) does not match the request's sequence id "
            f"({correlation_id}): the proxy routes a session by the header, so send its sequence id there")


def explain_lost_session(message: str, sequence_id) -> str:
    """Triton's refusal of a turn of an unknown sequence, as the client should read it: the session
    is not on this replica (it died or restarted, or the session ended), and must be restarted."""
    if _TRITON_NEEDS_START not in message:
        return message
    return lost_session_message(sequence_id, "its replica stopped or restarted, or the session ended")


def lost_session_message(sequence_id, why: str) -> str:
    return (f"{SESSION_LOST} sequence {sequence_id} is not open on replica {replica_id()!r} ({why}); "
            f"restart it: resend the whole conversation with START (sequence_start)")


def is_lost_session(message: str) -> bool:
    return SESSION_LOST in message  # also behind a prefix such as "granite_vision: "
