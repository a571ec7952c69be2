"""The vision encoder's cache of encoded images, without Triton: hits, misses, LRU eviction within
the byte budget, and features bit for bit those of a fresh encode."""

from __future__ import annotations

import pytest
import torch

from spyre_backend.preprocess.processor import Preprocessor
from spyre_backend.vision.cache import EncoderCache, image_key
from spyre_backend.vision.encoder import VisionEncoder
from testkit.images import shape_png

TRIANGLE = shape_png("triangle", "green", "white", (200, 150))
CIRCLE = shape_png("circle", "red", "blue", (80, 80))


def features(n: int, value: float = 0.0) -> torch.Tensor:
    return torch.full((n, 4), value)  # n * 16 bytes


def test_hits_misses_and_least_recently_used_eviction():
    cache = EncoderCache(max_bytes=3 * 16)
    for key in (b"a", b"b", b"c"):
        assert cache.get(key) is None
        cache.put(key, features(1))
    assert (cache.hits, cache.misses, cache.bytes, len(cache)) == (0, 3, 48, 3)
    assert cache.get(b"a") is not None  # a is now the most recently used
    cache.put(b"d", features(1))  # evicts b, the least recently used
    assert cache.get(b"b") is None
    assert cache.get(b"a") is not None and cache.get(b"c") is not None and cache.get(b"d") is not None
    assert cache.bytes == 48
    cache.put(b"e", features(2))  # needs two entries' room
    assert len(cache) == 2 and cache.bytes == 48 and cache.get(b"e") is not None


def test_an_entry_over_the_budget_is_not_kept():
    cache = EncoderCache(max_bytes=16)
    cache.put(b"a", features(1))
    cache.put(b"big", features(2))
    assert cache.get(b"big") is None and cache.get(b"a") is not None


def test_stored_features_are_a_copy():
    cache = EncoderCache(max_bytes=1024)
    batch = features(4)
    cache.put(b"a", batch[:1])
    batch.fill_(7.0)
    assert cache.get(b"a").eq(0).all()
    assert cache.get(b"a").untyped_storage().nbytes() == 16  # not a view keeping the batch alive


def test_key_follows_content_and_size():
    crops = torch.rand(3, 3, 8, 8)
    assert image_key(crops, [10, 20]) == image_key(crops.clone(), torch.tensor([10, 20]))
    assert image_key(crops, [10, 20]) != image_key(crops, [20, 10])
    changed = crops.clone()
    changed[2, 0, 7, 7] += 1e-6
    assert image_key(crops, [10, 20]) != image_key(changed, [10, 20])


@pytest.fixture(scope="module")
def preprocessor(checkpoint):
    return Preprocessor(str(checkpoint))


@pytest.fixture(scope="module")
def plain(checkpoint):
    return VisionEncoder(str(checkpoint))


def inputs(preprocessor, images):
    p = preprocessor("What is in the image?", images, apply_chat_template=True)
    return torch.from_numpy(p.pixel_values), torch.from_numpy(p.image_sizes)


def test_cached_features_equal_a_fresh_encode(checkpoint, preprocessor, plain, monkeypatch):
    encoder = VisionEncoder(str(checkpoint), cache=EncoderCache(64 * 2**20))
    encoded = []
    original = encoder._encode_image
    monkeypatch.setattr(encoder, "_encode_image", lambda crops, size: encoded.append(1) or original(crops, size))

    first = encoder.encode(*inputs(preprocessor, [TRIANGLE]))
    assert (encoder.cache.hits, encoder.cache.misses, len(encoded)) == (0, 1, 1)
    again = encoder.encode(*inputs(preprocessor, [TRIANGLE]))
    assert (encoder.cache.hits, encoder.cache.misses, len(encoded)) == (1, 1, 1)  # not encoded again
    assert torch.equal(again, first)
    assert torch.equal(again, plain.encode(*inputs(preprocessor, [TRIANGLE])))

    # one new and one repeated image: only the new one goes through the tower
    pair = encoder.encode(*inputs(preprocessor, [CIRCLE, TRIANGLE]))
    assert (encoder.cache.hits, encoder.cache.misses, len(encoded)) == (2, 2, 2)
    assert torch.equal(pair, plain.encode(*inputs(preprocessor, [CIRCLE, TRIANGLE])))
    assert torch.equal(pair[-first.shape[0]:], first)


def test_a_small_budget_evicts_and_still_encodes_correctly(checkpoint, preprocessor, plain):
    one_image = plain.encode(*inputs(preprocessor, [TRIANGLE]))
    budget = one_image.numel() * one_image.element_size()
    encoder = VisionEncoder(str(checkpoint), cache=EncoderCache(budget))
    encoder.encode(*inputs(preprocessor, [TRIANGLE]))
    encoder.encode(*inputs(preprocessor, [CIRCLE]))  # evicts the triangle
    assert len(encoder.cache) == 1
    again = encoder.encode(*inputs(preprocessor, [TRIANGLE]))
    assert (encoder.cache.hits, encoder.cache.misses) == (0, 3)
    assert torch.equal(again, one_image)
