"""The GPU check's requests: the image prompts both transformers and the engine answer (exactness),
and the load's requests, each with an image of its own (so neither the encoder cache nor the
prefix cache serves one request from another), all of one size: 384x288, 1,364 prompt tokens on
the 2b-shaped checkpoint, as in issue 31's measurements."""

from __future__ import annotations

import itertools

from testkit.images import shape_png
from tools.tiny_checkpoint.synthetic import COLORS, SHAPES

# (question, (shape, colour, background, (width, height)))
EXACT = (
    ("What is in the image?", ("triangle", "green", "white", (384, 288))),
    ("Describe the image.", ("circle", "red", "blue", (640, 480))),
)
LOAD_QUESTION = "Describe the image."
LOAD_SIZE = (384, 288)


def exact_prompts() -> list[tuple[str, bytes]]:
    return [(question, shape_png(*drawing)) for question, drawing in EXACT]


def load_image(i: int) -> bytes:
    """Request ``i``'s image: a shape, colour and background of its own (4 x 8 x 7 of them)."""
    looks = [(s, c, b) for s, c, b in itertools.product(SHAPES, sorted(COLORS), sorted(COLORS)) if c != b]
    shape, colour, background = looks[i % len(looks)]
    return shape_png(shape, colour, background, LOAD_SIZE)
