"""Triton adapter for spyre_backend.serving.vision_service (vision tower + projector)."""

import triton_python_backend_utils as pb_utils

from spyre_backend.config import ServingConfig
from spyre_backend.serving import triton_io as io
from spyre_backend.serving.metrics import EncoderCacheMetrics
from spyre_backend.serving.orphan_watch import exit_with_parent
from spyre_backend.serving.replies import answer_each
from spyre_backend.serving.vision_service import VisionService


class TritonPythonModel:
    def initialize(self, args):
        exit_with_parent()  # no orphan stub if tritonserver crashes
        self.service = VisionService(ServingConfig.from_model_config(args["model_config"]))
        self.metrics = EncoderCacheMetrics(pb_utils)

    def execute(self, requests):
        # any error: bad shapes from a direct caller (the ensemble sends valid ones)
        responses = answer_each(pb_utils, requests, self._encode, refused=Exception, prefix="vision_encoder: ")
        self.metrics.report(self.service.cache_counts())
        return responses

    def _encode(self, request):
        features = self.service.encode(io.tensor(pb_utils, request, "pixel_values"),
                                       io.tensor(pb_utils, request, "image_sizes"),
                                       io.optional_text(pb_utils, request, "cache_salt") or "")
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("image_features", features)])

    def finalize(self):
        self.metrics.close()
