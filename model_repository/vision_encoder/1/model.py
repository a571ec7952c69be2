"""Triton adapter for spyre_backend.serving.vision_service (vision tower + projector)."""

import triton_python_backend_utils as pb_utils

from spyre_backend.config import ServingConfig
from spyre_backend.serving import triton_io as io
from spyre_backend.serving.vision_service import VisionService
from spyre_backend.serving.orphan_watch import exit_with_parent


class TritonPythonModel:
    def initialize(self, args):
        exit_with_parent()  # no orphan stub if tritonserver crashes
        self.service = VisionService(ServingConfig.from_model_config(args["model_config"]))
        self._init_metrics()

    def _init_metrics(self):
        self._cache_family = pb_utils.MetricFamily(
            name="spyre_encoder_cache", description="Images looked up in the encoder cache, by result",
            kind=pb_utils.MetricFamily.COUNTER)
        self._cache_bytes_family = pb_utils.MetricFamily(
            name="spyre_encoder_cache_bytes", description="Bytes of image features held by the encoder cache",
            kind=pb_utils.MetricFamily.GAUGE)
        self._hits = self._cache_family.Metric(labels={"result": "hit"})
        self._misses = self._cache_family.Metric(labels={"result": "miss"})
        self._cache_bytes = self._cache_bytes_family.Metric(labels={})
        self._reported = (0, 0, 0)  # hits, misses, bytes as last sent

    def _report_cache(self):
        counts = self.service.cache_counts()
        if counts is None:
            return
        # each metric update is a round trip to the server: send only what changed
        hits, misses, size = counts
        last_hits, last_misses, last_size = self._reported
        if hits != last_hits:
            self._hits.increment(hits - last_hits)
        if misses != last_misses:
            self._misses.increment(misses - last_misses)
        if size != last_size:
            self._cache_bytes.set(size)
        self._reported = (hits, misses, size)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                features = self.service.encode(io.tensor(pb_utils, request, "pixel_values"),
                                               io.tensor(pb_utils, request, "image_sizes"))
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("image_features", features),
                ]))
            except Exception as exc:  # bad shapes from a direct caller; the ensemble sends valid ones
                responses.append(io.error_response(pb_utils, f"vision_encoder: {exc}"))
        self._report_cache()
        return responses

    def finalize(self):
        # Drop the metrics while the stub can still talk to the server: a Metric collected later,
        # at interpreter exit, reaches for freed shared memory and the stub segfaults on the way out.
        del self._hits, self._misses, self._cache_bytes
        del self._cache_family, self._cache_bytes_family
