"""Encodes preprocessed images into the features that replace ``<image>`` placeholders.

Uses FMS's LlavaNext loaded with ``vision_only=True`` (vision tower, projector, image_newline):
the LLM's decoder layers are never loaded here.
"""

from __future__ import annotations

import torch
from fms.models import get_model


class VisionEncoder:
    def __init__(self, checkpoint: str, *, device: torch.device, dtype: torch.dtype):
        self.device = device
        self.dtype = dtype
        self.model = get_model(architecture="hf_pretrained", model_path=checkpoint, data_type=dtype,
                               device_type=device.type, vision_only=True).eval()
        self.hidden_size = self.model.config.text_config.emb_dim

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        """pixel_values [num_images, max_crops, 3, H, W], image_sizes [num_images, 2] ->
        features [total_features, hidden], images in order, each packed with image_newline."""
        if pixel_values.shape[0] == 0:
            return torch.zeros(0, self.hidden_size, dtype=self.dtype)
        pixel_values = pixel_values.to(self.device, self.dtype)
        per_image = self.model.get_image_features(pixel_values, image_sizes)
        return self.model.pack_image_features(per_image, image_sizes, image_newline=self.model.image_newline)
