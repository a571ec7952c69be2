"""Triton adapter for spyre_backend's LLM engine (decoupled, sequence-batched)."""

import functools

import triton_python_backend_utils as pb_utils

from spyre_backend.config import ServingConfig
from spyre_backend.errors import InvalidRequest
from spyre_backend.serving import triton_io as io
from spyre_backend.serving.control import StopListener
from spyre_backend.serving.llm_service import GenerateInputs, LLMService
from spyre_backend.serving.metrics import LLMMetrics
from spyre_backend.serving.outbox import Outbox
from spyre_backend.serving.orphan_watch import exit_with_parent
from spyre_backend.serving.replies import reply_to_stop, send_error

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        exit_with_parent()  # no orphan stub if tritonserver crashes
        self.metrics = LLMMetrics(pb_utils)
        try:
            config = ServingConfig.from_model_config(args["model_config"])
            # sends off the engine thread, merging when behind or within stream_interval_ms
            self.outbox = Outbox("granite_llm-responses", min_gap_s=config.stream_interval_ms / 1000)
            self.service = LLMService(config, on_stats=self.metrics.on_stats)  # warmed up: every shape ran
            self.service.seal_compiled()  # this process serves this model only
        except BaseException:
            self.metrics.close()  # finalize() is not called after a failed initialize()
            raise
        # stops from the granite_vision front: its clients' stop requests, and its clients going
        # away (see serving/control.py)
        self.stop_listener = StopListener(self.service.stop)

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            names = request.requested_output_names()  # send only these (see io.text_response)
            try:
                start, end = io.sequence_flags(pb_utils, request)
                if io.optional_bool(pb_utils, request, "stop", False):
                    reply = functools.partial(reply_to_stop, pb_utils, sender, names)
                    self.service.stop(request.correlation_id(), end, reply)
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
                    cache_salt=io.optional_text(pb_utils, request, "cache_salt") or "",
                )
                self.service.submit(inputs, self._sender(sender, names, self.service.image_tokens(inputs.input_ids)),
                                    is_cancelled=request.is_cancelled)
            except InvalidRequest as exc:
                send_error(pb_utils, sender, str(exc))
        return None

    def _sender(self, sender, names, num_image: int):
        started = []

        def send(text, out):
            if out.finished:  # counted before the client can see the end (tests rely on that)
                self.metrics.count_finished(out)
            try:
                if out.error and not started:
                    return send_error(pb_utils, sender, out.error)
                if out.error:  # after the stream began: in band (see io.MIDSTREAM_ERROR)
                    return sender.send(io.text_response(pb_utils, out.error, io.MIDSTREAM_ERROR, out.num_input_tokens,
                                                        out.num_output_tokens, names=names), flags=FINAL)
                started.append(True)
                reason = out.finish_reason.value if out.finish_reason else ""
                response = io.text_response(pb_utils, text, reason, out.num_input_tokens, out.num_output_tokens,
                                            out.logprobs, names=names, num_cached=out.num_cached_tokens,
                                            num_image=num_image)
                sender.send(response, flags=FINAL if out.finished else 0)
            finally:
                if out.finished:
                    self.metrics.record_timing(out)  # after the response: the client need not wait for it

        return self.outbox.stream(send)

    def finalize(self):
        self.stop_listener.close()
        self.service.shutdown()
        self.outbox.close()
        self.metrics.close()
