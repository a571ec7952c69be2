"""An LRU cache of encoded images, keyed by the preprocessed image's content.

A repeated image (same crops after preprocessing, same original size) gets the features of its
first encode back instead of going through the vision tower again. The key hashes the bytes of
the crops the encoder would run, so two uploads of one picture in different file formats hit only
if they preprocess to the same pixels. The budget counts the bytes of the stored features.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np
import torch


def salt_key(cache_salt: str) -> bytes:
    """A tenant's cache salt as a blake2b key: keys hashed with it are never found under another."""
    return hashlib.blake2b(cache_salt.encode("utf-8")).digest()[:32] if cache_salt else b""


def image_key(crops: torch.Tensor, image_size, cache_salt: str = "") -> bytes:
    """Content key of one image: its real crops [n, 3, H, W] (no padding crops) and (height, width),
    within its tenant's ``cache_salt`` (a keyed hash: another salt never finds it)."""
    array = np.ascontiguousarray(crops.detach().cpu().numpy())
    h = hashlib.blake2b(digest_size=20, key=salt_key(cache_salt))
    h.update(f"{array.dtype}:{array.shape}:{[int(x) for x in image_size]}".encode())
    h.update(memoryview(array).cast("B"))
    return h.digest()


class LRUCache:
    """Values per key, least recently used evicted first, within ``max_bytes`` (each value's size
    given when it is put). Not thread-safe: each model instance that owns one runs one request at
    a time."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[bytes, tuple[object, int]] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes):
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[0]

    def put(self, key: bytes, value, size: int, replace: bool = False) -> None:
        """``replace``: a value already under ``key`` gives way (a name given to other content)."""
        if replace and key in self._entries:
            _, old = self._entries.pop(key)
            self.bytes -= old
        if size > self.max_bytes or key in self._entries:
            return  # would evict everything else, or is already there
        while self.bytes + size > self.max_bytes:
            _, (_, old) = self._entries.popitem(last=False)
            self.bytes -= old
        self._entries[key] = (value, size)
        self.bytes += size


class EncoderCache(LRUCache):
    """Features per image key (``image_key``); the budget counts the bytes of the stored features."""

    def put(self, key: bytes, features: torch.Tensor) -> None:
        # a copy of its own: a view would keep the whole batch's output alive
        super().put(key, features.detach().clone(), features.numel() * features.element_size())
