"""A document's selected pages as processed images, rendered only when the cache lacks them.

The preprocessor's processed-image cache holds each page under the document's bytes, its page
number, the dpi and the resize; the page count is kept apart, under the document's bytes, so that
a second question about the same pages opens no PDF and starts no render.
"""

from __future__ import annotations

import hashlib

from PIL import Image

from spyre_backend.config import InputLimits
from spyre_backend.preprocess.documents import PageRenderer, document_bytes, select_pages
from spyre_backend.preprocess.options import MediaOptions
from spyre_backend.vision.cache import LRUCache

_COUNT_ENTRY_BYTES = 64  # what a page count costs in its cache, as budgeted


class DocumentPages:
    def __init__(self, preprocessor, limits: InputLimits):
        """``preprocessor``: its ``process(pil, budget)`` and ``image_cache`` (None: no cache)."""
        self.preprocessor, self.limits = preprocessor, limits
        self.renderer = PageRenderer(limits.document_render_timeout_s, limits.document_render_memory_mb)
        self.page_counts = LRUCache(2**20)  # document digest -> its number of pages
        self.pages_rendered = 0  # since start, for the metrics

    def pages(self, payload: bytes, index: int, count: int, options: MediaOptions) -> list:
        """Document ``index`` (of ``count`` in the request): its selected pages' ProcessedImages, in order."""
        limits = self.limits
        data = document_bytes(payload, index, limits.max_document_bytes)
        spec, dpi = options.for_document(index, count, limits.document_dpi, limits.max_document_dpi)
        digest = hashlib.blake2b(data, digest_size=20).digest()
        cache = self.preprocessor.image_cache

        def key(page: int) -> bytes:
            return digest + repr(("page", page, dpi, options.image_budget)).encode()

        found: dict[int, object] = {}
        known = self.page_counts.get(digest) if cache is not None else None
        if known is not None:
            selected = select_pages(spec, known, limits.max_document_pages, index)
            found = {page: image for page in selected if (image := cache.get(key(page))) is not None}
            if len(found) == len(selected):
                return [found[page] for page in selected]
        answer = self.renderer.render(data, index, spec, dpi, max_pages=limits.max_document_pages,
                                      max_pixels=limits.max_image_pixels, skip=frozenset(found))
        self.pages_rendered += len(answer["rendered"])
        for page, (size, rgb) in answer["rendered"].items():
            image = self.preprocessor.process(Image.frombytes("RGB", size, rgb), options.image_budget)
            found[page] = image
            if cache is not None:
                cache.put(key(page), image, image.crops.nbytes)
        self.page_counts.put(digest, answer["count"], _COUNT_ENTRY_BYTES)
        return [found[page] for page in answer["pages"]]

    def close(self) -> None:
        self.renderer.close()
