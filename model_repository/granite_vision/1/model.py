"""Entry point for all clients: gives each request a sequence id and relays the ensemble's stream.

granite_llm is sequence-batched, so every request into the ensemble needs a correlation id;
Triton 2.51's Python backend cannot assign one from inside an ensemble step, hence this BLS front.
Triton 2.51 also does not forward a client's cancellation into an ensemble: when this request is
cancelled (gRPC cancel, HTTP disconnect) the front sends a ``stop`` request on the same sequence id.
"""

import itertools
import json
import os
import threading

import numpy as np
import triton_python_backend_utils as pb_utils

from spyre_backend.serving import triton_io as io

PIPELINE = "granite_vision_ensemble"
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
START = pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START
END = pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.inputs = [i["name"] for i in config["input"]]
        self.required = [i["name"] for i in config["input"] if not i.get("optional", False)]
        self.outputs = [o["name"] for o in config["output"]]
        # Ids for clients that send none: a per-process range far from small client-chosen ids.
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
                sequence_id, flags = next(self._ids), START | END
            inputs = [t for t in (pb_utils.get_input_tensor_by_name(request, n) for n in self.inputs) if t is not None]
            missing = sorted(set(self.required) - {t.name() for t in inputs})
            if missing:
                sender.send(io.error_response(pb_utils, f"missing required input(s) {missing}"), flags=FINAL)
                return
            responses = pb_utils.InferenceRequest(
                model_name=PIPELINE, inputs=inputs, requested_output_names=self.outputs,
                correlation_id=sequence_id, flags=flags,
            ).exec(decoupled=True)
            for response in responses:
                if request.is_cancelled():
                    self._stop(sequence_id, flags)
                    for _ in responses:  # let the pipeline close this request's stream
                        pass
                    sender.send(io.error_response(pb_utils, "request cancelled"), flags=FINAL)
                    return
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
            try:
                sender.send(io.error_response(pb_utils, f"granite_vision: {exc}"), flags=FINAL)
            except Exception:
                pass  # the client is gone

    def _stop(self, sequence_id, flags):
        # After END, Triton's sequence batcher wants START again on that id: a finished one-off
        # sequence is addressed as a fresh START|END request; an open session with no flags.
        end_flag = START | END if flags & END else 0
        stop = [pb_utils.Tensor("text_input", np.array([b""], dtype=np.object_)),
                pb_utils.Tensor("stop", np.array([True]))]
        request = pb_utils.InferenceRequest(model_name=PIPELINE, inputs=stop, requested_output_names=self.outputs,
                                            correlation_id=sequence_id, flags=end_flag)
        for _ in request.exec(decoupled=True):
            pass
