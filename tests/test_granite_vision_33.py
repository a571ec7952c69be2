"""granite-vision-3.3-2b: its preset, and its config's differences from 3.2 (no pooling head in the
SigLIP2 tower, rope theta 5e6, 3.2's grids) at reduced depth, token for token as transformers'
generate(); and the guard against running a pooling head on the multi-layer features."""

from __future__ import annotations

import json

import pytest

from spyre_backend.engine.sampling_params import SamplingParams
from tests.conftest import Reference
from tests.test_engine import make_stack
from testkit.images import shape_png
from tools.tiny_checkpoint import random_checkpoint

PRESET = "granite-vision-3.3-2b"
CASES = [("Say hello.", []), ("What is in the image?", [shape_png("triangle", "green", "white", (200, 150))]),
         ("What is wide?", [shape_png("square", "blue", "white", (400, 60))])]


def test_the_33_preset_has_the_published_shapes_and_says_what_it_assumed():
    preset, base = random_checkpoint.PRESETS[PRESET], random_checkpoint.PRESETS["granite-vision-3.2-2b"]
    assert {k: v for k, v in preset.items() if base.get(k) != v} == {"rope_theta": 5_000_000.0,
                                                                     "vision_use_head": False}
    stamp = random_checkpoint.build_args(random_checkpoint.parser().parse_args(["--out", "x", "--preset", PRESET]))
    assert (stamp["vision_hidden"], stamp["vision_heads"], stamp["crop"], stamp["text_layers"], stamp["vocab"]) == \
        (1152, 16, 384, 40, 49156) and stamp["dtype"] == "bfloat16"
    assert "Assumed" in random_checkpoint.__doc__ + open(random_checkpoint.__file__).read()


@pytest.fixture(scope="module")
def checkpoint_33(tmp_path_factory):
    """The 3.3 preset at test size (verified on save: transformers reloads it, FMS places every key)."""
    out = tmp_path_factory.mktemp("gv33") / "granite-vision-3.3-reduced"
    random_checkpoint.build(random_checkpoint.parser().parse_args(["--out", str(out), "--preset", PRESET,
                                                                   "--reduced"]), log=lambda *_: None)
    return out


def test_the_reduced_checkpoint_keeps_the_config_differences(checkpoint_33):
    config = json.loads((checkpoint_33 / "config.json").read_text())
    assert config["vision_config"]["vision_use_head"] is False
    assert config["vision_feature_layer"] == [-24, -20, -12, -1] and config["vision_config"]["num_hidden_layers"] == 27
    text = config["text_config"]
    assert text.get("rope_theta", (text.get("rope_parameters") or {}).get("rope_theta")) == 5_000_000.0
    assert len(config["image_grid_pinpoints"]) == 27 and config["image_token_index"] == 49155
    from safetensors import safe_open

    with safe_open(str(checkpoint_33 / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if ".head." in k and "vision" in k]  # no pooling head weights


@pytest.fixture(scope="module")
def stack_33(checkpoint_33):
    s = make_stack(checkpoint_33)
    yield s
    s.service.shutdown()


@pytest.mark.parametrize("question, images", CASES, ids=["text", "image", "wide image"])
def test_greedy_output_equals_transformers(checkpoint_33, stack_33, question, images):
    reference = Reference(checkpoint_33)
    # a random model may say end-of-text at once: both sides are kept from it for 12 tokens
    want = reference.generate(reference.chat_prompt(question, len(images)), images, 12, min_new_tokens=12)
    got = stack_33.submit(question, images, params=SamplingParams(max_tokens=12, min_tokens=12)).wait()
    assert (got.text, got.final.num_input_tokens, got.final.num_output_tokens) == \
        (want["text"], want["num_input_tokens"], want["num_output_tokens"])


def test_no_pooling_head_ever_runs(checkpoint, checkpoint_33):
    """The tower is run headless: the head is dropped at load, with its weights (3.2: random
    checkpoints and the tiny one carry them) or without (3.3), and features stay those of
    transformers (the greedy tests above and the end-to-end ones)."""
    import torch

    from spyre_backend.preprocess.processor import Preprocessor
    from spyre_backend.vision.encoder import VisionEncoder

    for path in (checkpoint, checkpoint_33):
        encoder = VisionEncoder(str(path))
        assert encoder.model.vision_tower.head is None
        p = Preprocessor(str(path))(*CASES[1], apply_chat_template=True)
        features = encoder.encode(torch.from_numpy(p.pixel_values), torch.from_numpy(p.image_sizes))
        placeholders = int((p.input_ids == encoder.spec.image_token_id).sum())
        assert torch.isfinite(features).all() and features.shape[0] == placeholders


def test_served_on_triton_token_exact(checkpoint_33, tmp_path):
    """The reduced 3.3 checkpoint served by a tritonserver of its own, with the defaults but the
    exact eager path (inductor against eager is held by tests/test_device_and_compile.py): greedy
    answers through granite_vision as transformers'."""
    from spyre_backend.server.child_process import free_port
    from spyre_backend.server.triton_process import ServerOptions, TritonServer
    from testkit.streaming import grpc_stream

    reference = Reference(checkpoint_33)
    server = TritonServer(ServerOptions(checkpoint=checkpoint_33, http_port=free_port(), grpc_port=free_port(),
                                        metrics_port=free_port(), extra_env={"SPYRE_COMPILE_BACKEND": "eager"}),
                          log_path=tmp_path / "server.log")
    server.start(timeout_s=600)
    try:
        for question, images in CASES:
            want = reference.generate(reference.chat_prompt(question, len(images)), images, 12, min_new_tokens=12)
            request = {"text_input": question, "apply_chat_template": True, "exclude_input_in_output": True,
                       "sampling_parameters": json.dumps({"max_tokens": 12, "min_tokens": 12, "temperature": 0})}
            got = grpc_stream(server.grpc_url, dict(request, image=images) if images else request)
            assert "error" not in got, got["error"]
            assert (got["text"], got["num_input_tokens"], got["num_output_tokens"]) == \
                (want["text"], want["num_input_tokens"], want["num_output_tokens"])
    finally:
        server.stop()
