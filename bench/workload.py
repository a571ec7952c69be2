"""The requests every path runs: one question about one image each, a fixed number of new tokens.

Request ``i`` is the same everywhere (transformers, engine, Triton, perf_analyzer). Images differ
from request to request (shape x colour x background) but not in size (200x150 px unless the
workload says otherwise), so every prompt has the same number of image tokens: a repeated image
could be answered from a feature cache instead of the vision tower, and that is not what is
measured here.
"""

from __future__ import annotations

import base64
import itertools
import json
from dataclasses import dataclass
from functools import lru_cache

from tools.tiny_checkpoint import synthetic
from testkit.images import shape_png

QUESTIONS = ["What is in the image?", "What shape is it?", "What color is the background?",
             "What color is the shape?"]
IMAGE_SIZE = (200, 150)


@lru_cache(maxsize=None)
def _image_specs() -> list[tuple[str, str, str]]:
    colors = sorted(synthetic.COLORS)
    return [(s, c, b) for s, c, b in itertools.product(synthetic.SHAPES, colors, colors) if c != b]


@dataclass(frozen=True)
class Workload:
    max_tokens: int  # every request generates exactly this many tokens (min_tokens = max_tokens)
    image_size: tuple[int, int] = IMAGE_SIZE  # (width, height) of every request's image
    # a JSON schema every answer must follow (structured output), or None; the answer then ends
    # when the grammar does (no min_tokens: a grammar that must end cannot also be made to go on)
    schema: dict | None = None

    def question(self, i: int) -> str:
        return QUESTIONS[i % len(QUESTIONS)]

    def image(self, i: int) -> bytes:
        specs = _image_specs()
        return _png(*specs[i % len(specs)], self.image_size)

    @property
    def sampling_parameters(self) -> str:
        # Greedy, and eos suppressed until max_tokens: random weights would otherwise stop anywhere.
        # (ignore_eos would also do, but tokens after an eos decode to no text and send nothing.)
        if self.schema is not None:
            return json.dumps({"max_tokens": self.max_tokens, "temperature": 0,
                               "structured_outputs": {"json": self.schema}})
        return json.dumps({"max_tokens": self.max_tokens, "min_tokens": self.max_tokens, "temperature": 0})

    def triton_inputs(self, i: int) -> dict:
        """Inputs of request ``i`` for granite_vision / granite_vision_ensemble (testkit.streaming format)."""
        return {"text_input": self.question(i), "image": [self.image(i)], "apply_chat_template": True,
                "max_tokens": self.max_tokens, "stream": True, "sampling_parameters": self.sampling_parameters}

    def perf_analyzer_data(self, n: int) -> dict:
        """``--input-data`` JSON with requests 0..n-1 (perf_analyzer cycles through them)."""
        data = []
        for i in range(n):
            data.append({
                "text_input": [self.question(i)],
                "image": {"content": [base64.b64encode(self.image(i)).decode()], "shape": [1]},
                "apply_chat_template": [True],
                "max_tokens": [self.max_tokens],
                "stream": [True],
                "sampling_parameters": [self.sampling_parameters],
            })
        return {"data": data}


@lru_cache(maxsize=512)
def _png(shape: str, color: str, background: str, size: tuple[int, int]) -> bytes:
    return shape_png(shape, color, background, size)
