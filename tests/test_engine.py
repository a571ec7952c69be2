"""The engine driven directly (no Triton): batching, KV accounting, cancellation."""

from __future__ import annotations

import threading

import pytest
import torch

from spyre_backend.config import ServingConfig
from spyre_backend.engine.request import Request
from spyre_backend.engine.sampling_params import InvalidRequest, SamplingParams
from spyre_backend.preprocess.processor import Preprocessor
from spyre_backend.serving.llm_service import LLMService
from spyre_backend.vision.encoder import VisionEncoder
from tests.images import shape_png


@pytest.fixture(scope="module")
def stack(checkpoint):
    config = ServingConfig.from_strings({"checkpoint": str(checkpoint), "max_context": "1024", "max_running": "4",
                                         "decode_batch_sizes": "1 2 4"})
    service = LLMService(config)
    yield service, Preprocessor(str(checkpoint)), VisionEncoder(str(checkpoint), device=torch.device("cpu"),
                                                                 dtype=torch.float32)
    service.shutdown()


def run(service, preprocessor, encoder, question, images, max_tokens=20, params=None):
    """Submit several prompts at once; returns their outputs once all finished."""
    prompt = preprocessor(question, images, apply_chat_template=True)
    features = encoder.encode(torch.from_numpy(prompt.pixel_values), torch.from_numpy(prompt.image_sizes))
    done = threading.Event()
    outputs = []

    def on_output(out):
        outputs.append(out)
        if out.finished:
            done.set()

    request = Request(torch.from_numpy(prompt.input_ids), features if features.numel() else None,
                      params or SamplingParams(max_tokens=max_tokens), on_output)
    service.engine.add_request(request)
    return done, outputs


CASES = [("What is in the image?", [shape_png("triangle", "green", "white", (200, 150))]),
         ("Say hello.", []),
         ("What shape is it?", [shape_png("square", "yellow", "black", (60, 200))]),
         ("What is the capital of France?", []),
         ("What color is the background?", [shape_png("circle", "red", "blue", (300, 40))]),
         ("What is in the second image?", [shape_png("circle", "red", "blue"), shape_png("square", "blue", "white")])]


def text_of(outputs):
    return "".join(o.text for o in outputs)


def test_concurrent_requests_match_solo_runs_and_free_all_blocks(stack):
    service, pre, enc = stack
    start_free = service.engine.num_free_blocks
    solo = []
    for q, imgs in CASES:
        done, outs = run(service, pre, enc, q, imgs)
        assert done.wait(120)
        solo.append(text_of(outs))
    assert solo[0] == "a green triangle on a white background"
    together = [run(service, pre, enc, q, imgs) for q, imgs in CASES]  # more than max_running: some queue
    for (done, outs), want in zip(together, solo):
        assert done.wait(120)
        assert text_of(outs) == want
    assert service.engine.num_free_blocks == start_free


def test_cancelled_request_ends_and_frees_its_blocks(stack):
    service, pre, enc = stack
    start_free = service.engine.num_free_blocks
    prompt = pre("Say hello.", [], apply_chat_template=True)
    cancelled = threading.Event()
    done = threading.Event()
    outs = []

    def on_output(out):
        outs.append(out)
        cancelled.set()  # cancel after the first output
        if out.finished:
            done.set()

    params = SamplingParams(max_tokens=500, ignore_eos=True)
    service.engine.add_request(Request(torch.from_numpy(prompt.input_ids), None, params, on_output,
                                       is_cancelled=cancelled.is_set))
    assert done.wait(60)
    assert outs[-1].finish_reason.value == "cancelled"
    assert len(outs) < 50
    assert service.engine.num_free_blocks == start_free


def test_request_that_can_never_fit_is_refused_at_once(stack):
    service, pre, _ = stack
    prompt = pre("Say hello.", [], apply_chat_template=True)
    with pytest.raises(InvalidRequest, match="maximum context length"):
        service.engine.add_request(Request(torch.from_numpy(prompt.input_ids), None,
                                           SamplingParams(max_tokens=5000), lambda out: None))


def test_seeded_sampling_is_reproducible(stack):
    service, pre, enc = stack
    params = lambda: SamplingParams(max_tokens=12, temperature=1.5, seed=1234, ignore_eos=True)  # noqa: E731
    first = run(service, pre, enc, "Say hello.", [], params=params())
    second = run(service, pre, enc, "Say hello.", [], params=params())
    assert first[0].wait(60) and second[0].wait(60)
    assert text_of(first[1]) == text_of(second[1])
