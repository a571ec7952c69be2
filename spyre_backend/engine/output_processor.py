"""From sampled tokens to what a client sees: text deltas, stop conditions, logprobs, finish reasons.

Runs outside the model step on the engine thread. Nothing here touches the model, the KV cache or
the scheduler: ``on_token`` says whether a request is finished, the engine core releases what it
held, and ``finish`` sends the final output. The only writer of each request's ``stream`` state.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from spyre_backend.engine.detokenizer import IncrementalDetokenizer
from spyre_backend.engine.request import Request, RequestOutput, RequestTiming
from spyre_backend.engine.sampler import Sample
from spyre_backend.protocol import FinishReason


@dataclass(frozen=True)
class Finished:
    reason: FinishReason
    stop_at: int | None = None  # a stop string's start in the detokenized text: nothing from there is sent


class OutputProcessor:
    def __init__(self, tokenizer, eos_token_ids: list[int]):
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids)

    def start(self, request: Request) -> None:
        if request.stream.detokenizer is None:
            request.stream.detokenizer = IncrementalDetokenizer(self.tokenizer)

    def banned_tokens(self, request: Request) -> list[int]:
        """Tokens the sampler must not pick yet: the end tokens before ``min_tokens``."""
        p = request.params
        if len(request.stream.output_ids) >= p.min_tokens:
            return []
        return [*([] if p.ignore_eos else self.eos_token_ids), *p.stop_token_ids]

    def on_token(self, request: Request, sample: Sample, now: float) -> Finished | None:
        """Record one sampled token; emit text that can no longer become part of a stop string."""
        token, params, stream = sample.token, request.params, request.stream
        if stream.first_token_at is None:
            stream.first_token_at = now
        stream.last_token_at = now
        stream.output_ids.append(token)
        if sample.logprob is not None:
            stream.pending_logprobs.append({
                "token_id": token, "logprob": sample.logprob,
                "top": [{"token_id": t, "logprob": lp} for t, lp in (sample.top or [])]})
        if (not params.ignore_eos and token in self.eos_token_ids) or token in params.stop_token_ids:
            return Finished(FinishReason.STOP)
        stream.detokenizer.add(token)
        text = stream.detokenizer.text
        if params.stop:
            # search only where a new match can start: a stop string may span token boundaries
            begin = max(0, stream.num_emitted_chars - max(map(len, params.stop)))
            hits = [i for i in (text.find(s, begin) for s in params.stop) if i >= 0]
            if hits:
                return Finished(FinishReason.STOP, stop_at=min(hits))
        if len(stream.output_ids) >= params.max_tokens:
            return Finished(FinishReason.LENGTH)
        # hold back a tail that could still become a stop string
        safe = len(text) - (max(map(len, params.stop)) - 1 if params.stop else 0)
        if safe > stream.num_emitted_chars:
            self.emit(request, text[stream.num_emitted_chars:safe], finished=False)
        return None

    def finish(self, request: Request, finished: Finished, error: str | None = None) -> None:
        """Send the last output: the rest of the text (up to a stop string), the reason, the timing."""
        text, stream = "", request.stream
        if stream.detokenizer is not None and finished.reason != FinishReason.ERROR:
            stream.detokenizer.flush()
            full = stream.detokenizer.text
            text = full[stream.num_emitted_chars: finished.stop_at if finished.stop_at is not None else len(full)]
        self.emit(request, text, True, finished.reason, error)

    @staticmethod
    def reject(request: Request, message: str) -> None:
        """The single answer of a request refused before it ran."""
        request.on_output(RequestOutput("", True, request.num_prompt_tokens, 0, FinishReason.ERROR, error=message))

    @staticmethod
    def emit(request: Request, text: str, finished: bool, reason: FinishReason | None = None,
             error: str | None = None) -> None:
        stream = request.stream
        stream.num_emitted_chars += len(text)
        logprobs = stream.pending_logprobs if request.params.logprobs is not None else None
        stream.pending_logprobs = []
        timing = None
        if finished:
            timing = RequestTiming(request.arrival, stream.first_token_at, stream.last_token_at,
                                   time.monotonic(), len(stream.output_ids))
        request.on_output(RequestOutput(text, finished, request.num_prompt_tokens, len(stream.output_ids),
                                        reason, error, logprobs, request.num_prefill_tokens, timing,
                                        num_cached_tokens=request.num_cached_tokens))
