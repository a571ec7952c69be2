"""Per-request sampling parameters, parsed from the vLLM-style ``sampling_parameters`` JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields


class InvalidRequest(ValueError):
    """A client error: reported back as an error response, never raised past the model."""


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 or -1: no limit
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def from_json(cls, text: str | None, *, max_tokens: int | None = None,
                  default_max_tokens: int | None = None) -> "SamplingParams":
        values: dict = {}
        if text:
            try:
                values = json.loads(text)
            except json.JSONDecodeError as exc:
                raise InvalidRequest(f"sampling_parameters is not valid JSON: {exc}") from None
            if not isinstance(values, dict):
                raise InvalidRequest("sampling_parameters must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InvalidRequest(f"unsupported sampling parameter(s) {unknown}; supported: {sorted(known)}")
        if max_tokens is not None:
            values["max_tokens"] = max_tokens  # the explicit max_tokens input wins
        elif default_max_tokens is not None:
            values.setdefault("max_tokens", default_max_tokens)
        params = cls(**values)
        params.validate()
        return params

    def validate(self) -> None:
        def check(ok: bool, message: str):
            if not ok:
                raise InvalidRequest(message)

        check(isinstance(self.max_tokens, int) and not isinstance(self.max_tokens, bool) and self.max_tokens >= 1,
              f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        check(isinstance(self.temperature, (int, float)) and 0.0 <= self.temperature <= 100.0,
              f"temperature must be a number in [0, 100], got {self.temperature!r}")
        check(isinstance(self.top_k, int) and (self.top_k == -1 or self.top_k >= 0),
              f"top_k must be -1, 0 or a positive integer, got {self.top_k!r}")
        check(isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0,
              f"top_p must be in (0, 1], got {self.top_p!r}")
        check(self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**63),
              f"seed must be a non-negative integer, got {self.seed!r}")
        check(isinstance(self.ignore_eos, bool), f"ignore_eos must be a boolean, got {self.ignore_eos!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        check(isinstance(self.stop, list) and all(isinstance(s, str) and s for s in self.stop),
              f"stop must be a string or a list of non-empty strings, got {self.stop!r}")
        check(isinstance(self.stop_token_ids, list) and all(isinstance(t, int) for t in self.stop_token_ids),
              f"stop_token_ids must be a list of integers, got {self.stop_token_ids!r}")
        self.temperature = float(self.temperature)
        self.top_p = float(self.top_p)
