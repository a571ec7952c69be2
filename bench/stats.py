"""Latency and throughput arithmetic from response arrival times (pure functions, unit-tested).

Every path records, per request, when it was sent and each streamed response's arrival time with
the cumulative ``num_output_tokens`` it reports. A response can carry several tokens (a token
whose text is still empty, or the server merging responses when its sender falls behind), so
tokens are attributed to the response that delivered them:

- time to first token (TTFT): first response carrying a token, minus the send time;
- inter-token latency (ITL): the gap between two responses is shared evenly by the tokens the
  later one carried; tokens that came with the first response count as gaps of 0. The ITLs of a
  request therefore add up to (last response - first response) and there are (tokens - 1) of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

PERCENTILES = (50, 95, 99)


@dataclass
class RequestRecord:
    sent: float  # seconds, any clock shared with the arrivals
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # (time, cumulative output tokens)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.output_tokens > 0

    @property
    def output_tokens(self) -> int:
        return max((n for _, n in self.arrivals), default=0)

    @property
    def finished(self) -> float:
        return self.arrivals[-1][0] if self.arrivals else self.sent

    def ttft(self) -> float | None:
        first = next((t for t, n in self.arrivals if n > 0), None)
        return None if first is None else first - self.sent

    def itls(self) -> list[float]:
        gaps: list[float] = []
        prev_t, prev_n = None, 0
        for t, n in self.arrivals:
            new = n - prev_n
            if new <= 0:
                continue  # a response without new tokens (e.g. the final one of a stop string)
            if prev_t is None:
                gaps += [0.0] * (new - 1)  # the first token is TTFT; its companions arrived with it
            else:
                gaps += [(t - prev_t) / new] * new
            prev_t, prev_n = t, n
        return gaps


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def distribution(values: list[float], scale: float = 1.0) -> dict:
    """mean and p50/p95/p99 of ``values`` times ``scale`` (e.g. 1000 for ms)."""
    out = {"mean": (sum(values) / len(values) * scale) if values else math.nan}
    for q in PERCENTILES:
        out[f"p{q}"] = percentile(values, q) * scale
    return out


def summarize(records: list[RequestRecord]) -> dict:
    """Throughput over the whole run (first send to last arrival) and latency distributions in ms."""
    good = [r for r in records if r.ok]
    errors = [r.error or "no tokens" for r in records if not r.ok]
    if not good:
        return {"requests": len(records), "errors": len(errors), "error_examples": errors[:3]}
    start = min(r.sent for r in records)
    end = max(r.finished for r in records)
    duration = max(end - start, 1e-9)
    tokens = sum(r.output_tokens for r in good)
    ttfts = [r.ttft() for r in good]
    itls = [gap for r in good for gap in r.itls()]
    return {
        "requests": len(records),
        "errors": len(errors),
        "error_examples": errors[:3],
        "output_tokens": tokens,
        "duration_s": duration,
        "tokens_per_s": tokens / duration,
        "requests_per_s": len(good) / duration,
        "ttft_ms": distribution(ttfts, 1000.0),
        "itl_ms": distribution(itls, 1000.0),
        "e2e_ms": distribution([r.finished - r.sent for r in good], 1000.0),
    }


def summary_metric(summary: dict, metric: str) -> float | None:
    """One metric of a summarize() result by its short name: tokens_per_s, ttft_p50, itl_p99..."""
    if not summary or "tokens_per_s" not in summary:
        return None
    if metric == "tokens_per_s":
        return summary["tokens_per_s"]
    kind, q = metric.split("_")
    return summary[f"{kind}_ms"][q]
