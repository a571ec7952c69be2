"""Drives an LLMService directly (no Triton) for the engine tests."""

from __future__ import annotations

import threading

import torch

from spyre_backend.engine.request import Request
from spyre_backend.engine.sampling_params import SamplingParams


class Stack:
    def __init__(self, service, preprocessor, encoder):
        self.service, self.pre, self.enc = service, preprocessor, encoder

    @property
    def engine(self):
        return self.service.engine

    def prompt(self, question: str, images: list[bytes], chat: bool = True):
        p = self.pre(question, images, apply_chat_template=chat)
        features = self.enc.encode(torch.from_numpy(p.pixel_values), torch.from_numpy(p.image_sizes))
        return torch.from_numpy(p.input_ids), (features if features.numel() else None)

    def submit(self, question: str, images: list[bytes] = (), *, chat: bool = True, ids=None, features=None,
               **request_kwargs) -> "Handle":
        if ids is None:
            ids, features = self.prompt(question, list(images), chat)
        params = request_kwargs.pop("params", None) or SamplingParams(max_tokens=request_kwargs.pop("max_tokens", 20))
        handle = Handle()
        request = Request(ids, features, params, handle.on_output, is_cancelled=handle.cancelled.is_set,
                          **request_kwargs)
        self.engine.add_request(request)
        return handle


class Handle:
    def __init__(self):
        self.outputs = []
        self.done = threading.Event()
        self.cancelled = threading.Event()

    def on_output(self, out):
        self.outputs.append(out)
        if out.finished:
            self.done.set()

    def wait(self, timeout=120) -> "Handle":
        assert self.done.wait(timeout), "request did not finish"
        return self

    @property
    def text(self) -> str:
        return "".join(o.text for o in self.outputs)

    @property
    def final(self):
        return self.outputs[-1]
