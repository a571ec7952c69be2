"""Runs the FMS Granite decoder on embeddings over the paged KV cache, with static padded shapes.

Shapes the runner may be asked to run (Spyre compiles each one ahead of time):
- prefill: one sequence, ``q_len`` padded to a multiple of the block size;
- decode: ``batch`` padded to one of ``decode_batch_sizes``, one token per row;
- both: the context read through block tables padded to a power-of-two number of blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from fms.models import get_model

from spyre_backend.engine import attention
from spyre_backend.engine.kv_cache import NULL_BLOCK, PagedKVCache


@dataclass
class StepInputs:
    """One padded forward pass: rows are sequences, columns their new tokens."""

    embeds: torch.Tensor  # [batch, q_len, hidden], unscaled (FMS applies embedding_multiplier)
    positions: torch.Tensor  # [batch, q_len]
    slots: torch.Tensor  # [batch, q_len] flat KV slot per token (null block for padding)
    block_table: torch.Tensor  # [batch, ctx_blocks]
    last_index: torch.Tensor  # [batch] column of the token whose logits are wanted


def next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class ModelRunner:
    def __init__(self, checkpoint: str, *, device: torch.device, dtype: torch.dtype,
                 num_kv_blocks: int | Callable[[int], int], block_size: int, max_context: int,
                 decode_batch_sizes: list[int]):
        """``num_kv_blocks`` may be a function of the KV bytes per token (sizing from a memory budget)."""
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.max_context = max_context
        self.decode_batch_sizes = sorted(decode_batch_sizes)
        self.attn_name = attention.register()

        full = get_model(architecture="hf_pretrained", model_path=checkpoint, data_type=dtype, device_type=device.type)
        config = full.config
        self.image_token_id = int(config.image_token_index)
        lm = full.language_model
        del full  # the vision tower lives in the vision_encoder model, not here
        self.lm = lm.to(device).eval()
        text = lm.config
        self.hidden_size = text.emb_dim
        self.vocab_size = text.src_vocab_size
        self.logits_scaling = float(text.logits_scaling)
        kv_heads = text.kvheads or text.nheads
        head_dim = text.head_dim
        bytes_per_token = 2 * text.nlayers * kv_heads * head_dim * torch.finfo(dtype).bits // 8
        if callable(num_kv_blocks):
            num_kv_blocks = num_kv_blocks(bytes_per_token)
        self.kv_cache = PagedKVCache(
            num_layers=text.nlayers, num_blocks=num_kv_blocks, block_size=block_size,
            kv_heads=kv_heads, head_dim=head_dim, dtype=dtype, device=device,
        )
        self.max_blocks_per_seq = -(-max_context // block_size)

    # -- embeddings ------------------------------------------------------------------------
    @torch.no_grad()
    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.lm.base_model.embedding(token_ids.to(self.device))

    @torch.no_grad()
    def embed_prompt(self, token_ids: torch.Tensor, image_features: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with image features written over the ``<image>`` placeholder positions."""
        from spyre_backend.multimodal import merge_image_features

        embeds = self.embed_tokens(token_ids.unsqueeze(0))
        features = None if image_features is None else image_features.to(self.device, self.dtype).unsqueeze(0)
        return merge_image_features(token_ids.unsqueeze(0).to(self.device), embeds, features,
                                    self.image_token_id)[0]

    # -- forward ---------------------------------------------------------------------------
    def _ctx_blocks(self, needed: int) -> int:
        return min(next_power_of_two(needed), self.max_blocks_per_seq)

    def prefill_inputs(self, embeds: torch.Tensor, start: int, block_table: list[int]) -> StepInputs:
        """One sequence's new tokens ``embeds`` [n, hidden] starting at position ``start``."""
        n = embeds.shape[0]
        q_len = -(-n // self.block_size) * self.block_size
        padded = torch.zeros(1, q_len, self.hidden_size, dtype=self.dtype, device=self.device)
        padded[0, :n] = embeds
        positions = torch.arange(start, start + q_len, device=self.device).unsqueeze(0)
        slots = torch.full((1, q_len), NULL_BLOCK * self.block_size, dtype=torch.long, device=self.device)
        real = positions[0, :n]
        table = torch.tensor(block_table, dtype=torch.long, device=self.device)
        slots[0, :n] = table[real // self.block_size] * self.block_size + real % self.block_size
        ctx = self._ctx_blocks(max(len(block_table), -(-(start + q_len) // self.block_size)))
        bt = torch.full((1, ctx), NULL_BLOCK, dtype=torch.long, device=self.device)
        bt[0, : len(block_table)] = table
        return StepInputs(padded, positions, slots, bt, torch.tensor([n - 1], device=self.device))

    def decode_inputs(self, embeds: torch.Tensor, positions: list[int], block_tables: list[list[int]]) -> StepInputs:
        """One new token per sequence; the batch is padded to a configured decode size."""
        n = len(positions)
        batch = next((b for b in self.decode_batch_sizes if b >= n), None)
        if batch is None:
            raise ValueError(f"decode batch {n} exceeds the largest configured size {self.decode_batch_sizes[-1]}")
        padded = torch.zeros(batch, 1, self.hidden_size, dtype=self.dtype, device=self.device)
        padded[:n, 0] = embeds
        pos = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        pos[:n, 0] = torch.tensor(positions, device=self.device)
        ctx = self._ctx_blocks(max(len(t) for t in block_tables))
        bt = torch.full((batch, ctx), NULL_BLOCK, dtype=torch.long, device=self.device)
        for row, table in enumerate(block_tables):
            bt[row, : len(table)] = torch.tensor(table, device=self.device)
        slots = torch.full((batch, 1), NULL_BLOCK * self.block_size, dtype=torch.long, device=self.device)
        rows = torch.arange(n, device=self.device)
        slots[:n, 0] = bt[rows, pos[:n, 0] // self.block_size] * self.block_size + pos[:n, 0] % self.block_size
        return StepInputs(padded, pos, slots, bt, torch.zeros(batch, dtype=torch.long, device=self.device))

    @torch.no_grad()
    def forward(self, step: StepInputs) -> torch.Tensor:
        """Returns float32 logits [batch, vocab] at each row's ``last_index`` (Granite-scaled)."""
        ctx_len = step.block_table.shape[1] * self.block_size
        kv_pos = torch.arange(ctx_len, device=self.device)
        # causal by absolute position; also hides the never-written tail of the last block
        mask = (kv_pos.view(1, 1, 1, -1) <= step.positions.unsqueeze(1).unsqueeze(-1))
        hidden, _ = self.lm.base_model(
            step.embeds, position_ids=step.positions, past_key_value_states=self.kv_cache.layers,
            use_cache=True, attn_name=self.attn_name, slot_mapping=step.slots,
            block_table=step.block_table, mask=mask,
        )
        rows = torch.arange(hidden.shape[0], device=self.device)
        last = hidden[rows, step.last_index]
        logits = self.lm.head(last) / self.logits_scaling
        return logits.float()
