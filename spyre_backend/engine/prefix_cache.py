"""Content hashes of KV segments, for automatic prefix caching (``KVCacheManager``).

A segment is ``segment_size`` consecutive tokens inside one KV block: the whole 64-token block on
Spyre (its prefill programs start on block boundaries), a quarter of it on the CPU and GPU, whose
prefills are padded to 16 tokens only (``ModelRunner.prefill_align``). A cached prefix is found to
the segment, not to the block: a second question about an image recomputes at most 15 tokens of
the block it diverges in, not 63.

A segment's hash is chained: it digests the parent segment's hash, the segment's token ids and, for
its image placeholder positions, the image features written there. The placeholder id alone says
nothing about the image; the features say everything the K/V depend on, so two requests share a
segment exactly when its K/V would be computed from the same inputs: the same text with the same
image shares, the same text with another image does not (the features differ from the first
placeholder on). Hashing features rather than the image's bytes costs a pass over them once per
request (a few ms for the mid-size model's 1,300 x 1,024 rows) and needs nothing from the preprocessor.

Each session keeps the hashes of its full segments, extended as its history grows. At the end of a
turn the tokens it computed past its last full segment are registered too (``tail_hash``), so a
conversation resent whole finds everything the previous turn computed, not just its full segments.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

ROOT = b"spyre-prefix-cache-v2"


def chain_root(cache_salt: str = "") -> bytes:
    """Where a sequence's hash chain starts: a tenant's ``cache_salt`` (vLLM's) starts a chain of its
    own, so no segment hash, and so no cached block, is ever shared with another salt or with none."""
    return ROOT if not cache_salt else hashlib.sha256(ROOT + b"salt:" + cache_salt.encode("utf-8")).digest()


def segment_hash(parent: bytes, token_ids: list[int], features: torch.Tensor | None) -> bytes:
    digest = hashlib.sha256(parent)
    digest.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    if features is not None and features.shape[0]:
        rows = features.detach().cpu().contiguous()
        digest.update(str(rows.dtype).encode())
        digest.update(rows.view(torch.uint8).numpy())  # read in place, not copied
    return digest.digest()


class SegmentHasher:
    """Pure functions of a history (token ids and the features of its placeholders, in order):
    the session keeps the hashes (``engine/turns.py``), this only computes them."""

    def __init__(self, segment_size: int, image_token_id: int):
        self.segment_size = segment_size
        self.image_token_id = image_token_id

    def more(self, token_ids: list[int], features: torch.Tensor | None, known: list[bytes],
             num_segments: int, root: bytes = ROOT) -> list[bytes]:
        """The hashes of full segments ``len(known) .. num_segments - 1``, chained on ``known``
        (the first on ``root``)."""
        size, out = self.segment_size, []
        placeholders = token_ids[: len(known) * size].count(self.image_token_id)
        parent = known[-1] if known else root
        for i in range(len(known), num_segments):
            tokens = token_ids[i * size: (i + 1) * size]
            count = tokens.count(self.image_token_id)
            rows = None if not count else features[placeholders: placeholders + count]
            parent = segment_hash(parent, tokens, rows)
            out.append(parent)
            placeholders += count
        return out

    def tail_candidates(self, token_ids: list[int], features: torch.Tensor | None, parent: bytes, segment: int,
                        max_length: int) -> list[tuple[int, bytes]]:
        """(length, hash) of the first tokens of segment ``segment`` (whose parent segment's hash is
        ``parent``), for every length up to ``max_length`` (and below segment_size), longest first."""
        start = segment * self.segment_size
        tokens = token_ids[start: start + min(max_length, self.segment_size - 1)]
        rows = None
        if self.image_token_id in tokens:
            before = token_ids[:start].count(self.image_token_id)
            rows = features[before: before + tokens.count(self.image_token_id)]
        out = []
        for n in range(len(tokens), 0, -1):
            count = tokens[:n].count(self.image_token_id)
            # the length is in the parent: a tail's hash never equals a full segment's
            out.append((n, segment_hash(parent + b"tail:%d" % n, tokens[:n], rows[:count] if count else None)))
        return out
