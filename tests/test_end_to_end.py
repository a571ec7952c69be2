"""Streamed greedy output through the real tritonserver equals transformers' generate()."""

from __future__ import annotations

import queue

import pytest
import tritonclient.grpc as grpcclient

from testkit.images import shape_png
from testkit.streaming import grpc_stream, http_generate_stream, to_grpc_inputs

MAX_TOKENS = 24

# name -> (question, images). Sizes and aspect ratios exercise every anyres path.
CASES = {
    "text_only": ("Say hello.", []),
    "text_only_capital": ("What is the capital of France?", []),
    "square_56": ("What is in the image?", [shape_png("circle", "red", "blue", (56, 56))]),
    "landscape_200x150": ("What is in the image?", [shape_png("triangle", "green", "white", (200, 150))]),
    "portrait_90x160": ("What shape is it?", [shape_png("square", "yellow", "black", (90, 160))]),
    "tiny_1x1": ("What is in the image?", [shape_png("circle", "red", "blue", (1, 1))]),
    "very_wide_400x20": ("What color is the background?", [shape_png("square", "blue", "white", (400, 20))]),
    "large_300x300": ("What color is the shape?", [shape_png("circle", "purple", "yellow", (300, 300))]),
    "rgba_png": ("What is in the image?", [shape_png("square", "red", "green", (120, 80), mode="RGBA")]),
    "grayscale_png": ("What is in the image?", [shape_png("triangle", "white", "black", (100, 100), mode="L")]),
    "palette_png": ("What is in the image?", [shape_png("circle", "orange", "blue", (150, 100), mode="P")]),
    "jpeg": ("What is in the image?", [shape_png("square", "green", "red", (160, 120), fmt="JPEG")]),
    "two_images": ("What is in the second image?",
                   [shape_png("circle", "red", "blue", (80, 80)), shape_png("triangle", "green", "white", (120, 90))]),
}


@pytest.fixture(scope="module")
def expected(reference):
    return {name: reference.generate(reference.chat_prompt(q, len(imgs)), imgs, MAX_TOKENS)
            for name, (q, imgs) in CASES.items()}


def assert_same(got: dict, want: dict):
    assert "error" not in got, got["error"]
    assert got["text"] == want["text"]
    assert got["num_output_tokens"] == want["num_output_tokens"]
    assert got["num_input_tokens"] == want["num_input_tokens"]


@pytest.mark.parametrize("name", list(CASES))
def test_grpc_stream_matches_transformers(server, reference, expected, name):
    question, images = CASES[name]
    prompt = reference.chat_prompt(question, len(images))
    got = grpc_stream(server.grpc_url, {"text_input": prompt, "image": images, "max_tokens": MAX_TOKENS,
                                        "stream": True} if images else
                      {"text_input": prompt, "max_tokens": MAX_TOKENS, "stream": True})
    assert_same(got, expected[name])
    assert len(got["pieces"]) > 1 or expected[name]["num_output_tokens"] <= 2  # it really streamed


@pytest.mark.parametrize("name", ["text_only", "landscape_200x150", "two_images"])
def test_http_generate_stream_matches_transformers(server, reference, expected, name):
    question, images = CASES[name]
    body = {"text_input": reference.chat_prompt(question, len(images)), "max_tokens": MAX_TOKENS, "stream": True}
    if images:
        body["image"] = images
    got = http_generate_stream(server.http_url, body)
    assert_same(got, expected[name])


def test_server_side_chat_template_gives_the_same_answer(server, expected):
    question, images = CASES["landscape_200x150"]
    got = grpc_stream(server.grpc_url, {"text_input": question, "image": images, "max_tokens": MAX_TOKENS,
                                        "stream": True, "apply_chat_template": True})
    assert_same(got, expected["landscape_200x150"])
    # and it is the right answer: the shipped checkpoint was trained to give it
    assert got["text"] == "a green triangle on a white background"


def test_non_streaming_returns_one_response_with_the_prompt(server, reference, expected):
    question, images = CASES["text_only"]
    prompt = reference.chat_prompt(question, 0)
    got = grpc_stream(server.grpc_url, {"text_input": prompt, "max_tokens": MAX_TOKENS, "stream": False})
    assert got["pieces"] == [prompt + expected["text_only"]["text"]]
    excluded = grpc_stream(server.grpc_url, {"text_input": prompt, "max_tokens": MAX_TOKENS, "stream": False,
                                             "exclude_input_in_output": True})
    assert excluded["pieces"] == [expected["text_only"]["text"]]


def test_max_tokens_limits_the_answer(server, reference):
    question, images = CASES["landscape_200x150"]
    got = grpc_stream(server.grpc_url, {"text_input": reference.chat_prompt(question, 1), "image": images,
                                        "max_tokens": 2, "stream": True})
    assert got["finish_reason"] == "length"
    assert got["num_output_tokens"] == 2


def test_a_client_may_ask_for_some_outputs_only(server):
    """Only the requested outputs come back (and the server builds no others: Triton 2.51's stub
    would drop them without holding the GIL)."""
    inputs = {"text_input": "Say hello.", "apply_chat_template": True, "max_tokens": 24, "stream": True}
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    pieces, names = [], set()
    try:
        client.async_stream_infer("granite_vision", to_grpc_inputs(inputs),
                                  outputs=[grpcclient.InferRequestedOutput("text_output")],
                                  enable_empty_final_response=True)
        while True:
            result, error = results.get(timeout=300)
            assert error is None, error
            response = result.get_response()
            names.update(output.name for output in response.outputs)
            if response.outputs:
                pieces.append(result.as_numpy("text_output")[0].decode())
            if response.parameters["triton_final_response"].bool_param:
                break
    finally:
        client.stop_stream()
        client.close()
    assert names == {"text_output"}
    assert "".join(pieces) == grpc_stream(server.grpc_url, inputs)["text"]
