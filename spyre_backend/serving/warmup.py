"""Warmup before a model reports ready: every shape that will be compiled runs once, driven by a
real synthetic image through the real preprocessing (never pre-merged inputs).

The vision encoder warms up on the image's pixels. The LLM gets the real prompt, its image
placeholders expanded by the real processor, and one feature row per placeholder as wide as the
vision encoder sends them: what the LLM computes depends on the features' shape, never on their
values, so it needs no vision tower of its own (loading one cost the LLM process the tower's
weights at start-up). Eager execution has nothing to compile, so it runs only the end-to-end
warmup requests; compiled backends (inductor, sendnn) also run every shape of the static shape set.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

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
    if encoder.compiled:
        crops = torch.from_numpy(prompt.pixel_values[0])
        # each image runs in batches of its own crops (VisionEncoder.encode): the most crops of one image
        encoder.warmup(crops, spec.max_crops_per_image)
    return time.monotonic() - started


def warmup_llm(service, checkpoint: str) -> float:
    """Runs before the engine serves: all compiled shapes, then real requests (an image prompt,
    greedy and random sampling, a grammar) through the engine."""
    started = time.monotonic()
    engine = service.engine
    engine.warmup()
    _, prompt = real_image_inputs(checkpoint, service.spec)
    ids = torch.from_numpy(prompt.input_ids)
    placeholders = int((ids == service.spec.image_token_id).sum())
    # float32, as the vision_encoder model sends them; small, as projected features are
    features = torch.randn(placeholders, service.spec.text.hidden_size, generator=torch.Generator().manual_seed(0)) * 0.02
    # the last one has a grammar: the tokenizer's grammar tables are built here, not in a client's request
    structured = SamplingParams(max_tokens=4, structured_outputs={"json_object": True})
    structured.validate()
    for params in (SamplingParams(max_tokens=4), SamplingParams(max_tokens=4, temperature=1.0, top_p=0.9, seed=0),
                   structured):
        done = threading.Event()
        engine.add_request(Request(ids, features, params, lambda out: out.finished and done.set()))
        if not done.wait(600):
            raise RuntimeError("warmup request did not finish")
    return time.monotonic() - started
