"""Per-request sampling parameters: vLLM-style ``sampling_parameters`` JSON and TRT-LLM-style inputs."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields

from spyre_backend.config import EngineLimits
from spyre_backend.engine import structured_request
from spyre_backend.engine.structured_request import StructuredOutput
from spyre_backend.errors import InvalidRequest
from spyre_backend.protocol import TRTLLM_INPUTS

MAX_LOGPROBS = 20
MAX_JSON_DEPTH = 16  # sampling_parameters nest 2 deep; Python's parser recurses once per level
_JSON_SPECIAL = re.compile(r'[\[\]{}"\\]')


def check_json_depth(text: str, limit: int, what: str) -> None:
    """Refuse JSON nested deeper than ``limit`` before parsing it: ``json.loads`` recurses per
    level and a few thousand brackets end in a RecursionError. Only brackets, quotes and
    backslashes are visited (a base64 image in a string costs next to nothing)."""
    if text.count("[") + text.count("{") <= limit:
        return  # cannot be deeper (str.count is far cheaper than the scan below)
    depth, in_string, skip_at = 0, False, -1
    for match in _JSON_SPECIAL.finditer(text):
        at, char = match.start(), match.group()
        if at == skip_at:  # the character after a backslash in a string
            continue
        if in_string:
            if char == "\\":
                skip_at = at + 1
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                raise InvalidRequest(f"{what} is nested more than {limit} levels deep")
        elif char in "]}":
            depth -= 1


@dataclass
class SamplingParams:
    # None: what the context leaves (resolved before the engine sees it)
    max_tokens: int | None = EngineLimits.default_max_tokens
    min_tokens: int = 0  # eos and stop tokens are suppressed until this many tokens exist
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 or -1: no limit
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0  # on prompt and output tokens, as in vLLM
    presence_penalty: float = 0.0  # on output tokens
    frequency_penalty: float = 0.0  # on output tokens
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: int | None = None  # return the sampled token's logprob and this many top alternatives
    # vLLM's structured_outputs object (json, json_object, regex, choice or grammar); the older
    # guided_* fields and OpenAI's response_format are read into it (engine/structured_request.py)
    structured_outputs: dict | None = None
    structured: StructuredOutput | None = field(default=None, init=False, repr=False)  # checked, by validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @classmethod
    def from_request(cls, text: str | None, *, max_tokens: int | None = None, default_max_tokens: int | None = None,
                     overrides: dict | None = None, limits: EngineLimits | None = None) -> "SamplingParams":
        """``sampling_parameters`` JSON, then separate inputs (``overrides``, TRT-LLM names) on top.
        ``limits``: those a structured output must keep (the defaults where None)."""
        values: dict = {}
        limits = limits or EngineLimits()
        if text:  # a JSON schema nests as deep as max_schema_depth inside it
            check_json_depth(text, MAX_JSON_DEPTH + limits.max_schema_depth, "sampling_parameters")
            try:
                values = json.loads(text)
            except json.JSONDecodeError as exc:
                raise InvalidRequest(f"sampling_parameters is not valid JSON: {exc}") from None
            if not isinstance(values, dict):
                raise InvalidRequest("sampling_parameters must be a JSON object")
            structured = structured_request.structured_from(values)
            if structured is not None:
                values["structured_outputs"] = structured
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InvalidRequest(f"unsupported sampling parameter(s) {unknown}; supported: {sorted(known)}")
        for name, value in (overrides or {}).items():
            values[TRTLLM_INPUTS[name]] = value
        if max_tokens is not None:
            values["max_tokens"] = max_tokens  # the explicit max_tokens input wins
        elif default_max_tokens is not None:
            values.setdefault("max_tokens", default_max_tokens)
        params = cls(**values)
        params.validate(limits)
        return params

    def validate(self, limits: EngineLimits | None = None) -> None:
        """Check every value; ``limits``: the structured-output limits to enforce as well (the
        OpenAI front checks the rest and leaves the limits to granite_llm's configuration)."""
        def check(ok: bool, message: str):
            if not ok:
                raise InvalidRequest(message)

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # not NaN

        check(self.max_tokens is None or (is_int(self.max_tokens) and self.max_tokens >= 1),
              f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        check(is_int(self.min_tokens) and 0 <= self.min_tokens <= (self.max_tokens or self.min_tokens),
              f"min_tokens must be an integer in [0, max_tokens], got {self.min_tokens!r}")
        check(is_num(self.temperature) and 0.0 <= self.temperature <= 100.0,
              f"temperature must be a number in [0, 100], got {self.temperature!r}")
        check(is_int(self.top_k) and (self.top_k == -1 or self.top_k >= 0),
              f"top_k must be -1, 0 or a positive integer, got {self.top_k!r}")
        check(is_num(self.top_p) and 0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p!r}")
        check(is_num(self.min_p) and 0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p!r}")
        check(self.seed is None or (is_int(self.seed) and 0 <= self.seed < 2**63),
              f"seed must be a non-negative integer, got {self.seed!r}")
        check(is_num(self.repetition_penalty) and 0.0 < self.repetition_penalty <= 10.0,
              f"repetition_penalty must be in (0, 10], got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            check(is_num(value) and -2.0 <= value <= 2.0, f"{name} must be in [-2, 2], got {value!r}")
        check(isinstance(self.ignore_eos, bool), f"ignore_eos must be a boolean, got {self.ignore_eos!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        check(isinstance(self.stop, list) and all(isinstance(s, str) and s for s in self.stop),
              f"stop must be a string or a list of non-empty strings, got {self.stop!r}")
        check(isinstance(self.stop_token_ids, list) and all(is_int(t) and t >= 0 for t in self.stop_token_ids),
              f"stop_token_ids must be a list of non-negative integers, got {self.stop_token_ids!r}")
        check(self.logprobs is None or (is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
              f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        self.temperature = float(self.temperature)
        self.top_p = float(self.top_p)
        if self.structured_outputs is not None and (limits is not None or self.structured is None):
            check(isinstance(self.structured_outputs, dict),
                  f"structured_outputs must be an object, got {self.structured_outputs!r}")
            big = 2**62  # no limit: the OpenAI front leaves them to granite_llm
            self.structured = structured_request.parse(
                self.structured_outputs, max_bytes=limits.max_grammar_bytes if limits else big,
                max_depth=limits.max_schema_depth if limits else big)
