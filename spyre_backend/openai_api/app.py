"""The OpenAI-compatible HTTP front (FastAPI on uvicorn), beside tritonserver.

    python -m spyre_backend.openai_api.app --triton-url 127.0.0.1:8001 --checkpoint DIR [--port 9000]

``/v1/chat/completions``, ``/v1/completions``, ``/v1/models`` and ``/health``; every request goes
to ``granite_vision`` over gRPC streaming. The launcher starts it (``--openai-port``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from spyre_backend.openai_api.chat_template import ChatTemplate
from spyre_backend.openai_api.media import MediaPolicy
from spyre_backend.openai_api.protocol import (ApiError, Generation, cache_salt, parse_body, parse_chat,
                                               parse_completion, routing_key)
from spyre_backend.openai_api.service import Choice, ClientGone, OpenAIService, new_id, now, usage
from spyre_backend.openai_api.tools import ToolCallStream, assistant_message
from spyre_backend.openai_api.triton_client import TritonGenerator
from spyre_backend.serving.routing import SESSION_HEADER, replica_id

log = logging.getLogger("spyre_backend.openai")


@dataclass
class FrontSettings:
    triton_url: str
    checkpoint: Path
    model_name: str = ""  # default: the checkpoint directory's name
    media: MediaPolicy = MediaPolicy()
    cache_salt_from_user: bool = False  # a request without cache_salt is salted by its user

    @property
    def served_model(self) -> str:
        return self.model_name or Path(self.checkpoint).resolve().name


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def client_gone(request: Request) -> None:
    """Returns when the HTTP client disconnects (its body is read: the next message says so)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class ReplicaHeader:
    """Names the replica that answered (``x-replica-id``) on every HTTP response, for clients and
    operators behind a proxy. Plain ASGI: Starlette's BaseHTTPMiddleware would wrap ``receive``,
    which the disconnect watch reads."""

    def __init__(self, app, replica: str):
        self.app, self.header = app, (b"x-replica-id", replica.encode("latin-1", "replace"))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_named(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), self.header]
            await send(message)

        await self.app(scope, receive, send_named)


def create_app(settings: FrontSettings) -> FastAPI:
    generator = TritonGenerator(settings.triton_url)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        await generator.close()

    app = FastAPI(title="Granite Vision (OpenAI-compatible)", docs_url=None, redoc_url=None, lifespan=lifespan)
    service = OpenAIService(generator, settings.checkpoint, settings.media)
    template = ChatTemplate.from_checkpoint(settings.checkpoint)
    model = settings.served_model
    created = now()
    app.add_middleware(ReplicaHeader, replica=replica_id())

    @app.exception_handler(ApiError)
    async def on_api_error(_request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(Exception)
    async def on_unexpected(_request, exc: Exception):
        log.exception("unexpected error")
        return error_response(ApiError(500, f"internal error in the OpenAI front: {type(exc).__name__}: {exc}"))

    async def require_ready():
        if not await generator.ready():
            raise ApiError(503, "the model is not ready yet (tritonserver is starting or stopped)")

    @app.get("/health")
    async def health():
        if not await generator.ready(fresh=True):
            raise ApiError(503, "the model is not ready yet (tritonserver is starting or stopped)")
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model, "object": "model", "created": created,
                                            "owned_by": "spyre-backend", "root": str(settings.checkpoint)}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = parse_body(await request.body())
        gen = parse_chat(body, template, model)
        gen.session_key = routing_key(request.headers.get(SESSION_HEADER), body.get("user"))
        gen.cache_salt = cache_salt(body, settings.cache_salt_from_user)
        await require_ready()
        return await respond(request, [gen], chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = parse_body(await request.body())
        gens = parse_completion(body, model)
        key = routing_key(request.headers.get(SESSION_HEADER), body.get("user"))
        salt = cache_salt(body, settings.cache_salt_from_user)
        for gen in gens:
            gen.session_key, gen.cache_salt = key, salt
        await require_ready()
        return await respond(request, gens, chat=False)

    async def respond(request: Request, gens: list[Generation], chat: bool):
        first = gens[0]
        rid = new_id("chatcmpl" if chat else "cmpl")
        if not first.stream:
            return await whole(rid, gens, chat, lambda: client_gone(request))
        stream = service.run(gens, lambda: client_gone(request))
        try:  # the first delta before the response starts: a refused request is still an HTTP error
            head = await stream.__anext__()
        except BaseException:
            await stream.aclose()
            raise
        return StreamingResponse(chunks(rid, gens, chat, stream, head), media_type="text/event-stream")

    async def whole(rid: str, gens: list[Generation], chat: bool, gone):
        n = gens[0].n
        choices: dict[int, Choice] = {}
        async for choice, _ in service.run(gens, gone):
            choices[choice.index] = choice
        ordered = [choices[i] for i in sorted(choices)]
        body = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": now(),
                "model": model, "choices": [], "usage": usage(ordered, n)}
        for c in ordered:
            text = "".join(c.text)
            logprobs = None
            if gens[0].logprobs is not None:
                logprobs = service.chat_logprobs(c.logprobs) if chat else service.completion_logprobs(c.logprobs)
            if chat:  # with tools, the answer may be tool calls
                message, reason = assistant_message(gens[0].tools, text, c.finish_reason)
                body["choices"].append({"index": c.index, "message": message, "logprobs": logprobs,
                                        "finish_reason": reason})
            else:
                body["choices"].append({"index": c.index, "text": text, "logprobs": logprobs,
                                        "finish_reason": c.finish_reason})
        return JSONResponse(body)

    async def chunks(rid: str, gens: list[Generation], chat: bool, stream, head):
        first, created_at = gens[0], now()
        kind = "chat.completion.chunk" if chat else "text_completion"
        include_usage = first.include_usage
        seen: dict[int, Choice] = {}
        offsets: dict[int, int] = {}
        tool_streams: dict[int, ToolCallStream] = {}  # with tools: each choice's text that may be a call

        def chunk(choices: list[dict], delta=None) -> str:
            body = {"id": rid, "object": kind, "created": created_at, "model": model, "choices": choices}
            if first.continuous_usage and delta is not None:  # this choice's counts so far
                body["usage"] = {"prompt_tokens": delta.num_input_tokens, "completion_tokens": delta.num_output_tokens,
                                 "total_tokens": delta.num_input_tokens + delta.num_output_tokens}
            elif include_usage:
                body["usage"] = None
            return sse(body)

        def pieces(choice: Choice, delta) -> list[dict]:
            logprobs = None
            if first.logprobs is not None and delta.logprobs:
                if chat:
                    logprobs = service.chat_logprobs(delta.logprobs)
                else:
                    logprobs = service.completion_logprobs(delta.logprobs, offsets.get(choice.index, 0))
            offsets[choice.index] = offsets.get(choice.index, 0) + len(delta.text)
            if not chat:
                return [{"index": choice.index, "text": delta.text, "logprobs": logprobs,
                         "finish_reason": delta.finish_reason or None}]
            text, calls, reason = delta.text, [], delta.finish_reason
            if first.tools is not None:  # text, or tool-call deltas
                tool_stream = tool_streams.setdefault(choice.index, ToolCallStream(first.tools))
                text, calls = tool_stream.feed(text)
                if reason:
                    rest, more, reason = tool_stream.finish(reason)
                    text, calls = text + rest, calls + more
            out = []
            if text or not (reason or first.tools):
                out.append({"index": choice.index, "delta": {"content": text}, "logprobs": logprobs,
                            "finish_reason": None})
            if calls:
                out.append({"index": choice.index, "delta": {"tool_calls": calls}, "logprobs": None,
                            "finish_reason": None})
            if reason:  # OpenAI's last chunk of a choice: an empty delta and the reason
                out.append({"index": choice.index, "delta": {}, "logprobs": None, "finish_reason": reason})
            return out

        try:
            if chat:  # the role first, for every choice
                total = sum(g.n for g in gens)
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for i in range(total)])
            pending = [head]
            while True:
                for choice, delta in pending:
                    seen[choice.index] = choice
                    for part in pieces(choice, delta):
                        yield chunk([part], delta)
                try:
                    pending = [await stream.__anext__()]
                except StopAsyncIteration:
                    break
            if include_usage:
                ordered = [seen[i] for i in sorted(seen)]
                yield sse({"id": rid, "object": kind, "created": created_at, "model": model, "choices": [],
                           "usage": usage(ordered, first.n)})
        except ClientGone:  # (uvicorn drops what is sent after a disconnect without raising)
            return
        except ApiError as exc:  # after the stream began: an error event, as vLLM sends
            yield sse(exc.body())
        finally:
            await stream.aclose()
        yield sse("[DONE]")

    return app


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    p = argparse.ArgumentParser(description="OpenAI-compatible front for Granite Vision on Triton")
    p.add_argument("--triton-url", default="127.0.0.1:8001", help="tritonserver's gRPC address")
    p.add_argument("--checkpoint", type=Path, required=True, help="the served checkpoint (template, tokenizer)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--served-model-name", default="", help="model id clients send (default: checkpoint dir name)")
    p.add_argument("--allowed-media-domains", default="",
                   help="comma-separated domains whose http(s) image URLs are fetched (default: none)")
    p.add_argument("--allow-private-media-addresses", action="store_true",
                   help="let allowed image URLs resolve to private, loopback or link-local addresses")
    p.add_argument("--cache-salt-from-user", action="store_true",
                   help="salt a request's caches by its OpenAI user when it sends no cache_salt (tenants share none)")
    a = p.parse_args(argv)
    media = MediaPolicy.from_text(a.allowed_media_domains, allow_private_addresses=a.allow_private_media_addresses)
    app = create_app(FrontSettings(a.triton_url, a.checkpoint, a.served_model_name, media, a.cache_salt_from_user))
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning", timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
