"""Synthetic vision-language data for the tiny Granite Vision checkpoint.

Images are one flat-coloured shape on a flat background of another colour, at random sizes and
aspect ratios (20..300 px a side, some very wide or tall), so the processor's anyres tiling picks
every grid pinpoint. Questions come from a few templates whose answers are fully determined by
the image, plus a handful of text-only prompts with fixed answers and two-image prompts.

Everything random goes through an explicit `random.Random`, so a seed fixes the data stream.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross")

# Distinct hues so that a 14 px patch embedding can separate them after bicubic resizing.
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 225),
    "yellow": (245, 220, 30),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "purple": (130, 40, 165),
    "orange": (250, 140, 20),
}

MIN_SIDE, MAX_SIDE = 20, 300

# Templates for one image: (question, answer format); every answer is followed by
# <|end_of_text|> in training. `a_color` / `a_background` carry their article ("an orange").
IMAGE_QUESTIONS = (
    ("What is in the image?", "{a_color} {shape} on {a_background} background"),
    ("Describe the image.", "The image shows {a_color} {shape} on {a_background} background."),
    ("What shape is it?", "a {shape}"),
    ("What color is the shape?", "{color}"),
    ("What color is the background?", "{background}"),
)

# Two images: the question names which one to describe.
TWO_IMAGE_QUESTIONS = (
    ("What is in the first image?", 0),
    ("What is in the second image?", 1),
)
DESCRIBE = IMAGE_QUESTIONS[0][1]

# Prompts without an image, with fixed answers (a smoke test for the text-only path).
TEXT_ONLY = (
    ("Say hello.", "Hello! How can I help you?"),
    ("What is the capital of France?", "Paris"),
    ("What is 2 + 2?", "4"),
    ("Who are you?", "I am a tiny Granite Vision test model."),
    ("What can you do?", "I can name the shape and the colors in a simple image."),
)


def _with_article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def answer_for(template: str, shape: str, color: str, background: str) -> str:
    return template.format(
        shape=shape,
        color=color,
        background=background,
        a_color=_with_article(color),
        a_background=_with_article(background),
    )


@dataclass
class ShapeSpec:
    """What one image shows; enough to rebuild the answer of any template."""

    shape: str
    color: str
    background: str
    size: tuple[int, int]  # (width, height), PIL order

    def describe(self) -> str:
        return answer_for(DESCRIBE, self.shape, self.color, self.background)


@dataclass
class Sample:
    """One conversation: images in the first user turn, then (question, answer) turns.

    Evaluation uses single-turn samples (what a server sees); training also uses several turns
    about the same image, which gives several supervised answers per (long) image prompt.
    """

    turns: list[tuple[str, str]]
    kind: str
    images: list[Image.Image] = field(default_factory=list)
    specs: list[ShapeSpec] = field(default_factory=list)

    @property
    def question(self) -> str:
        return self.turns[0][0]

    @property
    def answer(self) -> str:
        return self.turns[0][1]

    def messages(self, n_turns: int = 1, with_last_answer: bool = False) -> list[dict]:
        """Chat messages of the first `n_turns` turns; the last answer only if asked for."""
        messages = []
        for i, (question, answer) in enumerate(self.turns[:n_turns]):
            content = [{"type": "image"} for _ in (self.images if i == 0 else [])]
            content.append({"type": "text", "text": question})
            messages.append({"role": "user", "content": content})
            if i < n_turns - 1 or with_last_answer:
                messages.append({"role": "assistant", "content": answer})
        return messages


def _jitter(rgb: tuple[int, int, int], rng: random.Random | None, amount: int = 12) -> tuple[int, ...]:
    # A little colour noise keeps the model from keying on exact pixel values.
    if rng is None:
        return rgb
    return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)


def draw_shape_image(
    shape: str,
    color: str,
    background: str,
    size: tuple[int, int] = (200, 150),
    *,
    rng: random.Random | None = None,
) -> Image.Image:
    """Draw one `color` `shape` on a `background` canvas of `size` = (width, height).

    Without `rng` the shape is centred and fills 70% of the shorter side, with exact colours (what
    tests and demos want); with `rng` its scale, position and colours vary a little.
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    for name in (color, background):
        if name not in COLORS:
            raise ValueError(f"unknown colour {name!r}; expected one of {tuple(COLORS)}")
    width, height = size
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {size}")

    image = Image.new("RGB", (width, height), _jitter(COLORS[background], rng))
    draw = ImageDraw.Draw(image)
    fill = _jitter(COLORS[color], rng)

    # Roughly centred and large: a tower this small, trained for minutes from scratch, tells
    # the shapes apart by where their colour sits in the 4x4 patch grid (a triangle is bottom
    # heavy, a cross fills the middle row and column...), which a free position would hide.
    short = min(width, height)
    scale = 0.7 if rng is None else rng.uniform(0.65, 0.85)
    s = max(1, round(short * scale))
    x0, y0 = (width - s) // 2, (height - s) // 2
    if rng is not None:
        x0 += round(rng.uniform(-0.1, 0.1) * (width - s))
        y0 += round(rng.uniform(-0.1, 0.1) * (height - s))
    x1, y1 = x0 + s - 1, y0 + s - 1  # PIL boxes are inclusive

    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0 + (s - 1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "cross":
        t = max(1, s // 3)
        a, b = (s - t) // 2, (s - t) // 2 + t - 1
        draw.rectangle((x0, y0 + a, x1, y0 + b), fill=fill)
        draw.rectangle((x0 + a, y0, x0 + b, y1), fill=fill)
    return image


def random_size(rng: random.Random) -> tuple[int, int]:
    """(width, height) in 20..300; one in five is very wide or very tall (aspect up to 15:1)."""
    if rng.random() < 0.2:
        short, long = rng.randint(MIN_SIDE, 48), rng.randint(150, MAX_SIDE)
        return (long, short) if rng.random() < 0.5 else (short, long)
    return rng.randint(MIN_SIDE, MAX_SIDE), rng.randint(MIN_SIDE, MAX_SIDE)


def random_spec(rng: random.Random) -> ShapeSpec:
    color, background = rng.sample(sorted(COLORS), 2)  # distinct by construction
    return ShapeSpec(rng.choice(SHAPES), color, background, random_size(rng))


def render(spec: ShapeSpec, rng: random.Random | None = None) -> Image.Image:
    return draw_shape_image(spec.shape, spec.color, spec.background, spec.size, rng=rng)


def image_sample(spec: ShapeSpec, template: int, image: Image.Image) -> Sample:
    """A single-turn question about one image."""
    question, answer = IMAGE_QUESTIONS[template]
    return Sample([(question, answer_for(answer, spec.shape, spec.color, spec.background))], f"image:{template}", [image], [spec])


def two_image_sample(specs: list[ShapeSpec], which: int, images: list[Image.Image]) -> Sample:
    question = TWO_IMAGE_QUESTIONS[which][0]
    return Sample([(question, specs[which].describe())], f"two:{which}", images, specs)


def random_sample(
    rng: random.Random, p_two_images: float = 0.25, p_text_only: float = 0.05, max_turns: int = 1
) -> Sample:
    """Draw one sample; with `max_turns` > 1, follow-up questions about the same image(s)."""
    u = rng.random()
    n_turns = rng.randint(1, max_turns)
    if u < p_text_only:
        turns = rng.sample(TEXT_ONLY, min(n_turns, len(TEXT_ONLY)))
        return Sample(turns, "text")
    if u < p_text_only + p_two_images:
        specs = [random_spec(rng), random_spec(rng)]
        images = [render(s, rng) for s in specs]
        order = rng.sample(range(len(TWO_IMAGE_QUESTIONS)), min(n_turns, len(TWO_IMAGE_QUESTIONS)))
        turns = [(TWO_IMAGE_QUESTIONS[w][0], specs[w].describe()) for w in order]
        return Sample(turns, f"two:{order[0]}", images, specs)
    spec = random_spec(rng)
    templates = rng.sample(range(len(IMAGE_QUESTIONS)), min(n_turns, len(IMAGE_QUESTIONS)))
    turns = [
        (IMAGE_QUESTIONS[t][0], answer_for(IMAGE_QUESTIONS[t][1], spec.shape, spec.color, spec.background))
        for t in templates
    ]
    return Sample(turns, f"image:{templates[0]}", [render(spec, rng)], [spec])


def corpus(system_prompt: str) -> list[str]:
    """Every question/answer string the data can produce, for training the BPE tokenizer."""
    lines = [system_prompt]
    colors = sorted(COLORS)
    for question, answer in IMAGE_QUESTIONS:
        lines.append(question)
        for shape in SHAPES:
            for color in colors:
                for background in colors:
                    if color != background:
                        lines.append(answer_for(answer, shape, color, background))
    lines += [q for q, _ in TWO_IMAGE_QUESTIONS]
    for question, answer in TEXT_ONLY:
        lines += [question, answer]
    return lines
