"""Image inputs arrive as encoded bytes: raw, base64, or a ``data:`` URI. Nothing is fetched."""

from __future__ import annotations

import base64
import binascii
import io
import math
import warnings

from PIL import Image, ImageOps

from spyre_backend.config import InputLimits
from spyre_backend.errors import InvalidRequest

_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"RIFF", b"BM", b"II*\x00", b"MM\x00*")


def image_bytes(payload: bytes, index: int) -> bytes:
    """Raw encoded image bytes from raw bytes, base64 text or a data: URI."""
    if not payload:
        raise InvalidRequest(f"image {index} is empty")
    if payload.startswith(_MAGIC):
        return payload
    text = payload.strip()
    if text[:5].lower() == b"data:":
        header, sep, text = text.partition(b",")
        if not sep or b";base64" not in header.lower():
            raise InvalidRequest(f"image {index}: only base64 data: URIs are accepted")
    elif text[:7].lower() in (b"http://", b"https:/"):
        raise InvalidRequest(f"image {index}: URLs are not fetched; send the image bytes, base64 or a data: URI")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"image {index} is neither a known image format nor valid base64") from None


def decode_image(payload: bytes, index: int = 0, *, max_bytes: int = InputLimits.max_image_bytes,
                 max_pixels: int = InputLimits.max_image_pixels) -> Image.Image:
    """Decodes one image to RGB. Animated images give their first frame."""
    if len(payload) > max_bytes * 4 // 3 + 64:  # base64 is 4/3 larger: refuse before decoding it
        raise InvalidRequest(f"image {index} is {len(payload)} bytes, over the limit max_image_bytes={max_bytes}")
    data = image_bytes(payload, index)
    if len(data) > max_bytes:
        raise InvalidRequest(f"image {index} is {len(data)} bytes, over the limit max_image_bytes={max_bytes}")
    try:
        with warnings.catch_warnings():
            # a decompression bomb is refused from its header, before its pixels are decoded
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise InvalidRequest(
                    f"image {index} has {width}x{height} = {width * height} pixels, over the limit "
                    f"max_image_pixels={max_pixels}")
            image.load()
    except InvalidRequest:
        raise
    except Image.DecompressionBombError as exc:  # PIL's own check, for sizes far over any limit
        raise InvalidRequest(f"image {index} is over the limit max_image_pixels={max_pixels}: {exc}") from None
    except Exception as exc:  # PIL raises many types for corrupt data
        raise InvalidRequest(f"image {index} could not be decoded: {type(exc).__name__}: {exc}") from None
    image = ImageOps.exif_transpose(image)
    if image.mode != "RGB":
        # palette/greyscale/CMYK/16-bit go to RGB; transparency is composited on white
        if image.mode in ("RGBA", "LA", "P", "PA") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, rgba)
        elif image.mode in ("I", "I;16", "I;16B", "I;16L"):
            image = image.point(lambda v: v / 257).convert("L")
        image = image.convert("RGB")
    return image


def resize_to_side(image: Image.Image, max_side: int | None) -> Image.Image:
    """``image`` with its longest side at most ``max_side`` (its shape kept, sides rounded, bicubic,
    as PIL's ``thumbnail`` without its reducing pass); never enlarged. A request's image budget: fewer
    pixels give a smaller anyres grid and fewer image tokens."""
    width, height = image.size
    if max_side is None or max(width, height) <= max_side:
        return image
    scale = max_side / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)


def fit_to_tiles(image: Image.Image, max_tiles: int | None, pinpoints, crop_hw: tuple[int, int]) -> Image.Image:
    """``image`` scaled down (never up) to fit the anyres grid of at most ``max_tiles`` crop-size
    tiles that keeps most of it: anyres then picks that grid or a smaller one, since every grid the
    image fits in keeps all of it, one it does not fit in keeps less, and of equals the least padded
    wins (LlavaNext's ``select_best_resolution``). ``pinpoints``: the grids as (height, width)."""
    if max_tiles is None:
        return image
    crop_h, crop_w = crop_hw
    allowed = [(h, w) for h, w in pinpoints if (h // crop_h) * (w // crop_w) <= max_tiles]
    if not allowed:
        least = min((h // crop_h) * (w // crop_w) for h, w in pinpoints)
        raise InvalidRequest(f"max_image_tiles={max_tiles} is below the smallest anyres grid ({least} tiles)")
    width, height = image.size
    scale = max(min(1.0, h / height, w / width) for h, w in allowed)
    if scale >= 1.0:
        return image
    size = (max(1, math.floor(width * scale)), max(1, math.floor(height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)
