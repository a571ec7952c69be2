"""Triton adapter for spyre_backend.vision (vision tower + projector)."""

import logging
import time

import torch
import triton_python_backend_utils as pb_utils

from spyre_backend.config import ServingConfig
from spyre_backend.multimodal import get_spec
from spyre_backend.multimodal.registry import read_config
from spyre_backend.serving import triton_io as io
from spyre_backend.serving.warmup import warmup_vision
from spyre_backend.vision.cache import EncoderCache
from spyre_backend.vision.encoder import VisionEncoder


class TritonPythonModel:
    def initialize(self, args):
        started = time.monotonic()
        config = ServingConfig.from_model_config(args["model_config"])
        threads = config.apply_process_settings(read_config(config.checkpoint_dir)["vision_config"]["hidden_size"])
        plan = config.device_plan()
        self.encoder = VisionEncoder(config.checkpoint_dir, plan, max_crop_batch=config.max_crop_batch)
        loaded = time.monotonic() - started
        warmed = warmup_vision(self.encoder, config.checkpoint_dir, get_spec(config.checkpoint_dir))
        plan.seal_compiled()  # every crop batch ran; this process serves this model only
        # attached after warmup, so that the warmup image neither counts nor takes room
        if config.encoder_cache_mb:
            self.encoder.cache = EncoderCache(config.encoder_cache_mb * 2**20)
        self._init_metrics()
        logging.getLogger(__name__).warning(
            "vision_encoder: loaded in %.1f s, warmup %.1f s (%s, %s, %s, %d threads; crop batches %s; "
            "encoder cache %d MiB)", loaded, warmed, plan.kind, plan.compile_backend, config.dtype, threads,
            sorted(self.encoder.crop_batches_run),
            config.encoder_cache_mb)

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
        cache = self.encoder.cache
        if cache is None:
            return
        # each metric update is a round trip to the server: send only what changed
        hits, misses, size = cache.hits, cache.misses, cache.bytes
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
                pixels = torch.from_numpy(io.tensor(pb_utils, request, "pixel_values"))
                sizes = torch.from_numpy(io.tensor(pb_utils, request, "image_sizes"))
                features = self.encoder.encode(pixels, sizes).float().cpu().contiguous()
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("image_features", features.numpy()),
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
