"""Preemption through the real server: a KV pool too small for the streams that run at once.

Blocks are taken as sequences grow; when the pool runs out, the most recently admitted request
is preempted and later recomputes its sequence. Its stream only pauses: every answer equals
transformers' generate(), and the preemptions are counted.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from spyre_backend.server.child_process import free_port
from spyre_backend.server.triton_process import ServerOptions, TritonServer
from testkit.images import shape_png
from testkit.metrics import kv_state, read_metrics, wait_for
from testkit.streaming import grpc_stream

NEW_TOKENS = 1000
# 192 prompt tokens with its 200x150 image: 3 full blocks of 64, so the first new token needs a 4th
QUESTION = "What is in the image? " + " ".join(["Describe"] * 20)
IMAGES = [shape_png("triangle", "green", "white", (200, 150)), shape_png("circle", "red", "blue", (200, 150)),
          shape_png("square", "yellow", "black", (200, 150))]


@pytest.fixture(scope="module")
def small_pool_server(checkpoint, tmp_path_factory):
    # 20 usable blocks: one request grows to 19 (192 + 1000 tokens). Two running together run out
    # of blocks, whenever the second arrives during the first one's ~900 first tokens: the window
    # is the first request's own decode time, so it does not depend on how fast the machine is.
    options = ServerOptions(checkpoint=checkpoint, http_port=free_port(), grpc_port=free_port(),
                            metrics_port=free_port(), extra_env={"SPYRE_NUM_KV_BLOCKS": "21"})
    server = TritonServer(options, log_path=tmp_path_factory.mktemp("preemption") / "server.log").start(timeout_s=600)
    yield server
    server.stop()


def preemptions(url: str) -> float:
    m = read_metrics(url)
    return m.get("spyre_preemptions_total", m.get("spyre_preemptions_total{}", 0.0))


def request(image: bytes) -> dict:
    return {"text_input": QUESTION, "image": [image], "apply_chat_template": True, "stream": True,
            "sampling_parameters": json.dumps({"max_tokens": NEW_TOKENS, "min_tokens": NEW_TOKENS})}


def test_preempted_streams_resume_and_answer_as_transformers(small_pool_server, reference):
    url = small_pool_server.grpc_url
    idle = wait_for(lambda: kv_state(small_pool_server.metrics_url))
    before = preemptions(small_pool_server.metrics_url)
    with ThreadPoolExecutor(len(IMAGES)) as pool:
        together = list(pool.map(lambda image: grpc_stream(url, request(image)), IMAGES))
    assert all(t.get("finish_reason") == "length" for t in together), together
    assert wait_for(lambda: preemptions(small_pool_server.metrics_url) > before)
    prompt = reference.chat_prompt(QUESTION, 1)
    for image, t in zip(IMAGES, together):
        assert t["text"] == reference.generate(prompt, [image], NEW_TOKENS, min_new_tokens=NEW_TOKENS)["text"]
    assert wait_for(lambda: kv_state(small_pool_server.metrics_url) == idle, timeout=30)  # every block back
