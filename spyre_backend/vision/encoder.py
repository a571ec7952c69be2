"""Encodes preprocessed images into the features that replace the image placeholders.

Generic over architectures: the model's file (``spyre_backend.models``) loads the vision model
(never the LLM's decoder layers), says how many crops an image has, runs the tower on crops and
packs an image's crop features. Here: the tower runs on a static number of crops (a power of two
up to ``max_crop_batch``, padded with zero crops), so a compiled program exists for every request;
packing stays in eager Python. Crops never interact in the tower, so an image's crops may go in
several runs.

Each image is encoded in a batch of its own crops, so its features depend on that image alone:
that is what lets an optional EncoderCache hand back a repeated image's features, bit for bit
those of a fresh encode, whatever other images came with either request.
"""

from __future__ import annotations

import torch

from spyre_backend.device import DevicePlan, memory, resolve
from spyre_backend.models import get_spec
from spyre_backend.vision.cache import EncoderCache, image_key


# Crops per tower run, auto: enough for this many patch rows in each matmul. More crops make the
# GEMMs no faster, only the activations bigger: the mid-size tower (729 patches a crop) took
# 0.70-0.80 s a crop in runs of 2, 0.88-1.18 s in runs of 8 (three measurements). A tiny tower
# (16 patches a crop) needs the batch to amortize its per-op overhead.
CROP_BATCH_ROWS = 2048


def next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def crop_batches(n: int, max_batch: int) -> list[int]:
    """Tower runs (power-of-two sizes up to ``max_batch``) for an image of ``n`` crops: the next
    size up when that pads at most one crop, else the largest size that fits and the rest
    likewise. 7 crops -> [8]; 5 -> [4, 1]; 11 (max 2) -> [2, 2, 2, 2, 2, 1]."""
    batches = []
    while n > 0:
        up = min(next_power_of_two(n), max_batch)
        if up - n > 1:
            up //= 2
        batches.append(up)
        n -= up
    return batches


def auto_crop_batch(patches_per_crop: int) -> int:
    return 1 << max(0, (CROP_BATCH_ROWS // max(1, patches_per_crop)).bit_length() - 1)


class VisionEncoder:
    def __init__(self, checkpoint: str, plan: DevicePlan | None = None, cache: EncoderCache | None = None,
                 max_crop_batch: int = 0):
        """``max_crop_batch``: most crops in one tower run (rounded down to a power of two); 0: auto
        (CROP_BATCH_ROWS)."""
        self.plan = plan or resolve("cpu", "eager", torch.float32)
        self.device, self.dtype = self.plan.torch_device, self.plan.dtype
        self.spec = get_spec(checkpoint)
        memory.vision_estimate(checkpoint, self.dtype, self.spec).check(memory.available_bytes(self.device))
        self.model = self.spec.load_vision_model(checkpoint, self.dtype, self.device.type)
        self.layers_prepared = self.plan.prepare(self.model)
        self.hidden_size = self.spec.text.hidden_size  # the features replace LLM token embeddings
        self.max_crop_batch = (1 << (max_crop_batch.bit_length() - 1) if max_crop_batch
                               else auto_crop_batch(self.spec.vision.patches_per_crop))
        # a model that compiles its decode steps only runs the tower eager (DevicePlan.compiles_all_steps)
        self.compiled = self.plan.compile_backend != "eager" and self.plan.compiles_all_steps
        self._tower = self.plan.compile(self._tower_impl, name="vision_tower") if self.compiled else self._tower_impl
        self.crop_batches_run: set[int] = set()
        self.cache = cache

    def _tower_impl(self, crops: torch.Tensor) -> torch.Tensor:
        """[n, 3, H, W] crops -> [n, patches, hidden] (what is compiled)."""
        return self.spec.encode_crops(self.model, crops)

    def crops_per_image(self, image_size: torch.Tensor) -> int:
        """Real crops of an image of ``image_size`` (height, width): the rest of its row of
        pixel_values is the processor's padding to the request's largest image."""
        return self.spec.crops_per_image(self.model, image_size)

    def run_tower(self, crops: torch.Tensor) -> torch.Tensor:
        """[n, 3, H, W] crops of one image -> [n, patches, hidden], in runs of crop_batches()."""
        outputs, start = [], 0
        for batch in crop_batches(crops.shape[0], self.max_crop_batch):
            part = crops[start: start + batch]
            real = part.shape[0]
            if real != batch:
                part = torch.cat([part, part.new_zeros(batch - real, *part.shape[1:])])
            if batch not in self.crop_batches_run:  # its first run compiles (warmup): later runs reuse the graph
                self.crop_batches_run.add(batch)
                self.plan.mark_bucket_dims((part, 0))
            outputs.append(self._tower(part)[:real])
            start += real
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor, cache_salt: str = "") -> torch.Tensor:
        """pixel_values [num_images, max_crops, 3, H, W], image_sizes [num_images, 2] ->
        features [total_features, hidden], images in order, each packed by its model (``pack_image``).
        ``cache_salt``: the tenant's; its cache hits are only its own."""
        if pixel_values.shape[0] == 0:
            return torch.zeros(0, self.hidden_size, dtype=self.dtype)
        features = []
        for pv, size in zip(pixel_values, image_sizes):
            crops = pv[:self.crops_per_image(size)]
            if self.cache is None:
                features.append(self._encode_image(crops, size))
                continue
            key = image_key(crops, size, cache_salt)
            image = self.cache.get(key)
            if image is None:
                image = self._encode_image(crops, size)
                self.cache.put(key, image)
            features.append(image)
        return torch.cat(features)

    def _encode_image(self, crops: torch.Tensor, image_size: torch.Tensor) -> torch.Tensor:
        return self.spec.pack_image(self.model, self.run_tower(crops.to(self.device, self.dtype)), image_size)

    @torch.no_grad()
    def warmup(self, crops: torch.Tensor, max_crops: int) -> list[int]:
        """Run every tower batch size an image of up to ``max_crops`` crops can use, on real
        preprocessed crops (raw pixels of a real image, tiled to fill the batch), so each compiled
        program exists before serving."""
        sizes, b = [], 1
        while b <= min(next_power_of_two(max_crops), self.max_crop_batch):
            sizes.append(b)
            b *= 2
        crops = crops.to(self.device, self.dtype)
        for size in sizes:
            self.run_tower(crops.repeat((size + crops.shape[0] - 1) // crops.shape[0], 1, 1, 1)[:size])
        return sizes
