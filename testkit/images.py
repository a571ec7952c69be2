"""Test images, encoded in the formats clients send."""

from __future__ import annotations

import io

from PIL import Image

from tools.tiny_checkpoint.synthetic import draw_shape_image


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def shape_png(shape="circle", color="red", background="blue", size=(120, 90), mode="RGB", fmt="PNG") -> bytes:
    image = draw_shape_image(shape, color, background, size=size)
    if mode == "P":
        image = image.convert("P", palette=Image.ADAPTIVE, colors=16)
    elif mode != "RGB":
        image = image.convert(mode)
    return encode(image, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
