"""Shared fixtures: one real tritonserver per test session, the transformers oracle, test images."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch

from spyre_backend import DEFAULT_CHECKPOINT
from spyre_backend.server.child_process import free_port
from spyre_backend.server.openai_front import OpenAIFront
from spyre_backend.server.triton_process import ServerOptions, TritonServer

CHECKPOINT = Path(os.environ.get("SPYRE_TEST_CHECKPOINT", DEFAULT_CHECKPOINT))


@pytest.fixture(scope="session")
def checkpoint() -> Path:
    return CHECKPOINT


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> TritonServer:
    log = tmp_path_factory.mktemp("triton") / "server.log"
    options = ServerOptions(checkpoint=CHECKPOINT, http_port=free_port(), grpc_port=free_port(),
                            metrics_port=free_port())
    srv = TritonServer(options, log_path=log)
    srv.start(timeout_s=600)
    yield srv
    code = srv.stop()
    print(f"tritonserver exited with {code}; log: {log}")


@pytest.fixture(scope="session")
def openai_front(server, tmp_path_factory) -> OpenAIFront:
    """The OpenAI-compatible front beside the session server, as the launcher starts it. Image URLs
    on 127.0.0.1 are allowed (the tests serve images from a local HTTP server)."""
    log = tmp_path_factory.mktemp("openai") / "front.log"
    front = OpenAIFront(server, free_port(), allowed_media_domains="127.0.0.1",
                        allow_private_media_addresses=True, log_path=log).start()
    yield front
    print(f"OpenAI front exited with {front.stop()}; log: {log}")


@pytest.fixture(autouse=True)
def server_returns_to_idle(request):
    """Every test that talks to the server must leave its KV blocks, running requests and sessions
    as it found them (checked through the metrics port)."""
    if "server" not in request.fixturenames:
        yield
        return
    from testkit.metrics import kv_state, wait_for

    url = request.getfixturevalue("server").metrics_url
    start = wait_for(lambda: (s := kv_state(url)) and s[1] == 0 and s)
    yield
    assert wait_for(lambda: kv_state(url) == start, timeout=30), f"leak: {kv_state(url)} != {start}"


class Reference:
    """transformers' LlavaNext generate() on the same checkpoint: the correctness oracle."""

    def __init__(self, checkpoint: Path):
        from transformers import AutoProcessor, LlavaNextForConditionalGeneration

        self.processor = AutoProcessor.from_pretrained(checkpoint)
        self.model = LlavaNextForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()

    def chat_prompt(self, question: str, num_images: int) -> str:
        content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": question}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                  add_generation_prompt=True, tokenize=False)

    def inputs(self, prompt: str, images: list[bytes]):
        from PIL import Image

        pil = [Image.open(io.BytesIO(b)) for b in images]
        if pil:
            return self.processor(images=pil, text=prompt, return_tensors="pt")
        return self.processor.tokenizer(prompt, return_tensors="pt")

    @torch.no_grad()
    def generate(self, prompt: str, images: list[bytes], max_new_tokens: int, **generate_kwargs) -> dict:
        inputs = self.inputs(prompt, images)
        out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **generate_kwargs)
        new = out[0, inputs["input_ids"].shape[1]:]
        return {"text": self.processor.tokenizer.decode(new, skip_special_tokens=True),
                "num_input_tokens": int(inputs["input_ids"].shape[1]), "num_output_tokens": int(new.shape[0])}


@pytest.fixture(scope="session")
def reference(checkpoint) -> Reference:
    return Reference(checkpoint)
