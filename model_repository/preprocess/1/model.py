"""Triton adapter for spyre_backend.preprocess (HF processor)."""

import triton_python_backend_utils as pb_utils

from spyre_backend.config import ServingConfig
from spyre_backend.errors import InvalidRequest
from spyre_backend.preprocess.options import MediaIds, MediaOptions
from spyre_backend.preprocess.processor import Preprocessor
from spyre_backend.serving import triton_io as io
from spyre_backend.serving.metrics import PreprocessMetrics
from spyre_backend.serving.orphan_watch import exit_with_parent
from spyre_backend.serving.replies import answer_each


class TritonPythonModel:
    def initialize(self, args):
        exit_with_parent()  # no orphan stub if tritonserver crashes
        config = ServingConfig.from_model_config(args["model_config"])
        self.metrics = PreprocessMetrics(pb_utils)
        try:
            self.preprocessor = Preprocessor(config.checkpoint_dir, config.input_limits(),
                                             image_cache_mb=config.vision.processed_image_cache_mb)
            self.preprocessor.documents.renderer.start()  # the PDF renderer's child, ready for the first document
        except BaseException:
            self.metrics.close()  # no finalize() follows a failed initialize()
            raise

    def execute(self, requests):
        return answer_each(pb_utils, requests, self._preprocess)

    def _preprocess(self, request):
        if io.optional_bool(pb_utils, request, "stop", False):
            # a stop request only travels through to granite_llm: nothing to preprocess
            return self._outputs(self.preprocessor.empty())
        text = io.optional_text(pb_utils, request, "text_input")
        if text is None:
            raise InvalidRequest("input 'text_input' is required")
        preprocessor = self.preprocessor
        try:
            return self._outputs(preprocessor(
                text, io.image_list(pb_utils, request),
                apply_chat_template=io.optional_bool(pb_utils, request, "apply_chat_template", False),
                documents=io.image_list(pb_utils, request, "document"),
                options=MediaOptions.from_json(io.optional_text(pb_utils, request, "mm_processor_kwargs")),
                ids=MediaIds(io.text_list(pb_utils, request, "image_uuid"),
                             io.text_list(pb_utils, request, "document_uuid"),
                             io.optional_text(pb_utils, request, "cache_salt") or ""),
            ))
        finally:
            self.metrics.report(preprocessor)

    @staticmethod
    def _outputs(out):
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("input_ids", out.input_ids),
            pb_utils.Tensor("pixel_values", out.pixel_values),
            pb_utils.Tensor("image_sizes", out.image_sizes),
        ])

    def finalize(self):
        self.preprocessor.documents.close()  # the page renderer's child process
        self.metrics.close()
