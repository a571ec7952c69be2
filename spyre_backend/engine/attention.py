"""Paged attention registered as an FMS attention op.

FMS lets a model's attention delegate storing and reading K/V to a registered op. Ours writes
the new keys/values into the block pools through a slot mapping and attends over keys gathered
through each sequence's block table, with a boolean mask (causal by absolute position, hiding
padding). Prefill, chunked prefill and decode run this same program; only the padded shapes
differ, which is what a Spyre card (static shapes only) needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from fms.modules.attention import register_attention_op

ATTN_NAME = "spyre_paged_attention"


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


def register() -> str:
    try:
        register_attention_op(ATTN_NAME, _store, _compute)
    except KeyError:
        pass  # already registered in this process
    return ATTN_NAME
