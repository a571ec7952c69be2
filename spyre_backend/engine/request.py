"""A generation request as the engine tracks it, and what it reports back."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Callable

import torch

from spyre_backend.engine.sampling_params import SamplingParams

_ids = itertools.count(1)


class FinishReason(str, enum.Enum):
    STOP = "stop"  # eos, stop string or stop token
    LENGTH = "length"  # max_tokens or the context limit
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass
class RequestOutput:
    text: str  # new text since the previous output
    finished: bool
    num_input_tokens: int
    num_output_tokens: int
    finish_reason: FinishReason | None = None
    error: str | None = None


@dataclass
class Request:
    prompt_ids: torch.Tensor  # [n] int64
    image_features: torch.Tensor | None  # [n_features, hidden] or None
    params: SamplingParams
    on_output: Callable[[RequestOutput], None]
    is_cancelled: Callable[[], bool] = lambda: False
    sequence_id: int | str = 0
    request_id: int = field(default_factory=lambda: next(_ids))
    # engine state
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    generator: torch.Generator | None = None
    detokenizer: object = None

    @property
    def num_prompt_tokens(self) -> int:
        return int(self.prompt_ids.shape[0])

    @property
    def max_total_tokens(self) -> int:
        return self.num_prompt_tokens + self.params.max_tokens

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + len(self.output_ids)
