"""The vision_encoder model's service: the tower loaded, warmed up and sealed, with its feature cache.

``model_repository/vision_encoder/1/model.py`` only moves tensors and metrics in and out of it.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from spyre_backend.config import ServingConfig
from spyre_backend.device import memory, plan_for, process
from spyre_backend.models import get_spec
from spyre_backend.serving.warmup import warmup_vision
from spyre_backend.vision.cache import EncoderCache
from spyre_backend.vision.encoder import VisionEncoder

log = logging.getLogger(__name__)


class VisionService:
    def __init__(self, config: ServingConfig):
        started = time.monotonic()
        checkpoint = config.checkpoint_dir
        spec = get_spec(checkpoint)
        threads = process.apply_threads(config.device, spec.vision.hidden_size)
        plan = plan_for(config.device, checkpoint)
        self.encoder = VisionEncoder(checkpoint, plan, max_crop_batch=config.vision.max_crop_batch)
        loaded = time.monotonic() - started
        process.apply_serving_allocator()
        warmed = warmup_vision(self.encoder, checkpoint, spec)
        plan.seal_compiled()  # every crop batch ran; this process serves this model only
        # attached after warmup, so that the warmup image neither counts nor takes room
        if config.vision.encoder_cache_mb:
            self.encoder.cache = EncoderCache(config.vision.encoder_cache_mb * 2**20)
        resident, peak = memory.resident_bytes()
        log.warning("vision_encoder: loaded in %.1f s, warmup %.1f s (%s, %s, %s, %d threads; crop batches %s; "
                    "encoder cache %d MiB); memory: weights %s, resident %s, peak %s", loaded, warmed, plan.kind,
                    plan.compile_backend if self.encoder.compiled else "eager", str(plan.dtype).removeprefix("torch."), threads,
                    sorted(self.encoder.crop_batches_run), config.vision.encoder_cache_mb,
                    memory.gib(memory.module_bytes(self.encoder.model)), memory.gib(resident), memory.gib(peak))

    def encode(self, pixel_values: np.ndarray, image_sizes: np.ndarray, cache_salt: str = "") -> np.ndarray:
        """[n_features, hidden] float32 features of every image of one request, in order."""
        features = self.encoder.encode(torch.from_numpy(pixel_values), torch.from_numpy(image_sizes), cache_salt)
        return features.float().cpu().contiguous().numpy()

    def cache_counts(self) -> tuple[int, int, int] | None:
        """(hits, misses, bytes held) of the feature cache; None without one."""
        cache = self.encoder.cache
        return None if cache is None else (cache.hits, cache.misses, cache.bytes)
