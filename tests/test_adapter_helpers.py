"""serving/metrics.py and serving/replies.py without Triton: a fake pb_utils records what the
adapters would send to tritonserver."""

from __future__ import annotations

import types

import pytest

from spyre_backend.engine.request import RequestOutput, RequestTiming
from spyre_backend.errors import InvalidRequest
from spyre_backend.protocol import FinishReason
from spyre_backend.serving import replies
from spyre_backend.serving.metrics import EncoderCacheMetrics, LLMMetrics


class FakePbUtils:
    """Records families, series and every update (each one a round trip in the real stub)."""

    TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1

    def __init__(self):
        self.families, self.updates = {}, []
        pb = self

        class Metric:
            def __init__(self, name, labels, buckets=None):
                self.key = (name, tuple(sorted(labels.items())))
                self.buckets = buckets

            def set(self, value):
                pb.updates.append(("set", self.key, value))

            def increment(self, value):
                pb.updates.append(("increment", self.key, value))

            def observe(self, value):
                pb.updates.append(("observe", self.key, value))

        class MetricFamily:
            GAUGE, COUNTER, HISTOGRAM = "gauge", "counter", "histogram"

            def __init__(self, name, description, kind):
                self.name, self.series = name, []
                pb.families[name] = (kind, self)

            def Metric(self, labels, buckets=None):  # noqa: N802 (Triton's name)
                metric = Metric(self.name, labels, buckets)
                self.series.append(metric.key[1])
                return metric

        self.MetricFamily = MetricFamily

    def InferenceResponse(self, output_tensors, error=None):  # noqa: N802
        return types.SimpleNamespace(outputs={t.name: t.value for t in output_tensors}, error=error)

    def TritonError(self, message):  # noqa: N802
        return message

    def Tensor(self, name, value):  # noqa: N802
        return types.SimpleNamespace(name=name, value=value)


def stats(**kw):  # the EngineStats fields the metrics read
    return types.SimpleNamespace(**{"free_blocks": 10, "total_blocks": 12, "running": 1, "waiting": 0, "sessions": 0,
                                    "cached_blocks": 0, "preemptions": 0, "prefix_queries": 0, "prefix_hits": 0, **kw})


def test_llm_metrics_names_labels_and_only_changed_values_sent():
    pb = FakePbUtils()
    metrics = LLMMetrics(pb)
    kinds = {name: kind for name, (kind, _) in pb.families.items()}
    assert kinds == {
        "spyre_kv_blocks": "gauge", "spyre_requests": "gauge", "spyre_sessions": "gauge",
        "spyre_requests_finished_total": "counter", "spyre_preemptions_total": "counter",
        "spyre_prefix_cache_queries_total": "counter", "spyre_prefix_cache_hits_total": "counter",
        "spyre_prompt_tokens_total": "counter", "spyre_generation_tokens_total": "counter",
        "spyre_time_to_first_token_seconds": "histogram", "spyre_time_per_output_token_seconds": "histogram",
        "spyre_e2e_request_latency_seconds": "histogram"}
    assert pb.families["spyre_requests_finished_total"][1].series == [
        (("reason", r),) for r in ("stop", "length", "cancelled", "timeout", "error")]
    assert sorted(pb.families["spyre_kv_blocks"][1].series) == [(("state", s),) for s in ("cached", "free", "used")]

    metrics.on_stats(stats(prefix_queries=32, prefix_hits=16))
    assert sorted(pb.updates) == sorted([
        ("increment", ("spyre_prefix_cache_queries_total", ()), 32), ("increment", ("spyre_prefix_cache_hits_total", ()), 16),
        ("set", ("spyre_kv_blocks", (("state", "free"),)), 10), ("set", ("spyre_kv_blocks", (("state", "used"),)), 2),
        ("set", ("spyre_requests", (("state", "running"),)), 1)])  # zeros are what a new series shows
    pb.updates.clear()
    metrics.on_stats(stats(prefix_queries=48, prefix_hits=16))  # only what changed, counters by their growth
    assert pb.updates == [("increment", ("spyre_prefix_cache_queries_total", ()), 16)]


def test_llm_metrics_count_finished_requests_and_their_timing():
    pb = FakePbUtils()
    metrics = LLMMetrics(pb)
    timing = RequestTiming(arrival=0.0, first_token=0.5, last_token=1.5, finished=1.5, num_output_tokens=3)
    out = RequestOutput("x", True, 7, 3, FinishReason.LENGTH, timing=timing)
    metrics.count_finished(out)
    metrics.count_finished(RequestOutput("", True, 7, 0, None, error="boom"))
    metrics.record_timing(out)
    metrics.record_timing(RequestOutput("", True, 7, 0, FinishReason.ERROR))  # refused: no timing, nothing sent
    assert pb.updates == [
        ("increment", ("spyre_requests_finished_total", (("reason", "length"),)), 1),
        ("increment", ("spyre_requests_finished_total", (("reason", "error"),)), 1),
        ("increment", ("spyre_generation_tokens_total", ()), 3),
        ("observe", ("spyre_e2e_request_latency_seconds", ()), timing.e2e_latency),
        ("increment", ("spyre_prompt_tokens_total", ()), 7),
        ("observe", ("spyre_time_to_first_token_seconds", ()), timing.time_to_first_token),
        ("observe", ("spyre_time_per_output_token_seconds", ()), timing.time_per_output_token)]
    metrics.close()
    with pytest.raises(KeyError):  # every Metric dropped (the stub's teardown)
        metrics.set("free_blocks", 1)


def test_encoder_cache_metrics_send_growth_and_changed_bytes():
    pb = FakePbUtils()
    metrics = EncoderCacheMetrics(pb)
    metrics.report(None)  # no cache
    metrics.report((0, 1, 4096))
    metrics.report((2, 1, 4096))
    assert pb.updates == [("increment", ("spyre_encoder_cache", (("result", "miss"),)), 1),
                          ("set", ("spyre_encoder_cache_bytes", ()), 4096),
                          ("increment", ("spyre_encoder_cache", (("result", "hit"),)), 2)]


class Sender:
    def __init__(self):
        self.sent = []

    def send(self, response, flags):
        self.sent.append((response, flags))


def test_replies_errors_stops_and_one_response_per_request():
    pb, sender = FakePbUtils(), Sender()
    replies.reply_to_stop(pb, sender, ["finish_reason"], None)
    replies.reply_to_stop(pb, sender, [], "nothing open")
    (stopped, final), (error, _) = sender.sent
    assert final == 1 and list(stopped.outputs) == ["finish_reason"]
    assert stopped.outputs["finish_reason"][0] == replies.STOPPED.encode() and error.error == "nothing open"

    def answer(request):
        if request == "bad":
            raise InvalidRequest("no")
        if request == "bug":
            raise RuntimeError("a bug")
        return request

    assert replies.answer_each(pb, ["a", "bad"], answer)[0] == "a"
    assert replies.answer_each(pb, ["bad"], answer, prefix="m: ")[0].error == "m: no"
    with pytest.raises(RuntimeError):  # only what ``refused`` names is answered as an error
        replies.answer_each(pb, ["bug"], answer)
