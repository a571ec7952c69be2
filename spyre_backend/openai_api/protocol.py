"""OpenAI request bodies -> what the front sends to ``granite_vision``, with OpenAI-shaped errors.

Bodies are read as plain JSON (not pydantic models) so that every refusal is a 400 that names the
parameter, the limit and the value, as the Triton path does. Sampling values are checked with the
same ``SamplingParams.validate`` that ``granite_llm`` runs, so both APIs refuse the same things.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from spyre_backend.engine.sampling_params import MAX_LOGPROBS, SamplingParams, check_json_depth
from spyre_backend.engine.structured_request import FORMS as STRUCTURED_FORMS
from spyre_backend.engine.structured_request import structured_from
from spyre_backend.errors import InvalidRequest
from spyre_backend.openai_api.chat_template import ChatTemplate
from spyre_backend.openai_api.documents import MediaParts, media_options
from spyre_backend.openai_api.tools import TOOL_CALL, Tools, parse_tools, template_message

MAX_N = 16  # choices per request: each one is a sequence of its own in the engine
MAX_BODY_DEPTH = 64  # chat bodies nest 5 deep, a JSON schema in them up to max_schema_depth (32) more

# OpenAI parameters we understand but do not implement: refused when set, never silently ignored
UNSUPPORTED = ("functions", "function_call", "logit_bias", "suffix", "best_of",
               "echo", "prediction", "audio", "modalities")
ROLES = ("system", "developer", "user", "assistant", "tool")  # developer is OpenAI's newer name for system
CHAT_ONLY = ("tools", "tool_choice", "parallel_tool_calls")  # refused on /v1/completions


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or {400: "invalid_request_error", 404: "not_found_error", 409: "invalid_request_error",
                             503: "service_unavailable"}.get(status, "internal_server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def routing_key(header: str | None, user) -> str:
    """The key a proxy routes this client by: the x-session-id header, else the body's ``user``.
    Passed on as gRPC metadata, which must be short printable ASCII: anything else goes as its hash."""
    key = header or (user if isinstance(user, str) else "") or ""
    if key and not (len(key) <= 128 and key.isascii() and key.isprintable()):
        key = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return key


def cache_salt(body: dict, from_user: bool) -> str:
    """The request's tenant (vLLM's ``cache_salt``): its caches are shared only within it. Without
    one, the OpenAI ``user`` when the operator says so (``--cache-salt-from-user``), as its hash."""
    salt = body.get("cache_salt")
    if salt is not None and (not isinstance(salt, str) or not salt or len(salt) > 1024):
        raise bad("cache_salt must be a non-empty string of at most 1024 characters", "cache_salt")
    user = body.get("user")
    if salt is None and from_user and isinstance(user, str) and user:
        salt = "user:" + hashlib.sha256(user.encode("utf-8", "surrogatepass")).hexdigest()
    return salt or ""


def bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param)


def parse_body(raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")
        check_json_depth(text, MAX_BODY_DEPTH, "the request body")
        body = json.loads(text)
    except InvalidRequest as exc:
        raise bad(str(exc)) from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    return body


@dataclass
class Generation:
    """One prompt to generate ``n`` choices for."""

    prompt: str  # the text granite_vision receives, chat template applied, one <image> per image
    image_urls: list[str]  # data: URIs or http(s) URLs, in prompt order
    sampling: dict  # sampling_parameters JSON (max_tokens None: what the context leaves)
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # top alternatives per token, when logprobs were asked for
    model: str = ""
    continuous_usage: bool = False  # vLLM's stream_options.continuous_usage_stats: usage on every chunk
    session_key: str = ""  # x-session-id or the request's user: the routing key passed on (serving/routing.py)
    tools: Tools | None = None  # the request's tools: its answers may be tool calls (openai_api/tools.py)
    media: MediaParts = field(default_factory=MediaParts)  # its file parts (PDFs) and media uuids
    media_options: str = ""  # the mm_processor_kwargs JSON (openai_api/documents.py)
    cache_salt: str = ""  # the tenant whose caches it may use (``cache_salt``)


def _typed(body: dict, name: str, kinds, what: str):
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, kinds) or (isinstance(value, bool) and kinds is not bool):  # True is an int too
        raise bad(f"{name} must be {what}, got {value!r}", name)
    return value


def sampling_from(body: dict, logprobs: int | None) -> dict:
    """The sampling_parameters JSON for granite_llm, checked here first."""
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    values: dict = {"max_tokens": max_tokens}
    for name in ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
                 "repetition_penalty", "min_tokens", "ignore_eos", "stop", "stop_token_ids"):
        if body.get(name) is not None:
            values[name] = body[name]
    if values.get("temperature") is None:
        values["temperature"] = 1.0  # OpenAI's default (vLLM's too when the checkpoint sets none)
    if logprobs is not None:
        values["logprobs"] = logprobs
    form = next((name for name in STRUCTURED_FORMS if body.get(name) is not None), None)
    if form is not None:  # response_format, structured_outputs or guided_*: checked here, compiled by granite_llm
        try:
            structured = structured_from({name: body.get(name) for name in STRUCTURED_FORMS})
            if structured is not None:
                SamplingParams(structured_outputs=structured).validate()
                values["structured_outputs"] = structured
        except InvalidRequest as exc:
            raise bad(str(exc), form) from None
    probe = {name: value for name, value in values.items() if name != "structured_outputs"}
    if max_tokens is None:  # granite_llm resolves it to what the context leaves; probe with a valid value
        min_tokens = values.get("min_tokens", 0)
        probe["max_tokens"] = max(1, min_tokens) if isinstance(min_tokens, int) else 1
    try:
        SamplingParams(**probe).validate()
    except InvalidRequest as exc:
        message, name = str(exc), str(exc).split(" ", 1)[0]
        if name == "max_tokens":
            message, name = message.replace("max_tokens", param, 1), param
        raise bad(message, name) from None
    except TypeError as exc:
        raise bad(f"invalid sampling parameter: {exc}") from None
    if isinstance(values.get("stop"), str):
        values["stop"] = [values["stop"]]
    return values


def _common(body: dict, served_model: str) -> tuple[int, bool, dict]:
    for name in UNSUPPORTED:
        if body.get(name) not in (None, False, [], {}):
            raise bad(f"{name} is not supported by this server", name)
    model = body.get("model")
    if model is not None and model != served_model:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {served_model!r}",
                       "model", "model_not_found")
    n = _typed(body, "n", int, "an integer") or 1
    if not 1 <= n <= MAX_N:
        raise bad(f"n must be in [1, {MAX_N}], got {n}", "n")
    stream = bool(_typed(body, "stream", bool, "a boolean"))
    options = _typed(body, "stream_options", dict, "an object") or {}
    if options and not stream:
        raise bad("stream_options is only allowed with stream: true", "stream_options")
    _typed(body, "user", str, "a string")
    return n, stream, {"include_usage": bool(options.get("include_usage", False)),
                       "continuous_usage": bool(options.get("continuous_usage_stats", False))}


def _content_parts(content, where: str, media: MediaParts) -> tuple[list[dict] | str, list[str]]:
    """A message's content as the template's parts, and its image URLs in order ("" for an image
    named by its uuid alone); its PDFs and uuids go to ``media``."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise bad(f"{where}.content must be a string or a list of content parts", f"{where}.content")
    parts, urls = [], []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise bad(f"{at} must be an object with a 'type'", at)
        if part["type"] == "text":
            if not isinstance(part.get("text"), str):
                raise bad(f"{at}.text must be a string", f"{at}.text")
            parts.append({"type": "text", "text": part["text"]})
        elif part["type"] == "image_url":
            urls.append(media.image(part, at, bad))
            parts.append({"type": "image"})
        elif part["type"] == "file":
            parts.append(media.add(part, at, bad))
        else:
            raise bad(f"{at}: content part type {part['type']!r} is not supported (text, image_url, file)",
                      f"{at}.type")
    return parts, urls


def parse_chat(body: dict, template: ChatTemplate, served_model: str) -> Generation:
    n, stream, usage = _common(body, served_model)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list", "messages")
    rendered, urls, media = [], [], MediaParts()
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad(f"{where} must be an object", where)
        role = message.get("role")
        if role not in ROLES:
            raise bad(f"{where}.role must be one of {list(ROLES)}, got {role!r}", f"{where}.role")
        content, images = _content_parts(message.get("content") or "", where, media)
        try:
            extra = template_message(message, where)  # earlier tool calls, a tool's answer
        except InvalidRequest as exc:
            raise bad(str(exc), where) from None
        rendered.append({"role": "system" if role == "developer" else role, "content": content, **extra})
        urls.extend(images)
    want_logprobs = _typed(body, "logprobs", bool, "a boolean")
    top = _typed(body, "top_logprobs", int, "an integer")
    if top is not None and not want_logprobs:
        raise bad("top_logprobs needs logprobs: true", "top_logprobs")
    if top is not None and not 0 <= top <= MAX_LOGPROBS:
        raise bad(f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {top}", "top_logprobs")
    logprobs = (top or 0) if want_logprobs else None
    try:
        tools = parse_tools(body)
    except InvalidRequest as exc:
        raise bad(str(exc), "tool_choice" if str(exc).startswith("tool_choice") else "tools") from None
    try:
        prompt = template.render(rendered, add_generation_prompt=True, tools=tools and tools.definitions)
    except Exception as exc:  # the checkpoint's template refuses (e.g. roles out of order)
        raise bad(f"the chat template refused the messages: {exc}", "messages") from None
    sampling = sampling_from(body, logprobs)
    if tools is not None and tools.forced:  # the answer is a call list, held by its grammar
        if "structured_outputs" in sampling:
            raise bad("tool_choice required or a named function cannot go with another structured output",
                      "tool_choice")
        prompt += TOOL_CALL
        sampling["structured_outputs"] = tools.structured_outputs()
    return Generation(prompt, urls, sampling, n, stream, logprobs=logprobs, model=served_model, tools=tools,
                      media=media, media_options=media_options(body, media, bad), **usage)


def parse_completion(body: dict, served_model: str) -> list[Generation]:
    n, stream, usage = _common(body, served_model)
    for name in CHAT_ONLY:
        if body.get(name) not in (None, []):
            raise bad(f"{name} is only supported on /v1/chat/completions", name)
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise bad("prompt must be a string or a non-empty list of strings (token ids are not supported)", "prompt")
    if len(prompts) * n > MAX_N:
        raise bad(f"{len(prompts)} prompts x n={n} is over the limit of {MAX_N} choices", "prompt")
    logprobs = _typed(body, "logprobs", int, "an integer")
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise bad(f"logprobs must be in [0, {MAX_LOGPROBS}], got {logprobs}", "logprobs")
    sampling = sampling_from(body, logprobs)
    return [Generation(p, [], sampling, n, stream, logprobs=logprobs, model=served_model, **usage) for p in prompts]
