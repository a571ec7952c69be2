"""How the Triton adapters (``model_repository/*/1/model.py``) answer: an error, the reply to a
stop request, one response per request of a batch. ``pb_utils`` is passed in (see triton_io)."""

from __future__ import annotations

from typing import Callable, Iterable

from spyre_backend.errors import InvalidRequest
from spyre_backend.serving import triton_io as io

# The finish reason of the reply to a stop request (the turn it stopped ends as "cancelled")
STOPPED = "stopped"


def send_error(pb_utils, sender, message: str) -> None:
    """A decoupled request's final response: the error."""
    sender.send(io.error_response(pb_utils, message), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


def reply_to_stop(pb_utils, sender, names, error: str | None) -> None:
    """A stop request's final response: empty with the finish reason "stopped", else the error.
    ``names``: the outputs the requester asked for (see triton_io.text_response)."""
    if error:
        return send_error(pb_utils, sender, error)
    sender.send(io.text_response(pb_utils, "", STOPPED, 0, 0, names=names),
                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


def answer_each(pb_utils, requests: Iterable, answer: Callable, refused: type[Exception] = InvalidRequest,
                prefix: str = "") -> list:
    """A non-decoupled model's responses, one per request: ``answer(request)``, or an error
    response for what it raises of ``refused`` (its message after ``prefix``)."""
    responses = []
    for request in requests:
        try:
            responses.append(answer(request))
        except refused as exc:
            responses.append(io.error_response(pb_utils, f"{prefix}{exc}"))
    return responses
