"""Triton adapter for spyre_backend.vision (vision tower + projector)."""

import logging
import time

import torch
import triton_python_backend_utils as pb_utils

from spyre_backend.config import ServingConfig
from spyre_backend.multimodal import get_spec
from spyre_backend.serving import triton_io as io
from spyre_backend.serving.warmup import warmup_vision
from spyre_backend.vision.encoder import VisionEncoder


class TritonPythonModel:
    def initialize(self, args):
        started = time.monotonic()
        config = ServingConfig.from_model_config(args["model_config"])
        config.apply_threads()
        plan = config.device_plan()
        self.encoder = VisionEncoder(config.checkpoint_dir, plan)
        loaded = time.monotonic() - started
        warmed = warmup_vision(self.encoder, config.checkpoint_dir, get_spec(config.checkpoint_dir), config.max_images)
        logging.getLogger(__name__).warning(
            "vision_encoder: loaded in %.1f s, warmup %.1f s (%s, %s, %s; crop batches %s)", loaded, warmed,
            plan.kind, plan.compile_backend, config.dtype, sorted(self.encoder.crop_batches_run))

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
        return responses
