"""Triton adapter for spyre_backend's LLM engine (decoupled, sequence-batched)."""

import triton_python_backend_utils as pb_utils

from spyre_backend.config import ServingConfig
from spyre_backend.engine.sampling_params import InvalidRequest
from spyre_backend.serving import triton_io as io
from spyre_backend.serving.llm_service import GenerateInputs, LLMService

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        self.service = LLMService(ServingConfig.from_model_config(args["model_config"]))

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                inputs = GenerateInputs(
                    input_ids=io.tensor(pb_utils, request, "input_ids"),
                    image_features=io.tensor(pb_utils, request, "image_features"),
                    prompt_text=io.optional_text(pb_utils, request, "text_input") or "",
                    stream=io.optional_bool(pb_utils, request, "stream", False),
                    exclude_input_in_output=io.optional_bool(pb_utils, request, "exclude_input_in_output", False),
                    max_tokens=io.optional_int(pb_utils, request, "max_tokens"),
                    sampling_parameters=io.optional_text(pb_utils, request, "sampling_parameters"),
                    sequence_id=request.correlation_id(),
                )
                self.service.submit(inputs, self._sender(sender), is_cancelled=request.is_cancelled)
            except InvalidRequest as exc:
                sender.send(io.error_response(pb_utils, str(exc)), flags=FINAL)
        return None

    @staticmethod
    def _sender(sender):
        def send(text, out):
            if out.error:
                sender.send(io.error_response(pb_utils, out.error), flags=FINAL)
                return
            reason = out.finish_reason.value if out.finish_reason else ""
            response = io.text_response(pb_utils, text, reason, out.num_input_tokens, out.num_output_tokens)
            sender.send(response, flags=FINAL if out.finished else 0)

        return send

    def finalize(self):
        self.service.shutdown()
