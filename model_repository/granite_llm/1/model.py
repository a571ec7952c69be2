"""Triton adapter for spyre_backend's LLM engine (decoupled, sequence-batched)."""

import triton_python_backend_utils as pb_utils

from spyre_backend.config import ServingConfig
from spyre_backend.engine.sampling_params import InvalidRequest
from spyre_backend.serving import triton_io as io
from spyre_backend.serving.control import StopListener
from spyre_backend.serving.llm_service import GenerateInputs, LLMService
from spyre_backend.serving.outbox import Outbox

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        self._init_metrics()
        self.outbox = Outbox("granite_llm-responses")  # sends off the engine thread, merging when behind
        self.service = LLMService(ServingConfig.from_model_config(args["model_config"]), on_stats=self._on_stats)
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
        }
        self._finished_family = pb_utils.MetricFamily(
            name="spyre_requests_finished_total", description="Finished LLM requests by finish reason",
            kind=pb_utils.MetricFamily.COUNTER)
        self._finished = {reason: self._finished_family.Metric(labels={"reason": reason})
                          for reason in ("stop", "length", "cancelled", "timeout", "error")}

    def _on_stats(self, stats):
        values = {"free_blocks": stats.free_blocks, "used_blocks": stats.total_blocks - stats.free_blocks,
                  "running": stats.running, "waiting": stats.waiting, "sessions": stats.sessions}
        for name, value in values.items():
            self._gauges[name].set(value)

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                start, end = io.sequence_flags(pb_utils, request)
                if io.optional_bool(pb_utils, request, "stop", False):
                    self.service.stop(request.correlation_id(), end, self._stop_reply(sender))
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
                self.service.submit(inputs, self._sender(sender), is_cancelled=request.is_cancelled)
            except InvalidRequest as exc:
                sender.send(io.error_response(pb_utils, str(exc)), flags=FINAL)
        return None

    def _sender(self, sender):
        def send(text, out):
            if out.finished:
                self._finished[out.finish_reason.value if out.finish_reason else "error"].increment(1)
            if out.error:
                sender.send(io.error_response(pb_utils, out.error), flags=FINAL)
                return
            reason = out.finish_reason.value if out.finish_reason else ""
            response = io.text_response(pb_utils, text, reason, out.num_input_tokens, out.num_output_tokens,
                                        out.logprobs)
            sender.send(response, flags=FINAL if out.finished else 0)

        return self.outbox.stream(send)

    @staticmethod
    def _stop_reply(sender):
        def reply(error):
            if error:
                sender.send(io.error_response(pb_utils, error), flags=FINAL)
            else:
                sender.send(io.text_response(pb_utils, "", "stopped", 0, 0), flags=FINAL)

        return reply

    def finalize(self):
        self.stop_listener.close()
        self.service.shutdown()
        self.outbox.close()
        # Drop the metrics while the stub can still talk to the server: a Metric collected later,
        # at interpreter exit, reaches for freed shared memory and the stub segfaults on the way out.
        self._gauges.clear()
        self._finished.clear()
        del self._kv, self._requests, self._sessions, self._finished_family
