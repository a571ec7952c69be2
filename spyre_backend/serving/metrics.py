"""The models' Prometheus metrics, served on tritonserver's metrics port.

Triton's ``pb_utils`` exists only inside the Python-backend stub, so the adapters pass it in
(as to ``triton_io``). Each metric update is a round trip to tritonserver while the sending
thread waits, so a gauge is sent only when its value changed, a counter that follows a running
total is incremented by what the total grew, and a request's latencies are sent once, when it
finishes, never per token.
"""

from __future__ import annotations

from spyre_backend.protocol import FinishReason

# Histogram buckets (seconds) wide enough for a tiny model on an accelerator and a full-size one
# on these CPUs (prefill of a large image ~1 min, decode ~0.5 s per token).
TTFT_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320]
TPOT_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5, 5]
E2E_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640]


class MetricSet:
    """One model's metric families, each series under a key of its own, and what each last sent."""

    def __init__(self, pb_utils):
        self._pb_utils = pb_utils
        self._families: list = []
        self._series: dict = {}
        self._sent: dict = {}  # key -> the gauge's value or the followed total, as last sent

    def add(self, name: str, kind: str, description: str, series: dict, buckets: list | None = None) -> None:
        """A family (``kind``: "GAUGE", "COUNTER" or "HISTOGRAM") and its series, ``{key: labels}``."""
        family = self._pb_utils.MetricFamily(name=name, description=description,
                                             kind=getattr(self._pb_utils.MetricFamily, kind))
        self._families.append(family)
        extra = {} if buckets is None else {"buckets": buckets}
        for key, labels in series.items():
            self._series[key] = family.Metric(labels=labels, **extra)
            self._sent[key] = 0  # what a new series shows

    def set(self, key, value) -> None:
        """A gauge, sent only when it changed."""
        if self._sent[key] != value:
            self._series[key].set(value)
            self._sent[key] = value

    def follow(self, key, total) -> None:
        """A counter of a running total (the engine's, the cache's): incremented by what it grew."""
        if total > self._sent[key]:
            self._series[key].increment(total - self._sent[key])
            self._sent[key] = total

    def increment(self, key, amount=1) -> None:
        self._series[key].increment(amount)

    def observe(self, key, value) -> None:
        self._series[key].observe(value)

    def close(self) -> None:
        """Drop the metrics while the stub can still talk to the server: a Metric collected later,
        at interpreter exit, reaches for freed shared memory and the stub segfaults on the way
        out. In ``finalize()``, and after a failed ``initialize()`` (no finalize() follows it)."""
        self._series.clear()
        self._families.clear()


class LLMMetrics(MetricSet):
    """granite_llm's: KV blocks, requests and sessions (gauges), the engine's totals, finished
    requests by finish reason, token counts and latencies."""

    _TOTALS = ("preemptions", "prefix_queries", "prefix_hits")  # EngineStats fields, since start

    def __init__(self, pb_utils):
        super().__init__(pb_utils)
        self.add("spyre_kv_blocks", "GAUGE", "KV cache blocks by state", {
            "free_blocks": {"state": "free"}, "used_blocks": {"state": "used"},
            "cached_blocks": {"state": "cached"},  # held or free, reusable by content
        })
        self.add("spyre_requests", "GAUGE", "LLM requests by state",
                 {"running": {"state": "running"}, "waiting": {"state": "waiting"}})
        self.add("spyre_sessions", "GAUGE", "Sessions holding KV", {"sessions": {}})
        self.add("spyre_requests_finished_total", "COUNTER", "Finished LLM requests by finish reason",
                 {reason: {"reason": reason.value} for reason in FinishReason})
        self.add("spyre_preemptions_total", "COUNTER",
                 "Running requests preempted for KV blocks (resumed later by recomputing their prefill)",
                 {"preemptions": {}})
        self.add("spyre_prefix_cache_queries_total", "COUNTER",
                 "Tokens of sequences looked up in the prefix cache at admission", {"prefix_queries": {}})
        self.add("spyre_prefix_cache_hits_total", "COUNTER", "Of those, tokens whose KV blocks were found cached",
                 {"prefix_hits": {}})
        self.add("spyre_prompt_tokens_total", "COUNTER", "Prompt tokens of requests that completed their prefill",
                 {"prompt_tokens": {}})
        self.add("spyre_generation_tokens_total", "COUNTER", "Tokens generated (counted when each request finishes)",
                 {"generation_tokens": {}})
        self.add("spyre_time_to_first_token_seconds", "HISTOGRAM",
                 "From a request's arrival at granite_llm to its first token", {"ttft": {}}, TTFT_BUCKETS)
        self.add("spyre_time_per_output_token_seconds", "HISTOGRAM",
                 "Mean gap between a request's output tokens (one sample per request)", {"tpot": {}}, TPOT_BUCKETS)
        self.add("spyre_e2e_request_latency_seconds", "HISTOGRAM",
                 "From a request's arrival at granite_llm to its last response", {"e2e": {}}, E2E_BUCKETS)

    def on_stats(self, stats) -> None:
        """The engine's ``on_step`` (an EngineStats after each step)."""
        for name in self._TOTALS:
            self.follow(name, getattr(stats, name))
        self.set("free_blocks", stats.free_blocks)
        self.set("used_blocks", stats.total_blocks - stats.free_blocks)
        self.set("running", stats.running)
        self.set("waiting", stats.waiting)
        self.set("sessions", stats.sessions)
        self.set("cached_blocks", stats.cached_blocks)

    def count_finished(self, out) -> None:
        """A finished RequestOutput, by its finish reason (one without any counts as an error)."""
        self.increment(out.finish_reason or FinishReason.ERROR)

    def record_timing(self, out) -> None:
        """Token counts and latencies of a finished RequestOutput: a handful of updates per request."""
        timing = out.timing
        if timing is None:
            return  # refused before the engine ran it
        self.increment("generation_tokens", out.num_output_tokens)
        self.observe("e2e", timing.e2e_latency)
        if timing.time_to_first_token is not None:
            self.increment("prompt_tokens", out.num_input_tokens)
            self.observe("ttft", timing.time_to_first_token)
        if timing.time_per_output_token is not None:
            self.observe("tpot", timing.time_per_output_token)


class EncoderCacheMetrics(MetricSet):
    """vision_encoder's: images looked up in its encoder cache, by result, and the bytes it holds."""

    def __init__(self, pb_utils):
        super().__init__(pb_utils)
        self.add("spyre_encoder_cache", "COUNTER", "Images looked up in the encoder cache, by result",
                 {"hits": {"result": "hit"}, "misses": {"result": "miss"}})
        self.add("spyre_encoder_cache_bytes", "GAUGE", "Bytes of image features held by the encoder cache",
                 {"bytes": {}})

    def report(self, counts: tuple[int, int, int] | None) -> None:
        """The cache's (hits, misses, bytes) since start; None without a cache."""
        if counts is None:
            return
        hits, misses, size = counts
        self.follow("hits", hits)
        self.follow("misses", misses)
        self.set("bytes", size)


class PreprocessMetrics(MetricSet):
    """preprocess's: images and document pages looked up in its processed-image cache, by result,
    and document pages rendered (a repeated question about a document renders none)."""

    def __init__(self, pb_utils):
        super().__init__(pb_utils)
        self.add("spyre_processed_image_cache", "COUNTER",
                 "Images and document pages looked up in preprocess's processed-image cache, by result",
                 {"hits": {"result": "hit"}, "misses": {"result": "miss"}})
        self.add("spyre_document_pages_rendered_total", "COUNTER", "PDF pages rendered to images", {"pages": {}})

    def report(self, preprocessor) -> None:
        """The preprocessor's totals since start."""
        cache = preprocessor.image_cache
        if cache is not None:
            self.follow("hits", cache.hits)
            self.follow("misses", cache.misses)
        self.follow("pages", preprocessor.documents.pages_rendered)
