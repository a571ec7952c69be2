"""Entry point for all clients: a thin adapter over spyre_backend.serving.front.FrontService
(sequence ids for clients that send none, the relay of the ensemble's stream, stops and
cancellation)."""

import functools
import json
import threading

import triton_python_backend_utils as pb_utils

from spyre_backend.serving import replies, triton_io as io
from spyre_backend.serving.deferred_release import DeferredRelease
from spyre_backend.serving.front import FrontService, ResponseKind
from spyre_backend.serving.orphan_watch import exit_with_parent
from spyre_backend.serving.routing import explain_lost_session, header_mismatch, session_header

PIPELINE = "granite_vision_ensemble"
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
START_END = pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START | pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END


def _kind(response):
    if response.has_error():
        return ResponseKind(error=response.error().message())
    if not response.output_tensors():
        return ResponseKind(empty=True)
    reason = pb_utils.get_output_tensor_by_name(response, "finish_reason").as_numpy().reshape(-1)[0]
    if reason == io.MIDSTREAM_ERROR.encode():
        text = pb_utils.get_output_tensor_by_name(response, "text_output").as_numpy().reshape(-1)[0]
        return ResponseKind(error=text.decode("utf-8", "replace"))
    return ResponseKind(last=bool(reason))


class TritonPythonModel:
    def initialize(self, args):
        exit_with_parent()  # no orphan stub if tritonserver crashes
        config = json.loads(args["model_config"])
        self.inputs = [i["name"] for i in config["input"]]
        self.required = [i["name"] for i in config["input"] if not i.get("optional", False)]
        self.outputs = [o["name"] for o in config["output"]]
        self.front = FrontService.from_model_config(config)
        self._release = DeferredRelease(name="granite_vision-release")

    def execute(self, requests):
        for request in requests:
            threading.Thread(target=self._relay, args=(request,), daemon=True).start()
        return None

    def _relay(self, request):
        sender = request.get_response_sender()
        send_error = functools.partial(replies.send_error, pb_utils, sender)
        try:
            mismatch = header_mismatch(request.correlation_id(), session_header(request.parameters()))
            if mismatch:
                return send_error(mismatch)
            if io.optional_bool(pb_utils, request, "stop", False):
                _, end = io.sequence_flags(pb_utils, request)
                error = self.front.stop(request.correlation_id(), end)
                return replies.reply_to_stop(pb_utils, sender, request.requested_output_names(), error)
            sequence_id, flags = self.front.sequence_for(request.correlation_id(), request.flags(), START_END)
            inputs = [t for t in (pb_utils.get_input_tensor_by_name(request, n) for n in self.inputs) if t is not None]
            missing = sorted(set(self.required) - {t.name() for t in inputs})
            if missing:
                return send_error(f"missing required input(s) {missing}")
            with self.front.pipeline_starts:  # exec() returns at the first response
                responses = pb_utils.InferenceRequest(
                    model_name=PIPELINE, inputs=inputs, requested_output_names=self.outputs,
                    correlation_id=sequence_id, flags=flags,
                ).exec(decoupled=True)
            wanted = set(request.requested_output_names()) or set(self.outputs)

            def forward(response, last):
                # Only the outputs the client asked for: the stub drops the others without the GIL.
                # Copies, because a BLS response's tensors live in shared memory freed with it.
                outputs = [pb_utils.Tensor(t.name(), t.as_numpy().copy())
                           for t in response.output_tensors() if t.name() in wanted]
                sender.send(pb_utils.InferenceResponse(output_tensors=outputs), flags=FINAL if last else 0)

            def send_pipeline_error(message):  # Triton's "START flag" refusal says: session lost
                send_error(explain_lost_session(message, sequence_id))

            try:
                self.front.relay(responses, sequence_id, kind=_kind, forward=forward, send_error=send_pipeline_error,
                                 is_cancelled=request.is_cancelled)
            except Exception as exc:
                self.front.abandon(sequence_id, responses, send_error, f"granite_vision: {exc}")
            finally:
                self._release.later(responses)  # see DeferredRelease: never let the stub drop it
        except Exception as exc:  # never leave a client without a final response
            try:
                send_error(f"granite_vision: {exc}")
            except Exception:
                pass  # the client is gone

    def finalize(self):
        self._release.close()
