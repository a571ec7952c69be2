"""The KV cache's device tensors, preallocated once: the model runner owns them.

Every layer owns one key pool and one value pool of shape
``[num_blocks, block_size, kv_heads, head_dim]``. A sequence's block ids (handed out by
``kv_cache_manager.KVCacheManager``, which holds no tensors) say where its tokens live: token ``t``
is in block ``ids[t // block_size]`` at offset ``t % block_size``. Block 0 is the padding block.
"""

from __future__ import annotations

import torch


class KVPool:
    def __init__(self, *, num_layers: int, num_blocks: int, block_size: int, kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device):
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (num_blocks, block_size, kv_heads, head_dim)
        self.layers = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(num_layers)
        ]

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.layers)
