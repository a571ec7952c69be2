"""Every bad or hostile input gets a clear error response; the server stays up, nothing leaks,
and the next good request gives the same answer as before (run against the real server)."""

from __future__ import annotations

import base64
import io
import queue
import struct
import zlib

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from spyre_backend.protocol.client import infer_inputs
from testkit.images import shape_png
from testkit.streaming import grpc_stream

GOOD_IMAGE = shape_png("circle", "red", "blue", (80, 60))
Q = "What is in the image?"


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge size (a decompression bomb's header)."""
    png = bytearray(shape_png(size=(4, 4)))
    ihdr = 12  # 8-byte signature + 4-byte length
    png[ihdr + 4: ihdr + 12] = struct.pack(">II", width, height)
    png[ihdr + 17: ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(png[ihdr: ihdr + 17])))
    return bytes(png)


def chat(n_images: int = 1, question: str = Q) -> dict:
    return {"text_input": question, "apply_chat_template": True, "max_tokens": 8,
            "image": [GOOD_IMAGE] * n_images} if n_images else {"text_input": question, "apply_chat_template": True,
                                                                 "max_tokens": 8}


def with_(base: dict, **changes) -> dict:
    return {**base, **changes}


def f32(v):
    return np.array([v], dtype=np.float32)


# name -> (inputs, part of the expected error message)
BAD = {
    # images
    "corrupt_image": (with_(chat(), image=[b"\x89PNG\r\n\x1a\nnot really a png"]), "could not be decoded"),
    "truncated_png": (with_(chat(), image=[GOOD_IMAGE[: len(GOOD_IMAGE) // 2]]), "could not be decoded"),
    "zero_byte_image": (with_(chat(), image=[b""]), "is empty"),
    "not_base64": (with_(chat(), image=[b"%%% definitely not base64 %%%"]), "neither a known image format"),
    "base64_of_text": (with_(chat(), image=[base64.b64encode(b"hello world, not an image")]), "could not be decoded"),
    "data_uri_not_base64": (with_(chat(), image=[b"data:image/png,rawdata"]), "only base64 data: URIs"),
    "http_url": (with_(chat(), image=[b"http://127.0.0.1:1/x.png"]), "not fetched"),
    "https_url": (with_(chat(), image=[b"https://example.invalid/x.png"]), "not fetched"),
    "decompression_bomb": (with_(chat(), image=[png_claiming(30000, 30000)]), "max_image_pixels"),
    "oversized_bytes": (with_(chat(), image=[b"\x89PNG" + b"\0" * (21 * 2**20)]), "max_image_bytes"),
    "too_many_images": (chat(9), "max_images"),
    # prompt text and <image> tags
    "more_tags_than_images": ({"text_input": "<image> <image> " + Q, "image": [GOOD_IMAGE], "max_tokens": 8}, "tag"),
    "image_without_tag": ({"text_input": Q, "image": [GOOD_IMAGE], "max_tokens": 8}, "tag"),
    "tags_without_images": ({"text_input": "<image>\n" + Q, "max_tokens": 8}, "tag"),
    "invalid_utf8_text": (with_(chat(0), text_input=b"\xff\xfe\xfa bad"), "UTF-8"),
    "text_over_limit": (with_(chat(0), text_input="a" * (2**20 + 10)), "max_text_bytes"),
    "prompt_over_token_limit": (with_(chat(0), text_input="hello there " * 3000), "max_prompt_tokens"),
    "stop_without_a_sequence_id": ({"text_input": "", "stop": True}, "needs the sequence id"),
    # sampling_parameters JSON
    "invalid_json": (with_(chat(0), sampling_parameters="{not json"), "not valid JSON"),
    "json_not_object": (with_(chat(0), sampling_parameters="[1, 2]"), "JSON object"),
    "unknown_sampling_key": (with_(chat(0), sampling_parameters='{"bogus": 1}'), "unsupported sampling parameter"),
    "temperature_negative": (with_(chat(0), sampling_parameters='{"temperature": -1}'), "temperature"),
    "temperature_nan": (with_(chat(0), sampling_parameters='{"temperature": NaN}'), "temperature"),
    "temperature_string": (with_(chat(0), sampling_parameters='{"temperature": "hot"}'), "temperature"),
    "top_p_zero": (with_(chat(0), sampling_parameters='{"top_p": 0}'), "top_p"),
    "top_k_negative": (with_(chat(0), sampling_parameters='{"top_k": -5}'), "top_k"),
    "seed_negative": (with_(chat(0), sampling_parameters='{"seed": -1}'), "seed"),
    "stop_not_strings": (with_(chat(0), sampling_parameters='{"stop": [1, 2]}'), "stop"),
    "logprobs_too_many": (with_(chat(0), sampling_parameters='{"logprobs": 50}'), "logprobs"),
    "min_tokens_over_max": (with_(chat(0), sampling_parameters='{"min_tokens": 20}'), "min_tokens"),
    "presence_penalty_absurd": (with_(chat(0), sampling_parameters='{"presence_penalty": 5}'), "presence_penalty"),
    "repetition_penalty_zero": (with_(chat(0), sampling_parameters='{"repetition_penalty": 0}'), "repetition_penalty"),
    "max_tokens_in_json_bad": ({"text_input": Q, "sampling_parameters": '{"max_tokens": "ten"}'}, "max_tokens"),
    # max_tokens and context
    "negative_max_tokens": (with_(chat(0), max_tokens=-5), "max_tokens"),
    "zero_max_tokens": (with_(chat(0), max_tokens=0), "max_tokens"),
    "max_tokens_over_cap": (with_(chat(0), max_tokens=100000), "max_tokens_limit"),
    # TRT-LLM-style inputs
    "trt_top_p_zero": (with_(chat(0), top_p=f32(0.0)), "top_p"),
    "trt_temperature_negative": (with_(chat(0), temperature=f32(-1.0)), "temperature"),
    "trt_min_length_over_max": (with_(chat(0), min_length=np.array([50], dtype=np.int32)), "min_tokens"),
    # shapes
    "max_tokens_two_values": (with_(chat(0), max_tokens=np.array([4, 5], dtype=np.int32)), "max_tokens"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_gets_a_clear_error(server, name):
    inputs, message = BAD[name]
    got = grpc_stream(server.grpc_url, inputs)
    assert "error" in got, f"{name}: expected an error, got {got}"
    assert message in got["error"], got["error"]


def raw_request(url: str, inputs: list, model="granite_vision", **kwargs) -> str:
    """Sends hand-built inputs (to get names, dtypes, shapes wrong on purpose); returns the error."""
    results = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        try:
            client.async_stream_infer(model, inputs, **kwargs)
        except InferenceServerException as exc:
            return str(exc)
        result, error = results.get(timeout=120)
        assert error is not None, "expected an error response"
        return str(error)
    finally:
        client.stop_stream()
        client.close()


# hand-built inputs: numpy arrays go as they are, with their own (wrong) types and shapes
RAW = {
    "missing_text_input": (infer_inputs({"max_tokens": 4}), "text_input"),
    "wrong_dtype_max_tokens": (infer_inputs({"text_input": "hi", "max_tokens": np.array([4.0], dtype=np.float32)}),
                               "max_tokens"),
    "wrong_dtype_stream": (infer_inputs({"text_input": "hi", "stream": np.array([1], dtype=np.int32)}), "stream"),
    "wrong_dtype_image": (infer_inputs({"text_input": "hi", "image": np.array([1.0], dtype=np.float32)}), "image"),
    "unknown_input": (infer_inputs({"text_input": "hi", "bogus": np.array([1], dtype=np.int32)}), "bogus"),
    "two_prompts": (infer_inputs({"text_input": ["a", "b"]}), "text_input"),
}


@pytest.mark.parametrize("name", list(RAW))
def test_malformed_request_gets_a_clear_error(server, name):
    inputs, message = RAW[name]
    error = raw_request(server.grpc_url, inputs)
    assert message in error, error


def test_sequence_misuse(server):
    follow_up = {"text_input": "\n<|user|>\nHi\n<|assistant|>\n", "max_tokens": 4, "stream": True}
    # a turn with no START on an id the server never saw
    got = grpc_stream(server.grpc_url, follow_up, model="granite_vision_ensemble", sequence_id=31337)
    assert "error" in got
    # END, then one more turn on the same id
    done = grpc_stream(server.grpc_url, chat(0), model="granite_vision_ensemble", sequence_id=31338,
                       sequence_start=True, sequence_end=True)
    assert "error" not in done
    late = grpc_stream(server.grpc_url, follow_up, model="granite_vision_ensemble", sequence_id=31338)
    assert "error" in late


def test_accepted_unusual_images(server):
    """Formats that are handled, not refused: animated GIF (first frame), CMYK JPEG, 16-bit PNG, EXIF."""
    frames = [Image.new("RGB", (60, 40), c) for c in ("red", "blue")]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    cmyk = io.BytesIO()
    Image.new("CMYK", (50, 50), (0, 255, 255, 0)).save(cmyk, format="JPEG")
    deep = io.BytesIO()
    Image.fromarray(np.full((30, 30), 40000, dtype=np.uint16)).save(deep, format="PNG")
    exif = io.BytesIO()
    rotated = Image.new("RGB", (80, 40), "green")
    info = rotated.getexif()
    info[0x0112] = 6  # orientation: rotate 90
    rotated.save(exif, format="JPEG", exif=info)
    for data in (gif.getvalue(), cmyk.getvalue(), deep.getvalue(), exif.getvalue()):
        got = grpc_stream(server.grpc_url, with_(chat(), image=[data]))
        assert "error" not in got, got


def test_server_still_answers_the_same_after_bad_inputs(server, reference):
    # runs after the bad-input tests in file order; an image request exercises every model
    image = shape_png("triangle", "green", "white", (200, 150))
    want = reference.generate(reference.chat_prompt(Q, 1), [image], 24)
    got = grpc_stream(server.grpc_url, {"text_input": reference.chat_prompt(Q, 1), "image": [image],
                                        "max_tokens": 24, "stream": True})
    assert got.get("text") == want["text"]
