"""LLaVA-Next with a SigLIP tower and a Granite LLM: Granite Vision."""

from __future__ import annotations

import io

from spyre_backend.multimodal.merge import merge_image_features
from spyre_backend.multimodal.registry import MultimodalSpec, register


def _unwrap(config: dict) -> tuple[dict, dict]:
    return config["text_config"], config["vision_config"]


def _warmup_request() -> tuple[str, list[bytes]]:
    """A real encoded image through the real processor (its content does not matter, its path does)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (200, 150), "white")
    ImageDraw.Draw(image).polygon([(100, 20), (30, 130), (170, 130)], fill="green")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "What is in the image?", [buf.getvalue()]


def _warmup_image_sizes(config: dict) -> list[tuple[int, int]]:
    # an image exactly the size of a grid pinpoint selects that pinpoint, hence that crop count
    return sorted({(w, h) for h, w in config["image_grid_pinpoints"]})


SPEC = register(MultimodalSpec(
    architecture="LlavaNextForConditionalGeneration",
    unwrap_config=_unwrap,
    image_token_id=lambda config: int(config["image_token_index"]),
    merge=merge_image_features,
    warmup_request=_warmup_request,
    warmup_image_sizes=_warmup_image_sizes,
))
