"""Triton adapter for spyre_backend's LLM engine (decoupled, sequence-batched)."""

import triton_python_backend_utils as pb_utils

from spyre_backend.config import ServingConfig
from spyre_backend.errors import InvalidRequest
from spyre_backend.serving import triton_io as io
from spyre_backend.serving.control import StopListener
from spyre_backend.serving.llm_service import GenerateInputs, LLMService
from spyre_backend.serving.outbox import Outbox
from spyre_backend.serving.orphan_watch import exit_with_parent

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL

# Histogram buckets (seconds) wide enough for a tiny model on an accelerator and a full-size one
# on these CPUs (prefill of a large image ~1 min, decode ~0.5 s per token).
TTFT_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320]
TPOT_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5, 5]
E2E_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640]


class TritonPythonModel:
    def initialize(self, args):
        exit_with_parent()  # no orphan stub if tritonserver crashes
        self._init_metrics()
        try:
            config = ServingConfig.from_model_config(args["model_config"])
            # sends off the engine thread, merging when behind or within stream_interval_ms
            self.outbox = Outbox("granite_llm-responses", min_gap_s=config.stream_interval_ms / 1000)
            self.service = LLMService(config, on_stats=self._on_stats)  # warmed up: every shape ran
            self.service.seal_compiled()  # this process serves this model only
        except BaseException:
            self._drop_metrics()  # finalize() is not called after a failed initialize()
            raise
        # stops from the granite_vision front: its clients' stop requests, and its clients going
        # away (see serving/control.py)
        self.stop_listener = StopListener(self.service.stop)

    def _init_metrics(self):
        gauge = pb_utils.MetricFamily.GAUGE
        self._kv = pb_utils.MetricFamily(name="spyre_kv_blocks", description="KV cache blocks by state", kind=gauge)
        self._requests = pb_utils.MetricFamily(name="spyre_requests", description="LLM requests by state", kind=gauge)
        self._sessions = pb_utils.MetricFamily(name="spyre_sessions", description="Sessions holding KV", kind=gauge)
        self._gauges = {
            "free_blocks": self._kv.Metric(labels={"state": "free"}),
            "used_blocks": self._kv.Metric(labels={"state": "used"}),
            "running": self._requests.Metric(labels={"state": "running"}),
            "waiting": self._requests.Metric(labels={"state": "waiting"}),
            "sessions": self._sessions.Metric(labels={}),
            "cached_blocks": self._kv.Metric(labels={"state": "cached"}),  # held or free, reusable by content
        }
        self._gauge_values = {}  # as last sent
        self._finished_family = pb_utils.MetricFamily(
            name="spyre_requests_finished_total", description="Finished LLM requests by finish reason",
            kind=pb_utils.MetricFamily.COUNTER)
        self._finished = {reason: self._finished_family.Metric(labels={"reason": reason})
                          for reason in ("stop", "length", "cancelled", "timeout", "error")}
        # counters of engine totals (EngineStats), incremented by what each total grew
        self._total_families = [
            pb_utils.MetricFamily(
                name="spyre_preemptions_total", kind=pb_utils.MetricFamily.COUNTER,
                description="Running requests preempted for KV blocks (resumed later by recomputing their prefill)"),
            pb_utils.MetricFamily(name="spyre_prefix_cache_queries_total", kind=pb_utils.MetricFamily.COUNTER,
                                  description="Tokens of sequences looked up in the prefix cache at admission"),
            pb_utils.MetricFamily(name="spyre_prefix_cache_hits_total", kind=pb_utils.MetricFamily.COUNTER,
                                  description="Of those, tokens whose KV blocks were found cached"),
        ]
        self._totals = {name: family.Metric(labels={}) for name, family in
                        zip(("preemptions", "prefix_queries", "prefix_hits"), self._total_families)}
        self._totals_seen = dict.fromkeys(self._totals, 0)
        counter, histogram = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.HISTOGRAM
        self._token_families = [
            pb_utils.MetricFamily(name="spyre_prompt_tokens_total", kind=counter,
                                  description="Prompt tokens of requests that completed their prefill"),
            pb_utils.MetricFamily(name="spyre_generation_tokens_total", kind=counter,
                                  description="Tokens generated (counted when each request finishes)"),
        ]
        self._prompt_tokens, self._generation_tokens = (f.Metric(labels={}) for f in self._token_families)
        self._latency_families = [
            pb_utils.MetricFamily(name="spyre_time_to_first_token_seconds", kind=histogram,
                                  description="From a request's arrival at granite_llm to its first token"),
            pb_utils.MetricFamily(name="spyre_time_per_output_token_seconds", kind=histogram,
                                  description="Mean gap between a request's output tokens (one sample per request)"),
            pb_utils.MetricFamily(name="spyre_e2e_request_latency_seconds", kind=histogram,
                                  description="From a request's arrival at granite_llm to its last response"),
        ]
        self._ttft, self._tpot, self._e2e = (family.Metric(labels={}, buckets=buckets) for family, buckets in zip(
            self._latency_families, (TTFT_BUCKETS, TPOT_BUCKETS, E2E_BUCKETS)))

    def _on_stats(self, stats):
        for name, counter in self._totals.items():
            total = getattr(stats, name)
            if total > self._totals_seen[name]:
                counter.increment(total - self._totals_seen[name])
                self._totals_seen[name] = total
        values = {"free_blocks": stats.free_blocks, "used_blocks": stats.total_blocks - stats.free_blocks,
                  "running": stats.running, "waiting": stats.waiting, "sessions": stats.sessions,
                  "cached_blocks": stats.cached_blocks}
        # each set is a round trip to the server that holds the GIL (the sender thread waits):
        # send only the gauges that changed
        for name, value in values.items():
            if self._gauge_values.get(name) != value:
                self._gauges[name].set(value)
                self._gauge_values[name] = value

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            names = request.requested_output_names()  # send only these (see io.text_response)
            try:
                start, end = io.sequence_flags(pb_utils, request)
                if io.optional_bool(pb_utils, request, "stop", False):
                    self.service.stop(request.correlation_id(), end, self._stop_reply(sender, names))
                    continue
                inputs = GenerateInputs(
                    input_ids=io.tensor(pb_utils, request, "input_ids"),
                    image_features=io.tensor(pb_utils, request, "image_features"),
                    prompt_text=io.optional_text(pb_utils, request, "text_input") or "",
                    stream=io.optional_bool(pb_utils, request, "stream", False),
                    exclude_input_in_output=io.optional_bool(pb_utils, request, "exclude_input_in_output", False),
                    max_tokens=io.optional_int(pb_utils, request, "max_tokens"),
                    sampling_parameters=io.optional_text(pb_utils, request, "sampling_parameters"),
                    sampling_overrides=io.sampling_overrides(pb_utils, request),
                    sequence_id=request.correlation_id(), sequence_start=start, sequence_end=end,
                )
                self.service.submit(inputs, self._sender(sender, names), is_cancelled=request.is_cancelled)
            except InvalidRequest as exc:
                sender.send(io.error_response(pb_utils, str(exc)), flags=FINAL)
        return None

    def _sender(self, sender, names):
        started = []

        def send(text, out):
            if out.finished:  # counted before the client can see the end (tests rely on that)
                self._finished[out.finish_reason.value if out.finish_reason else "error"].increment(1)
            try:
                if out.error and not started:
                    sender.send(io.error_response(pb_utils, out.error), flags=FINAL)
                    return
                if out.error:  # after the stream began: in band (see io.MIDSTREAM_ERROR)
                    sender.send(io.text_response(pb_utils, out.error, io.MIDSTREAM_ERROR, out.num_input_tokens,
                                                 out.num_output_tokens, names=names), flags=FINAL)
                    return
                started.append(True)
                reason = out.finish_reason.value if out.finish_reason else ""
                response = io.text_response(pb_utils, text, reason, out.num_input_tokens, out.num_output_tokens,
                                            out.logprobs, names=names, num_cached=out.num_cached_tokens)
                sender.send(response, flags=FINAL if out.finished else 0)
            finally:
                if out.finished:
                    self._record_timing(out)  # after the response: the client need not wait for it

        return self.outbox.stream(send)

    def _record_timing(self, out):
        """Token counts and latencies of a finished request: a handful of metric updates per
        request (each one is a round trip to the server), never one per token."""
        timing = out.timing
        if timing is None:
            return  # refused before the engine ran it
        self._generation_tokens.increment(out.num_output_tokens)
        self._e2e.observe(timing.e2e_latency)
        if timing.time_to_first_token is not None:
            self._prompt_tokens.increment(out.num_input_tokens)
            self._ttft.observe(timing.time_to_first_token)
        if timing.time_per_output_token is not None:
            self._tpot.observe(timing.time_per_output_token)

    @staticmethod
    def _stop_reply(sender, names):
        def reply(error):
            if error:
                sender.send(io.error_response(pb_utils, error), flags=FINAL)
            else:
                sender.send(io.text_response(pb_utils, "", "stopped", 0, 0, names=names), flags=FINAL)

        return reply

    def finalize(self):
        self.stop_listener.close()
        self.service.shutdown()
        self.outbox.close()
        self._drop_metrics()

    def _drop_metrics(self):
        """Drop the metrics while the stub can still talk to the server: a Metric collected later,
        at interpreter exit, reaches for freed shared memory and the stub segfaults on the way out."""
        self._gauges.clear()
        self._finished.clear()
        del self._kv, self._requests, self._sessions, self._finished_family
        del self._prompt_tokens, self._generation_tokens, self._ttft, self._tpot, self._e2e
        self._token_families.clear()
        self._latency_families.clear()
        self._totals.clear()
        self._total_families.clear()
