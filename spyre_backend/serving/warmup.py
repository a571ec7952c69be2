"""Warmup before a model reports ready: every shape that will be compiled runs once, driven by a
real synthetic image through the real preprocessing and vision code (never pre-merged inputs).

Eager execution has nothing to compile, so it runs only the real end-to-end warmup requests;
compiled backends (inductor, sendnn) also run every shape of the static shape set.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

from spyre_backend.device import DevicePlan
from spyre_backend.device.host_memory import release_freed_memory
from spyre_backend.engine.request import Request
from spyre_backend.engine.sampling_params import SamplingParams
from spyre_backend.preprocess.processor import Preprocessor
from spyre_backend.vision.encoder import VisionEncoder

log = logging.getLogger(__name__)


def real_image_inputs(checkpoint: str, spec) -> tuple[Preprocessor, object]:
    preprocessor = Preprocessor(checkpoint)
    question, images = spec.warmup_request()
    return preprocessor, preprocessor(question, images, apply_chat_template=True)


def warmup_vision(encoder: VisionEncoder, checkpoint: str, spec) -> float:
    started = time.monotonic()
    preprocessor, prompt = real_image_inputs(checkpoint, spec)
    encoder.encode(torch.from_numpy(prompt.pixel_values), torch.from_numpy(prompt.image_sizes))
    if encoder.plan.compile_backend != "eager":
        crops = torch.from_numpy(prompt.pixel_values[0])
        # each image runs in batches of its own crops (VisionEncoder.encode): the most crops of one image
        encoder.warmup(crops, spec.max_crops_per_image)
    return time.monotonic() - started


def warmup_llm(service, checkpoint: str) -> float:
    """Runs before the engine serves: all compiled shapes, then real requests (an image prompt
    through the vision encoder's code, greedy and random sampling) through the engine."""
    started = time.monotonic()
    engine = service.engine
    engine.warmup()
    _, prompt = real_image_inputs(checkpoint, service.spec)
    plan = engine.probe.plan
    encoder = VisionEncoder(checkpoint, DevicePlan(plan.kind, "eager", plan.dtype))
    features = encoder.encode(torch.from_numpy(prompt.pixel_values), torch.from_numpy(prompt.image_sizes))
    del encoder  # only its code path was needed
    release_freed_memory()  # its weights
    ids = torch.from_numpy(prompt.input_ids)
    for params in (SamplingParams(max_tokens=4), SamplingParams(max_tokens=4, temperature=1.0, top_p=0.9, seed=0)):
        done = threading.Event()
        engine.add_request(Request(ids, features, params, lambda out: out.finished and done.set()))
        if not done.wait(600):
            raise RuntimeError("warmup request did not finish")
    return time.monotonic() - started
