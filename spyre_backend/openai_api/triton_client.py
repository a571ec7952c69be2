"""One generation through ``granite_vision`` over Triton's gRPC stream (tritonclient's asyncio client).

Each generation is a stream of its own: cancelling it (the HTTP client went away) cancels the gRPC
call, which the ``granite_vision`` front turns into a stop of the sequence in ``granite_llm``.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import AsyncIterator

import grpc
import tritonclient.grpc.aio as grpcaio
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException

from spyre_backend.errors import IMAGE_NOT_CACHED
from spyre_backend.openai_api.protocol import ApiError
from spyre_backend.protocol import GENERATION_OUTPUTS
from spyre_backend.protocol.client import finish_and_counts, infer_inputs
from spyre_backend.serving.routing import SESSION_HEADER, is_lost_session

MODEL = "granite_vision"
# only what is read: each output is a tensor in every response, through every process it crosses
WITHOUT_LOGPROBS = [InferRequestedOutput(t.name) for t in GENERATION_OUTPUTS if t.name != "logprobs"]
WITH_LOGPROBS = [*WITHOUT_LOGPROBS, InferRequestedOutput("logprobs")]

# Triton's own failures and the pipeline's internal ones; every other error is the request's fault
_SERVER_FAULTS = ("internal error", "granite_vision:", "Stub process", "not healthy", "without a final response",
                  "unknown model", "is not ready")


def error_for(message: str) -> ApiError:
    """A pipeline error as an OpenAI error: the server's own faults are 500s, the rest 400s."""
    if is_lost_session(message):  # the session's state is gone from this replica: the client must restart it
        return ApiError(409, message, code="session_lost")
    if IMAGE_NOT_CACHED in message:  # a uuid without its image, which this server no longer holds: resend it
        return ApiError(409, message, code=IMAGE_NOT_CACHED)
    if "failed to connect" in message.lower() or "unavailable" in message.lower():
        return ApiError(503, f"the inference server is not reachable: {message}")
    if any(fault in message for fault in _SERVER_FAULTS):
        return ApiError(500, message)
    return ApiError(400, message)


@dataclass
class Delta:
    text: str
    finish_reason: str  # "" until the last response
    num_input_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    num_image_tokens: int = 0
    logprobs: list[dict] = field(default_factory=list)


def request_inputs(prompt: str, images: list[bytes], sampling: dict, documents: list[bytes] = (),
                   media_options: str = "", image_uuids: list[str] = (), document_uuids: list[str] = (),
                   cache_salt: str = "") -> list[InferInput]:
    values = {"text_input": prompt, "stream": True, "exclude_input_in_output": True,
              "sampling_parameters": json.dumps(sampling)}
    if images:
        values["image"] = images
    if documents:
        values["document"] = list(documents)
    if media_options:
        values["mm_processor_kwargs"] = media_options
    if image_uuids:
        values["image_uuid"] = list(image_uuids)
    if document_uuids:
        values["document_uuid"] = list(document_uuids)
    if cache_salt:
        values["cache_salt"] = cache_salt
    return infer_inputs(values)


class TritonGenerator:
    def __init__(self, url: str):
        self.url = url
        self._client: grpcaio.InferenceServerClient | None = None
        self._ready = False

    @property
    def client(self) -> grpcaio.InferenceServerClient:
        if self._client is None:  # created inside the running event loop (uvicorn's)
            self._client = grpcaio.InferenceServerClient(self.url)
        return self._client

    async def ready(self, fresh: bool = False) -> bool:
        """Whether granite_vision is ready: asked once and remembered for requests (a failure
        forgets it); ``fresh`` asks again, for health checks (a proxy must see a dead server)."""
        if fresh or not self._ready:
            try:
                self._ready = await self.client.is_model_ready(MODEL, client_timeout=2.0)
            except InferenceServerException:
                self._ready = False
        return self._ready

    async def generate(self, prompt: str, images: list[bytes], sampling: dict,
                       session_key: str = "", media: dict | None = None) -> AsyncIterator[Delta]:
        """Yields the text deltas; the last one has the finish reason and the token counts.
        ``session_key`` goes on as the x-session-id metadata (a routing key: no sequence id); ``media``
        holds ``request_inputs``' documents and media_options."""
        done = asyncio.Event()

        async def one_request():
            yield {"model_name": MODEL, "inputs": request_inputs(prompt, images, sampling, **(media or {})),
                   "outputs": WITH_LOGPROBS if sampling.get("logprobs") is not None else WITHOUT_LOGPROBS}
            await done.wait()  # keep our side of the stream open until the last response

        responses = self.client.stream_infer(one_request(), headers={SESSION_HEADER: session_key} if session_key else None)
        finished = False
        try:
            async for result, error in responses:
                if error is not None:
                    raise error_for(error.message())
                delta = Delta(text=result.as_numpy("text_output")[0].decode("utf-8"), **finish_and_counts(result))
                raw = result.as_numpy("logprobs")
                if raw is not None and raw[0]:
                    delta.logprobs = json.loads(raw[0])
                if delta.finish_reason:
                    finished = True
                yield delta
                if finished:
                    return
            raise ApiError(500, "the inference server closed the stream without a final response")
        except InferenceServerException as exc:
            self._ready = False
            raise error_for(exc.message()) from None
        except grpc.RpcError as exc:
            self._ready = False
            raise error_for(f"{exc.code()}: {exc.details()}") from None
        finally:
            done.set()
            if not finished:  # cancelled, or the consumer stopped early: granite_vision stops the sequence
                responses.cancel()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
