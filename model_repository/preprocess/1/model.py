"""Triton adapter for spyre_backend.preprocess (HF processor)."""

import triton_python_backend_utils as pb_utils

from spyre_backend.config import ServingConfig
from spyre_backend.errors import InvalidRequest
from spyre_backend.preprocess.processor import Preprocessor
from spyre_backend.serving import triton_io as io
from spyre_backend.serving.orphan_watch import exit_with_parent


class TritonPythonModel:
    def initialize(self, args):
        exit_with_parent()  # no orphan stub if tritonserver crashes
        config = ServingConfig.from_model_config(args["model_config"])
        self.preprocessor = Preprocessor(config.checkpoint_dir, config.input_limits(),
                                         image_cache_mb=config.vision.processed_image_cache_mb)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                if io.optional_bool(pb_utils, request, "stop", False):
                    # a stop request only travels through to granite_llm: nothing to preprocess
                    responses.append(self._outputs(self.preprocessor.empty()))
                    continue
                text = io.optional_text(pb_utils, request, "text_input")
                if text is None:
                    raise InvalidRequest("input 'text_input' is required")
                out = self.preprocessor(
                    text, io.image_list(pb_utils, request),
                    apply_chat_template=io.optional_bool(pb_utils, request, "apply_chat_template", False),
                )
                responses.append(self._outputs(out))
            except InvalidRequest as exc:
                responses.append(io.error_response(pb_utils, str(exc)))
        return responses

    @staticmethod
    def _outputs(out):
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("input_ids", out.input_ids),
            pb_utils.Tensor("pixel_values", out.pixel_values),
            pb_utils.Tensor("image_sizes", out.image_sizes),
        ])
