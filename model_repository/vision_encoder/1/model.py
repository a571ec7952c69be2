"""Triton adapter for spyre_backend.vision (vision tower + projector)."""

import torch
import triton_python_backend_utils as pb_utils

from spyre_backend.config import ServingConfig
from spyre_backend.serving import triton_io as io
from spyre_backend.vision.encoder import VisionEncoder


class TritonPythonModel:
    def initialize(self, args):
        config = ServingConfig.from_model_config(args["model_config"])
        config.apply_threads()
        self.encoder = VisionEncoder(config.checkpoint_dir, device=config.torch_device, dtype=config.torch_dtype)

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
