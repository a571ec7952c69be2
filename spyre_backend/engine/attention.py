"""Paged attention registered as an FMS attention op.

FMS lets a model's attention delegate storing and reading K/V to a registered op. Ours writes
the new keys/values into the block pools through a slot mapping and attends over keys gathered
through each sequence's block table, with a boolean mask (causal by absolute position, hiding
padding). Prefill, chunked prefill and decode run this same program; only the padded shapes
differ, which is what a Spyre card (static shapes only) needs.

On the CPU, decode rows use a second form of the same attention (``register(fused_decode=True)``)
that reads each cached key and value once, in place, instead of copying them out of the pool into
a padded context that SDPA then reads again: our kernel (``cpu_kernels.py``: 2b shape, 4 rows of
~1,400 cached tokens in bf16, 1.1 ms a layer against the gather's 2.7), in eager and compiled
steps alike; where it cannot run (no compiler), inductor's fusion of the same computation in
compiled steps (the block-table lookup inside the dot products and the weighted sum; slower than
the kernel, 5.8 ms there) and the gather in eager ones. Spyre's compiler gets the program as
written, with the gather.

A mixed step (cpu and cuda: ``DevicePlan.mixes_steps``) is one row of tokens: a prefill chunk,
then one token of each decode row. Its keys and values are stored by slot like any other; the
query splits where the decode rows start (``decode_block_table`` has one row each), the chunk
attends as a prefill and the rows as a decode batch, each through its own block tables and mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from fms.modules.attention import register_attention_op

from spyre_backend.device import cpu_kernels

ATTN_NAME = "spyre_paged_attention"
FUSED_DECODE_ATTN_NAME = "spyre_paged_attention_fused_decode"

# An op inductor cannot see into, so it cannot inline what computes its input into its consumers:
# left to itself it recomputed the query's rotary embedding for every cached key, in a scalar loop,
# and the fused decode step was slower than the gather (batch 16: 150-197 ms).
_LIBRARY = torch.library.Library("spyre_attention", "DEF")
_LIBRARY.define("materialize(Tensor x) -> Tensor")
_LIBRARY.impl("materialize", lambda x: x.clone(), "CompositeExplicitAutograd")


@torch.library.register_fake("spyre_attention::materialize")
def _(x):
    return torch.empty_like(x)


def _store(keys, values, key_pool, value_pool, *, slot_mapping, **_):
    # keys/values: [batch, q_len, kv_heads, head_dim]; pools: [blocks, block_size, kv_heads, head_dim]
    flat_slots = slot_mapping.reshape(-1)
    kv_heads, head_dim = key_pool.shape[-2:]
    key_pool.view(-1, kv_heads, head_dim).index_copy_(0, flat_slots, keys.reshape(-1, kv_heads, head_dim))
    value_pool.view(-1, kv_heads, head_dim).index_copy_(0, flat_slots, values.reshape(-1, kv_heads, head_dim))
    return key_pool, value_pool, key_pool, value_pool


def _compute(query, key_pool, value_pool, nheads, kvheads, p_dropout, scale_factor, *,
             block_table, mask, **_):
    # query: [batch, q_len, heads, head_dim]; block_table: [batch, ctx_blocks]; mask: [batch, 1, q_len, ctx]
    batch, q_len, heads, head_dim = query.shape
    ctx_blocks = block_table.shape[1]
    _, block_size, kv_heads, _ = key_pool.shape
    # index_select on the flat table: a plain gather, several times faster on CPU than pool[table]
    blocks = block_table.reshape(-1)
    keys = key_pool.index_select(0, blocks).view(batch, ctx_blocks * block_size, kv_heads, head_dim).transpose(1, 2)
    values = value_pool.index_select(0, blocks).view(batch, ctx_blocks * block_size, kv_heads, head_dim).transpose(1, 2)
    # Grouped-query attention: query head h reads kv head h // group. The group's query heads
    # become extra query rows of their kv head, so K/V are never copied once per query head
    # (that copy was two thirds of a batch-16 decode step).
    group = nheads // kvheads
    q = query.transpose(1, 2).reshape(batch, kv_heads, group * q_len, head_dim)
    if group > 1:
        mask = mask.repeat(1, 1, group, 1)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale_factor)
    return out.view(batch, heads, q_len, head_dim).transpose(1, 2).contiguous()


def _compute_fused_decode(query, key_pool, value_pool, nheads, kvheads, p_dropout, scale_factor, *,
                          block_table, mask, **kwargs):
    """Decode rows attend in place over the pool (see the module doc); prefill chunks as in ``_compute``."""
    batch, q_len, heads, head_dim = query.shape
    if q_len == 1 and _decode_kernel_serves(query, key_pool, nheads // kvheads):
        out = torch.ops.spyre_kernels.decode_attention(query.view(batch, heads, head_dim), key_pool, value_pool,
                                                       block_table, mask.view(batch, -1), scale_factor)
        return out.view(batch, 1, heads, head_dim)
    # a prefill chunk reads most of its context anyway; an eager step without the kernel gathers
    if q_len != 1 or not torch.compiler.is_compiling():
        return _compute(query, key_pool, value_pool, nheads, kvheads, p_dropout, scale_factor,
                        block_table=block_table, mask=mask, **kwargs)
    _, block_size, kv_heads, _ = key_pool.shape
    ctx_blocks = block_table.shape[1]
    group = nheads // kvheads  # query head h reads kv head h // group
    q = torch.ops.spyre_attention.materialize(query * scale_factor)
    q = q.view(batch, 1, 1, kv_heads, group, head_dim)
    # [batch, ctx_blocks, block_size, kv_heads, group]: a score per cached key and query head
    scores = (q * key_pool[block_table].unsqueeze(4)).sum(-1)
    visible = mask.view(batch, ctx_blocks, block_size, 1, 1)
    scores = scores.masked_fill(~visible, float("-inf")).view(batch, ctx_blocks * block_size, kv_heads, group)
    probs = torch.softmax(scores, dim=1).view(batch, ctx_blocks, block_size, kv_heads, group, 1)
    out = (probs * value_pool[block_table].unsqueeze(4)).sum((1, 2))  # [batch, kv_heads, group, head_dim]
    return out.view(batch, 1, heads, head_dim)


def _decode_kernel_serves(query, key_pool, group: int) -> bool:
    return (query.device.type == "cpu" and cpu_kernels.ready() and group in cpu_kernels.ATTENTION_GROUPS
            and key_pool.dtype in (torch.float32, torch.bfloat16))


def _mixed(compute):
    """``compute`` extended to mixed steps (see the module doc)."""

    def compute_mixed(query, key_pool, value_pool, nheads, kvheads, p_dropout, scale_factor, *,
                      block_table, mask, decode_block_table=None, decode_mask=None, **kwargs):
        args = (key_pool, value_pool, nheads, kvheads, p_dropout, scale_factor)
        if decode_block_table is None:
            return compute(query, *args, block_table=block_table, mask=mask, **kwargs)
        rows = decode_block_table.shape[0]
        chunk = query.shape[1] - rows
        prefill = compute(query[:, :chunk], *args, block_table=block_table, mask=mask, **kwargs)
        decode = compute(query[0, chunk:].unsqueeze(1), *args, block_table=decode_block_table, mask=decode_mask,
                         **kwargs)
        return torch.cat([prefill, decode.transpose(0, 1)], dim=1)

    return compute_mixed


def register(fused_decode: bool = False) -> str:
    """Registers the op with FMS (once per process) and returns its name."""
    name, compute = (FUSED_DECODE_ATTN_NAME, _compute_fused_decode) if fused_decode else (ATTN_NAME, _compute)
    try:
        register_attention_op(name, _store, _mixed(compute))
    except KeyError:
        pass  # already registered in this process
    return name
