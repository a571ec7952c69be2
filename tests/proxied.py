"""Clients that also read which replica answered behind HAProxy (its ``x-served-by`` header).

tritonclient does not show a gRPC call's initial metadata, so the gRPC helper speaks Triton's
own protocol through the stubs that ship with tritonclient (the request built by tritonclient's
own request builder).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import grpc
from tritonclient.grpc import InferResult, service_pb2_grpc
from tritonclient.grpc._utils import _get_inference_request

from testkit.streaming import to_grpc_inputs

HELLO = {"text_input": "Say hello.", "max_tokens": 6}


def grpc_turn(url: str, inputs: dict, *, sequence_id: int = 0, start: bool = False, end: bool = False,
              session_header: str | None = None, model: str = "granite_vision", timeout: float = 300) -> dict:
    """One request on a gRPC stream: its text, finish reason, error and the replica that served it.
    The x-session-id header is the sequence id unless ``session_header`` says otherwise ("" for none)."""
    header = str(sequence_id) if session_header is None and sequence_id else session_header
    metadata = [("x-session-id", header)] if header else []
    request = _get_inference_request(model_name=model, inputs=to_grpc_inputs(inputs), model_version="",
                                     request_id="", outputs=None, sequence_id=sequence_id, sequence_start=start,
                                     sequence_end=end, priority=0, timeout=None, parameters=None)
    with grpc.insecure_channel(url) as channel:
        call = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(
            iter([request]), metadata=metadata, timeout=timeout)
        out = {"pieces": [], "error": None}
        try:
            for response in call:
                if response.error_message:
                    out["error"] = response.error_message
                    break
                result = InferResult(response.infer_response)
                out["pieces"].append(result.as_numpy("text_output")[0].decode())
                reason = result.as_numpy("finish_reason")[0].decode()
                if reason:
                    out["finish_reason"] = reason
                    break
        except grpc.RpcError as exc:
            out["error"] = f"{exc.code()}: {exc.details()}"
        out["served_by"] = dict(call.initial_metadata() or ()).get("x-served-by")
        call.cancel()
    out["text"] = "".join(out["pieces"])
    return out


def http_generate(http_url: str, body: dict, *, session_header: str | None = None,
                  model: str = "granite_vision", timeout: float = 300) -> dict:
    """POST /v2/models/<model>/generate: the body and the replica that served it."""
    headers = {"Content-Type": "application/json", **({"x-session-id": session_header} if session_header else {})}
    req = urllib.request.Request(f"http://{http_url}/v2/models/{model}/generate", data=json.dumps(body).encode(),
                                 headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return {"body": json.loads(resp.read()), "served_by": resp.headers.get("x-served-by")}
    except urllib.error.HTTPError as exc:
        return {"error": exc.read().decode(), "served_by": exc.headers.get("x-served-by")}
