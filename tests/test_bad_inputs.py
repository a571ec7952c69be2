"""Every bad input gets an error response; the server stays up and the next good request works."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.images import shape_png
from tests.streaming import grpc_stream

GOOD_IMAGE = shape_png("circle", "red", "blue", (80, 60))


def prompt(reference, n_images=1):
    return reference.chat_prompt("What is in the image?", n_images)


def raw_request(url: str, inputs: list, model="granite_vision") -> str:
    """Sends hand-built inputs (to get dtypes wrong on purpose); returns the error text."""
    import queue

    results = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        try:
            client.async_stream_infer(model, inputs)
        except InferenceServerException as exc:
            return str(exc)
        result, error = results.get(timeout=120)
        assert error is not None, "expected an error response"
        return str(error)
    finally:
        client.stop_stream()
        client.close()


def tensor(name, array, dtype):
    t = grpcclient.InferInput(name, list(array.shape), dtype)
    t.set_data_from_numpy(array)
    return t


BAD = {
    "corrupt_image": (lambda r: {"text_input": prompt(r), "image": [b"\x89PNG\r\n\x1a\nnot really a png"]},
                      "could not be decoded"),
    "not_base64": (lambda r: {"text_input": prompt(r), "image": [b"%%% definitely not base64 %%%"]},
                   "neither a known image format nor valid base64"),
    "empty_image": (lambda r: {"text_input": prompt(r), "image": [b""]}, "is empty"),
    "url_image": (lambda r: {"text_input": prompt(r), "image": [b"http://127.0.0.1:1/x.png"]}, "not fetched"),
    "more_tags_than_images": (lambda r: {"text_input": prompt(r, 2), "image": [GOOD_IMAGE]}, "tag"),
    "image_without_tag": (lambda r: {"text_input": prompt(r, 0), "image": [GOOD_IMAGE]}, "tag"),
    "invalid_json": (lambda r: {"text_input": prompt(r, 0), "sampling_parameters": "{not json"}, "not valid JSON"),
    "json_not_object": (lambda r: {"text_input": prompt(r, 0), "sampling_parameters": "[1, 2]"}, "JSON object"),
    "unknown_sampling_key": (lambda r: {"text_input": prompt(r, 0), "sampling_parameters": '{"bogus": 1}'},
                             "unsupported sampling parameter"),
    "negative_max_tokens": (lambda r: {"text_input": prompt(r, 0), "max_tokens": -5}, "max_tokens"),
    "zero_max_tokens": (lambda r: {"text_input": prompt(r, 0), "max_tokens": 0}, "max_tokens"),
    "bad_temperature": (lambda r: {"text_input": prompt(r, 0), "sampling_parameters": '{"temperature": -1}'},
                        "temperature"),
    "over_context": (lambda r: {"text_input": prompt(r, 0), "max_tokens": 100000}, "maximum context length"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_gets_a_clear_error(server, reference, name):
    make, message = BAD[name]
    inputs = make(reference)
    inputs.setdefault("max_tokens", 8)
    got = grpc_stream(server.grpc_url, inputs)
    assert "error" in got, f"{name}: expected an error, got {got}"
    assert message in got["error"], got["error"]


def test_missing_text_input(server):
    error = raw_request(server.grpc_url, [tensor("max_tokens", np.array([4], dtype=np.int32), "INT32")])
    assert "text_input" in error


def test_wrong_dtype(server):
    error = raw_request(server.grpc_url, [
        tensor("text_input", np.array([b"hi"], dtype=np.object_), "BYTES"),
        tensor("max_tokens", np.array([4.0], dtype=np.float32), "FP32"),
    ])
    assert "max_tokens" in error and ("data-type" in error or "datatype" in error.lower() or "FP32" in error)


def test_server_still_answers_after_bad_inputs(server, reference):
    # runs after the bad-input tests in file order; an image request exercises every model
    question = "What is in the image?"
    image = shape_png("triangle", "green", "white", (200, 150))
    want = reference.generate(reference.chat_prompt(question, 1), [image], 24)
    got = grpc_stream(server.grpc_url, {"text_input": reference.chat_prompt(question, 1), "image": [image],
                                        "max_tokens": 24, "stream": True})
    assert got.get("text") == want["text"]
