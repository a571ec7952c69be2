"""A document's selected pages as processed images, rendered only when the cache lacks them.

The preprocessor's processed-image cache holds each page under the document's bytes (hashed with
the tenant's cache salt), its page number, the dpi and the resize; the page count is kept apart,
under the document's bytes, so that a second question about the same pages opens no PDF and starts
no render. A document's uuid names its bytes' hash, so a later request may send the uuid alone.
"""

from __future__ import annotations

import hashlib

from PIL import Image

from spyre_backend.config import InputLimits
from spyre_backend.preprocess.documents import PageRenderer, document_bytes, select_pages
from spyre_backend.errors import InvalidRequest
from spyre_backend.preprocess.options import MediaIds, MediaOptions, not_cached
from spyre_backend.vision.cache import LRUCache, salt_key

_ENTRY_BYTES = 64  # what a page count or a uuid costs in its cache, as budgeted


class DocumentPages:
    def __init__(self, preprocessor, limits: InputLimits):
        """``preprocessor``: its ``process(pil, budget)`` and ``image_cache`` (None: no cache)."""
        self.preprocessor, self.limits = preprocessor, limits
        self.renderer = PageRenderer(limits.document_render_timeout_s, limits.document_render_memory_mb)
        self.page_counts = LRUCache(2**20)  # document digest -> its number of pages
        self.uuids = LRUCache(2**20)  # (uuid, salt) -> the digest of the document it named
        self.pages_rendered = 0  # since start, for the metrics

    def pages(self, payload: bytes, index: int, count: int, options: MediaOptions, ids: MediaIds = MediaIds()) -> list:
        """Document ``index`` (of ``count`` in the request): its selected pages' ProcessedImages, in
        order. Sent empty with a uuid: the pages kept under the uuid, else ``image_not_cached``."""
        limits, uuid, salt = self.limits, ids.document_uuid(index), ids.cache_salt
        spec, dpi = options.for_document(index, count, limits.document_dpi, limits.max_document_dpi)
        cache = self.preprocessor.image_cache
        named = None if not uuid else hashlib.blake2b(repr(("uuid", uuid, salt)).encode(), digest_size=20).digest()
        if not payload and uuid:
            data, digest = None, self.uuids.get(named)
            if digest is None or cache is None:
                raise InvalidRequest(not_cached("document", index, uuid))
        else:
            data = document_bytes(payload, index, limits.max_document_bytes)
            digest = hashlib.blake2b(data, digest_size=20, key=salt_key(salt)).digest()

        def key(page: int) -> bytes:
            return digest + repr(("page", page, dpi, options.image_budget)).encode()

        found: dict[int, object] = {}
        known = self.page_counts.get(digest) if cache is not None else None
        if known is not None:
            selected = select_pages(spec, known, limits.max_document_pages, index)
            found = {page: image for page in selected if (image := cache.get(key(page))) is not None}
            if len(found) == len(selected):
                if named is not None and data is not None:  # the uuid names this document from now on
                    self.uuids.put(named, digest, _ENTRY_BYTES, replace=True)
                return [found[page] for page in selected]
        if data is None:  # named by its uuid, but its pages at these settings are gone
            raise InvalidRequest(not_cached("document", index, uuid))
        answer = self.renderer.render(data, index, spec, dpi, max_pages=limits.max_document_pages,
                                      max_pixels=limits.max_image_pixels, skip=frozenset(found))
        self.pages_rendered += len(answer["rendered"])
        for page, (size, rgb) in answer["rendered"].items():
            image = self.preprocessor.process(Image.frombytes("RGB", size, rgb), options.image_budget)
            found[page] = image
            if cache is not None:
                cache.put(key(page), image, image.crops.nbytes)
        self.page_counts.put(digest, answer["count"], _ENTRY_BYTES)
        if named is not None:
            self.uuids.put(named, digest, _ENTRY_BYTES, replace=True)
        return [found[page] for page in answer["pages"]]

    def close(self) -> None:
        self.renderer.close()
