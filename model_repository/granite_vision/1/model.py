"""Entry point for all clients: gives each request a sequence id and relays the ensemble's stream.

granite_llm is sequence-batched, so every request into the ensemble needs a correlation id;
Triton 2.51's Python backend cannot assign one from inside an ensemble step, hence this BLS front.
"""

import itertools
import os
import threading

import triton_python_backend_utils as pb_utils

from spyre_backend.serving import triton_io as io

PIPELINE = "granite_vision_ensemble"
INPUTS = ("text_input", "image", "apply_chat_template", "max_tokens", "stream", "sampling_parameters",
          "exclude_input_in_output")
OUTPUTS = ["text_output", "finish_reason", "num_input_tokens", "num_output_tokens"]
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
START_END = pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START | pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END


class TritonPythonModel:
    def initialize(self, args):
        # Ids handed to clients that send none: a per-process range far from small client ids.
        self._ids = itertools.count((1 << 62) + (os.getpid() << 24))

    def execute(self, requests):
        for request in requests:
            threading.Thread(target=self._relay, args=(request,), daemon=True).start()
        return None

    def _relay(self, request):
        sender = request.get_response_sender()
        try:
            sequence_id = request.correlation_id()
            if sequence_id:  # the client runs its own sequence: keep its id and START/END bits
                flags = request.flags()
            else:
                sequence_id, flags = next(self._ids), START_END
            inputs = [t for t in (pb_utils.get_input_tensor_by_name(request, n) for n in INPUTS) if t is not None]
            pipeline = pb_utils.InferenceRequest(
                model_name=PIPELINE, inputs=inputs, requested_output_names=OUTPUTS,
                correlation_id=sequence_id, flags=flags,
            )
            for response in pipeline.exec(decoupled=True):
                if response.has_error():
                    sender.send(io.error_response(pb_utils, response.error().message()), flags=FINAL)
                    return
                outputs = response.output_tensors()
                if not outputs:
                    continue  # the pipeline's empty closing response
                reason = pb_utils.get_output_tensor_by_name(response, "finish_reason").as_numpy().reshape(-1)[0]
                last = bool(reason)  # granite_llm sets a finish reason on its last response only
                sender.send(pb_utils.InferenceResponse(output_tensors=outputs), flags=FINAL if last else 0)
                if last:
                    return
            sender.send(io.error_response(pb_utils, "the pipeline ended without a final response"), flags=FINAL)
        except Exception as exc:  # never leave a client without a final response
            sender.send(io.error_response(pb_utils, f"granite_vision: {exc}"), flags=FINAL)
