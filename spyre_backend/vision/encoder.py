"""Encodes preprocessed images into the features that replace the image placeholders.

Uses FMS's LlavaNext loaded with ``vision_only=True`` (vision tower, projector, image_newline):
the LLM's decoder layers are never loaded here. The tower and projector run on a static number
of crops (a power of two, padded with zero crops), so a compiled program exists for every
request; choosing the anyres grid and packing with image_newline stay in eager Python.

Each image is encoded in a batch of its own crops, so its features depend on that image alone:
that is what lets an optional EncoderCache hand back a repeated image's features, bit for bit
those of a fresh encode, whatever other images came with either request.
"""

from __future__ import annotations

import torch
from fms.models import get_model

from spyre_backend.device import DevicePlan, resolve
from spyre_backend.vision.cache import EncoderCache, image_key


def next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class VisionEncoder:
    def __init__(self, checkpoint: str, plan: DevicePlan | None = None, cache: EncoderCache | None = None):
        self.plan = plan or resolve("cpu", "eager", torch.float32)
        self.device, self.dtype = self.plan.torch_device, self.plan.dtype
        self.model = get_model(architecture="hf_pretrained", model_path=checkpoint, data_type=self.dtype,
                               device_type=self.device.type, vision_only=True).eval()
        config = self.model.config
        self.hidden_size = config.text_config.emb_dim
        self.crop_size = config.vision_config.image_size
        self._tower = self.plan.compile(self._tower_impl, name="vision_tower")
        self.crop_batches_run: set[int] = set()
        self.cache = cache

    def _tower_impl(self, crops: torch.Tensor) -> torch.Tensor:
        """[n, 3, H, W] crops -> [n, patches, hidden] projected multi-layer features."""
        config = self.model.config
        _, _, hidden_states = self.model.vision_tower(crops, output_hidden_states=True)
        layers = config.vision_feature_layer
        layers = [layers] if isinstance(layers, int) else layers
        selected = torch.cat([hidden_states[i] for i in layers], dim=-1)
        if config.vision_feature_select_strategy == "default":
            selected = selected[:, 1:]  # drop CLS (SigLIP has none: Granite Vision uses "full")
        return self.model.multi_modal_projector(selected)

    def run_tower(self, crops: torch.Tensor) -> torch.Tensor:
        n = crops.shape[0]
        batch = next_power_of_two(n)
        if batch != n:
            crops = torch.cat([crops, crops.new_zeros(batch - n, *crops.shape[1:])])
        if batch not in self.crop_batches_run:  # its first run compiles (warmup): later runs reuse the graph
            self.crop_batches_run.add(batch)
            self.plan.mark_bucket_dims((crops, 0))
        return self._tower(crops)[:n]

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        """pixel_values [num_images, max_crops, 3, H, W], image_sizes [num_images, 2] ->
        features [total_features, hidden], images in order, each packed with image_newline."""
        if pixel_values.shape[0] == 0:
            return torch.zeros(0, self.hidden_size, dtype=self.dtype)
        config = self.model.config
        counts = [self.model.image_size_to_num_patches(size, config.image_grid_pinpoints, self.crop_size)
                  for size in image_sizes]
        features = []
        for pv, n, size in zip(pixel_values, counts, image_sizes):
            crops = pv[:n]  # the rest is the processor's padding to the request's largest image
            if self.cache is None:
                features.append(self._encode_image(crops, size))
                continue
            key = image_key(crops, size)
            image = self.cache.get(key)
            if image is None:
                image = self._encode_image(crops, size)
                self.cache.put(key, image)
            features.append(image)
        return torch.cat(features)

    def _encode_image(self, crops: torch.Tensor, image_size: torch.Tensor) -> torch.Tensor:
        tower = self.run_tower(crops.to(self.device, self.dtype))
        return self.model.pack_image_features([tower], image_size[None], image_newline=self.model.image_newline)

    @torch.no_grad()
    def warmup(self, crops: torch.Tensor, max_crops: int) -> list[int]:
        """Run every crop-batch size up to ``max_crops`` on real preprocessed crops (raw pixels of
        a real image, tiled to fill the batch), so each compiled program exists before serving."""
        sizes, b = [], 1
        while b < next_power_of_two(max_crops) * 2:
            sizes.append(b)
            b *= 2
        crops = crops.to(self.device, self.dtype)
        for size in sizes:
            self.run_tower(crops.repeat((size + crops.shape[0] - 1) // crops.shape[0], 1, 1, 1)[:size])
        return sizes
