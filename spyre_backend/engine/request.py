"""A generation request (one turn of a sequence) as the engine tracks it, and what it reports."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from spyre_backend.engine.sampler import make_generator
from spyre_backend.engine.sampling_params import SamplingParams
from spyre_backend.protocol import FinishReason

if TYPE_CHECKING:
    from concurrent.futures import Future

    from spyre_backend.engine.detokenizer import IncrementalDetokenizer
    from spyre_backend.engine.turns import Session

_ids = itertools.count(1)


@dataclass(frozen=True)
class RequestTiming:
    """When a request arrived, produced its first and last token and finished (time.monotonic()).

    Measured by the engine, so latencies start at the request's arrival in the LLM engine (after
    preprocessing and the vision encoder, whose times Triton's own per-model metrics show).
    """

    arrival: float
    first_token: float | None  # None: finished before its prefill completed
    last_token: float | None
    finished: float
    num_output_tokens: int

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def time_per_output_token(self) -> float | None:
        """Mean gap between consecutive output tokens; None with fewer than two."""
        if self.first_token is None or self.num_output_tokens < 2:
            return None
        return (self.last_token - self.first_token) / (self.num_output_tokens - 1)

    @property
    def e2e_latency(self) -> float:
        return self.finished - self.arrival


@dataclass
class RequestOutput:
    text: str  # new text since the previous output
    finished: bool
    num_input_tokens: int
    num_output_tokens: int
    finish_reason: FinishReason | None = None
    error: str | None = None
    logprobs: list[dict] | None = None  # per token of this output, when requested
    num_prefill_tokens: int = 0  # tokens this turn computed at prefill (new ones only, in a session)
    timing: RequestTiming | None = None  # on the final output of a request the engine ran
    num_cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache


@dataclass
class StreamState:
    """What the output processor keeps of a request's output (its only writer)."""

    output_ids: list[int] = field(default_factory=list)
    detokenizer: "IncrementalDetokenizer | None" = None
    num_emitted_chars: int = 0
    pending_logprobs: list[dict] = field(default_factory=list)
    first_token_at: float | None = None  # time.monotonic() when its first / latest token was sampled
    last_token_at: float | None = None


@dataclass(eq=False)  # identity: requests hold tensors, and each one is unique
class Request:
    """One turn of a sequence. Its inputs are set when it is made (``LLMEngine.add_request`` gives
    a one-off its sequence id and every request its deadline, before the engine thread sees it);
    afterwards each part has one writer: ``session`` is set by ``Turns.start``, the scheduling
    counters by the ``Scheduler``, ``stream`` by the ``OutputProcessor``."""

    prompt_ids: torch.Tensor  # [n] int64: this turn's new tokens
    image_features: torch.Tensor | None  # [n_features, hidden] or None
    params: SamplingParams
    on_output: Callable[[RequestOutput], None]
    is_cancelled: Callable[[], bool] = lambda: False
    sequence_id: int | str | None = None  # None: a one-off sequence of its own
    sequence_start: bool = True
    sequence_end: bool = True
    cache_salt: str = ""  # its tenant's: prefix-cache hits only among requests of the same salt
    request_id: int = field(default_factory=lambda: next(_ids))
    arrival: float = field(default_factory=time.monotonic)
    deadline: float = float("inf")
    generator: torch.Generator | None = None  # made from params (seeded or not); None when greedy
    grammar: "Future | None" = None  # its compiled grammar (structured output), from LLMEngine.add_request
    session: "Session | None" = None  # its session, once its turn has started (Turns)
    # scheduling counters (Scheduler)
    num_prefill_tokens: int = 0  # tokens computed before the first one was sampled (recompute included)
    num_cached_tokens: int = 0  # of the sequence's tokens at admission, those taken from the prefix cache
    num_preemptions: int = 0
    stream: StreamState = field(default_factory=StreamState)  # (OutputProcessor)

    def __post_init__(self):
        if self.generator is None:
            self.generator = make_generator(self.params)

    @property
    def num_prompt_tokens(self) -> int:
        return int(self.prompt_ids.shape[0])

    @property
    def output_ids(self) -> list[int]:
        return self.stream.output_ids

    @property
    def sampled_any(self) -> bool:
        return bool(self.stream.output_ids)
