"""Entry point for all clients: gives each request a sequence id and relays the ensemble's stream.

granite_llm is sequence-batched, so every request into the ensemble needs a correlation id;
Triton 2.51's Python backend cannot assign one from inside an ensemble step, hence this BLS front.
Triton 2.51 also does not forward a client's cancellation into an ensemble: when this request is
cancelled (gRPC cancel, HTTP disconnect) the front tells granite_llm to stop that sequence over
the side channel of ``spyre_backend.serving.control``.
"""

import itertools
import json
import os
import threading

import triton_python_backend_utils as pb_utils

from spyre_backend.serving import triton_io as io
from spyre_backend.serving.control import polled_every, request_stop, send_stop
from spyre_backend.serving.deferred_release import DeferredRelease

PIPELINE = "granite_vision_ensemble"
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
START_END = pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START | pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END


def _drain(responses):
    for _ in responses:  # the iterator must reach its end to be let go (see DeferredRelease)
        pass


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.inputs = [i["name"] for i in config["input"]]
        self.required = [i["name"] for i in config["input"] if not i.get("optional", False)]
        self.outputs = [o["name"] for o in config["output"]]
        # Ids for clients that send none: a per-process range far from small client-chosen ids.
        self._ids = itertools.count((1 << 62) + (os.getpid() << 24))
        self._release = DeferredRelease(name="granite_vision-release")
        starts = int(config.get("parameters", {}).get("max_pipeline_starts", {}).get("string_value", "24"))
        if starts < 1:
            raise pb_utils.TritonModelException(f"max_pipeline_starts must be >= 1, got {starts}")
        self._starts = threading.BoundedSemaphore(starts)  # see config.pbtxt

    def execute(self, requests):
        for request in requests:
            threading.Thread(target=self._relay, args=(request,), daemon=True).start()
        return None

    def _relay(self, request):
        sender = request.get_response_sender()
        try:
            if self._is_stop(request):
                return self._stop(request, sender)
            sequence_id = request.correlation_id()
            if sequence_id:  # the client runs its own sequence: keep its id and START/END bits
                flags = request.flags()
            else:
                sequence_id, flags = next(self._ids), START_END
            inputs = [t for t in (pb_utils.get_input_tensor_by_name(request, n) for n in self.inputs) if t is not None]
            missing = sorted(set(self.required) - {t.name() for t in inputs})
            if missing:
                sender.send(io.error_response(pb_utils, f"missing required input(s) {missing}"), flags=FINAL)
                return
            with self._starts:  # exec() returns at the first response; see max_pipeline_starts
                responses = pb_utils.InferenceRequest(
                    model_name=PIPELINE, inputs=inputs, requested_output_names=self.outputs,
                    correlation_id=sequence_id, flags=flags,
                ).exec(decoupled=True)
            try:
                self._forward(request, sender, sequence_id, responses)
            except Exception as exc:
                self._abandon(sequence_id, responses, sender, f"granite_vision: {exc}")
            finally:
                self._release.later(responses)  # see DeferredRelease: never let the stub drop it
        except Exception as exc:  # never leave a client without a final response
            try:
                sender.send(io.error_response(pb_utils, f"granite_vision: {exc}"), flags=FINAL)
            except Exception:
                pass  # the client is gone

    def _forward(self, request, sender, sequence_id, responses):
        """Relays the pipeline's stream to the client; returns only once the stream is read to its end."""
        wanted = set(request.requested_output_names()) or set(self.outputs)
        is_cancelled = polled_every(request.is_cancelled)  # an IPC round trip: not once per token
        for response in responses:
            if is_cancelled():
                return self._abandon(sequence_id, responses, sender)
            if response.has_error():
                sender.send(io.error_response(pb_utils, response.error().message()), flags=FINAL)
                return _drain(responses)
            if not response.output_tensors():
                continue  # the pipeline's empty closing response
            # Only the outputs the client asked for: the stub drops the others without the GIL.
            # Copies, because a BLS response's tensors live in shared memory freed with it.
            outputs = [pb_utils.Tensor(t.name(), t.as_numpy().copy())
                       for t in response.output_tensors() if t.name() in wanted]
            reason = pb_utils.get_output_tensor_by_name(response, "finish_reason").as_numpy().reshape(-1)[0]
            last = bool(reason)  # granite_llm sets a finish reason on its last response only
            try:
                sender.send(pb_utils.InferenceResponse(output_tensors=outputs), flags=FINAL if last else 0)
            except Exception:  # the client is gone (cancelled or disconnected) before we noticed
                return self._abandon(sequence_id, responses, sender)
            if last:
                return _drain(responses)
        sender.send(io.error_response(pb_utils, "the pipeline ended without a final response"), flags=FINAL)

    @staticmethod
    def _is_stop(request):
        stop = pb_utils.get_input_tensor_by_name(request, "stop")
        return stop is not None and bool(stop.as_numpy().reshape(-1)[:1].any())

    @staticmethod
    def _stop(request, sender):
        """A client's stop request goes straight to granite_llm: through the ensemble it would queue
        behind the very turn it stops."""
        sequence_id = request.correlation_id()
        if not sequence_id:
            error = "a stop request needs the sequence id of the turn to stop"
        else:
            end = bool(request.flags() & pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END)
            error = request_stop(sequence_id, end)
        if error:
            sender.send(io.error_response(pb_utils, error), flags=FINAL)
        else:
            names = request.requested_output_names()
            sender.send(io.text_response(pb_utils, "", "stopped", 0, 0, names=names), flags=FINAL)

    @staticmethod
    def _abandon(sequence_id, responses, sender, message="request cancelled"):
        """The client went away: stop the generation, let the pipeline close, end our request."""
        send_stop(sequence_id)
        resent = False
        for _ in responses:
            if not resent:  # it may not have reached granite_llm at the first stop: now it has
                send_stop(sequence_id)
                resent = True
        try:
            sender.send(io.error_response(pb_utils, message), flags=FINAL)
        except Exception:
            pass  # nobody is listening; the request still ends

    def finalize(self):
        self._release.close()
