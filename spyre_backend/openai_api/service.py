"""Runs parsed OpenAI requests through granite_vision and shapes OpenAI responses and stream chunks.

Each choice (``n``, several completion prompts) is a generation of its own; their deltas are
merged into one stream in arrival order. Images are resolved once per prompt, before any choice
starts: data: URIs pass through as they are (``preprocess`` decodes them), http(s) URLs are fetched
under the operator's media policy.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

from tokenizers import Tokenizer

from spyre_backend.openai_api.media import MediaError, MediaPolicy, fetch_image
from spyre_backend.openai_api.protocol import ApiError, Generation
from spyre_backend.openai_api.triton_client import Delta, TritonGenerator


class ClientGone(ApiError):
    def __init__(self):
        super().__init__(499, "the client closed the connection")


@dataclass
class Choice:
    index: int
    text: list[str] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    num_input_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    num_image_tokens: int = 0


class OpenAIService:
    def __init__(self, generator: TritonGenerator, checkpoint: Path, media: MediaPolicy):
        self.generator = generator
        self.media = media
        self.tokenizer = Tokenizer.from_file(str(Path(checkpoint) / "tokenizer.json"))

    async def images(self, urls: list[str]) -> list[bytes]:
        out = []
        for i, url in enumerate(urls):
            if not url:  # named by its uuid alone: preprocess has it, or answers image_not_cached
                out.append(b"")
            elif url[:5].lower() == "data:":
                out.append(url.encode())
            elif url[:7].lower() == "http://" or url[:8].lower() == "https://":
                try:
                    out.append(await fetch_image(url, self.media, i))
                except MediaError as exc:
                    raise ApiError(400, str(exc), "messages") from None
            else:
                raise ApiError(400, f"image {i}: the url must be a data: URI or an http(s) URL, got "
                                    f"{url[:40]!r}", "messages")
        return out

    async def run(self, generations: list[Generation], client_gone=None) -> AsyncIterator[tuple[Choice, Delta]]:
        """All choices of all prompts, merged: (choice, delta) as each delta arrives. When the
        awaitable ``client_gone()`` returns, every choice stops and ClientGone is raised."""
        jobs = []
        for g_index, gen in enumerate(generations):
            images = await self.images(gen.image_urls)
            for k in range(gen.n):
                sampling = dict(gen.sampling)
                if gen.n > 1 and sampling.get("seed") is not None:
                    sampling["seed"] = sampling["seed"] + k  # n different, reproducible choices
                jobs.append((Choice(g_index * gen.n + k), gen.prompt, images, sampling, gen.session_key,
                             {**gen.media.inputs(), "media_options": gen.media_options,
                              "cache_salt": gen.cache_salt}))
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(choice, prompt, images, sampling, session_key, media):
            try:
                async for delta in self.generator.generate(prompt, images, sampling, session_key=session_key,
                                                           media=media):
                    await queue.put((choice, delta, None))
            except ApiError as exc:
                await queue.put((choice, None, exc))
            except Exception as exc:  # never leave the merged stream waiting for a choice that died
                await queue.put((choice, None, ApiError(500, f"{type(exc).__name__}: {exc}")))

        async def watch():
            await client_gone()
            await queue.put((None, None, ClientGone()))

        tasks = [asyncio.create_task(pump(*job)) for job in jobs]
        if client_gone is not None:  # a stream may be silent for long (prefill, tokens without text)
            tasks.append(asyncio.create_task(watch()))
        try:
            remaining = len(jobs)
            while remaining:
                choice, delta, error = await queue.get()
                if error is not None:
                    raise error
                _record(choice, delta)
                if delta.finish_reason:
                    remaining -= 1
                yield choice, delta
        finally:
            for task in tasks:  # an error or a client gone: stop every other choice too
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- response shapes -----------------------------------------------------------------
    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def chat_logprobs(self, entries: list[dict]) -> dict:
        def one(token_id, logprob):
            text = self.token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return {"content": [dict(one(e["token_id"], e["logprob"]),
                                 top_logprobs=[one(t["token_id"], t["logprob"]) for t in e["top"]])
                            for e in entries]}

    def completion_logprobs(self, entries: list[dict], offset: int = 0) -> dict:
        tokens = [self.token_text(e["token_id"]) for e in entries]
        offsets = []
        for text in tokens:
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{self.token_text(t["token_id"]): t["logprob"] for t in e["top"]} for e in entries],
                "text_offset": offsets}


def _record(choice: Choice, delta: Delta) -> None:
    choice.text.append(delta.text)
    choice.logprobs.extend(delta.logprobs)
    if delta.finish_reason:
        choice.finish_reason = delta.finish_reason
        choice.num_input_tokens = delta.num_input_tokens
        choice.num_output_tokens = delta.num_output_tokens
        choice.num_cached_tokens = delta.num_cached_tokens
        choice.num_image_tokens = delta.num_image_tokens


def usage(choices: list[Choice], n: int) -> dict:
    """Prompt tokens once per prompt (its n choices share it), completion tokens of every choice."""
    firsts = [c for c in choices if c.index % n == 0]
    prompt = sum(c.num_input_tokens for c in firsts)
    completion = sum(c.num_output_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(c.num_cached_tokens for c in firsts),
                                      "image_tokens": sum(c.num_image_tokens for c in firsts)}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
