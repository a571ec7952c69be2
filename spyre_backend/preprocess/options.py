"""A request's media options (Triton's ``mm_processor_kwargs`` JSON input; the OpenAI front builds it
from the body): how documents are rendered and how large an image may be before it is processed.

    {"pages": "1-3,7", "dpi": 144, "max_image_side": 768, "max_image_tiles": 4}

``pages`` and ``dpi`` may also be lists with one entry per document (null: the default). Unknown
keys and bad values are refused with a message naming them. No transformers or torch here: the
OpenAI front checks the same options before it sends them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from spyre_backend.errors import IMAGE_NOT_CACHED, InvalidRequest

MAX_SIDE_LIMIT = 16384  # no image is resized up; a side larger than any image accepted means nothing


@dataclass(frozen=True)
class MediaOptions:
    pages: tuple[str | None, ...] | str | None = None  # every document's, or one per document
    dpi: tuple[int | None, ...] | int | None = None
    max_image_side: int | None = None  # longest side an image or page is resized down to (keeping its shape)
    max_image_tiles: int | None = None  # the largest anyres grid allowed, in crop-size tiles (images/fit_to_tiles)

    KEYS = ("pages", "dpi", "max_image_side", "max_image_tiles")

    @classmethod
    def from_json(cls, text: str | None) -> "MediaOptions":
        if not text:
            return cls()
        try:
            values = json.loads(text)
        except ValueError as exc:
            raise InvalidRequest(f"mm_processor_kwargs is not valid JSON: {exc}") from None
        if not isinstance(values, dict):
            raise InvalidRequest("mm_processor_kwargs must be a JSON object")
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: dict) -> "MediaOptions":
        unknown = sorted(set(values) - set(cls.KEYS))
        if unknown:
            raise InvalidRequest(f"mm_processor_kwargs: unknown key(s) {unknown}; known: {list(cls.KEYS)}")
        pages = values.get("pages")
        pages = tuple(_pages(p) for p in pages) if isinstance(pages, list) else _pages(pages)
        dpi = values.get("dpi")
        dpi = tuple(_positive(d, "dpi") for d in dpi) if isinstance(dpi, list) else _positive(dpi, "dpi")
        side = _positive(values.get("max_image_side"), "max_image_side")
        if side is not None and side > MAX_SIDE_LIMIT:
            raise InvalidRequest(f"max_image_side must be at most {MAX_SIDE_LIMIT}, got {side}")
        return cls(pages, dpi, side, _positive(values.get("max_image_tiles"), "max_image_tiles"))

    @property
    def image_budget(self) -> tuple[int | None, int | None]:
        """What changes an image's processed crops (part of the processed-image cache's keys)."""
        return self.max_image_side, self.max_image_tiles

    def to_dict(self) -> dict:
        out = {}
        for key in self.KEYS:
            value = getattr(self, key)
            if value is not None:
                out[key] = list(value) if isinstance(value, tuple) else value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def for_document(self, index: int, count: int, default_dpi: int, max_dpi: int) -> tuple[str | None, int]:
        """Document ``index``'s (pages spec, dpi), of ``count`` documents in the request."""
        pages, dpi = self.pages, self.dpi
        for name, value in (("pages", pages), ("dpi", dpi)):
            if isinstance(value, tuple) and len(value) != count:
                raise InvalidRequest(f"mm_processor_kwargs: {name} lists {len(value)} entries for {count} document(s)")
        if isinstance(pages, tuple):
            pages = pages[index]
        if isinstance(dpi, tuple):
            dpi = dpi[index]
        dpi = default_dpi if dpi is None else dpi
        if dpi > max_dpi:
            raise InvalidRequest(f"document {index}: dpi {dpi} is over the limit max_document_dpi={max_dpi}")
        return pages, dpi


def _pages(value) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise InvalidRequest(f"pages must be a string such as \"1-3,7\", got {value!r}")


def _positive(value, name: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidRequest(f"{name} must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class MediaIds:
    """What names a request's media beyond their bytes: vLLM's uuids (one per image and document,
    "" for none; an item sent empty is looked up by its uuid) and the tenant's cache salt, which
    every cache key of the request includes, so that no cache is shared between tenants."""

    image_uuids: tuple[str, ...] = ()
    document_uuids: tuple[str, ...] = ()
    cache_salt: str = ""

    def check(self, num_images: int, num_documents: int) -> None:
        for name, uuids, count in (("image_uuid", self.image_uuids, num_images),
                                   ("document_uuid", self.document_uuids, num_documents)):
            if uuids and len(uuids) != count:
                raise InvalidRequest(f"{name} has {len(uuids)} entries for {count} item(s): "
                                     "give one per item (\"\" for none)")

    def image_uuid(self, index: int) -> str:
        return self.image_uuids[index] if self.image_uuids else ""

    def document_uuid(self, index: int) -> str:
        return self.document_uuids[index] if self.document_uuids else ""


def not_cached(what: str, index: int, uuid: str) -> str:
    """The refusal of an item sent as its uuid alone that this server does not hold."""
    return (f"{IMAGE_NOT_CACHED}: {what} {index} was sent as uuid {uuid!r} alone, and this server does not hold "
            f"it (evicted, never sent here, or sent with other settings); send it again with its uuid")
