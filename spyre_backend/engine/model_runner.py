"""Runs the FMS Granite decoder on embeddings over the paged KV cache, with static padded shapes.

The shapes the runner can be asked to run form a finite set, fixed at load and all compiled at
warmup (what a Spyre card needs; inductor on the CPU or GPU compiles one graph per kind of shape,
symbolic in the bucketed dims, and never recompiles while serving):
- prefill: ``q_len`` a multiple of ``prefill_align`` (the block size on Spyre, 16 tokens elsewhere:
  ``DevicePlan.prefill_align``), up to ``prefill_chunk``;
- decode: ``batch`` one of ``decode_batch_sizes``, one token per row;
- both: the context read through block tables is one of ``context_buckets`` (blocks), capped at
  ``max_context``;
- mixed (cpu and cuda, ``DevicePlan.mixes_steps``): a prefill chunk and the step's decode rows in
  one row of tokens, so the weights are read once for both. Its sizes are symbolic for inductor:
  one graph, compiled at warmup from one example (``mixed_example``); where it compiles, the
  padding keeps every size at 2 or more, so none is specialised away from that graph (and ``DevicePlan.compile`` turns
  off duck shaping, which would give sizes equal in the example one symbol).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from spyre_backend.device import DevicePlan, memory
from spyre_backend.device.host_memory import release_freed_memory
from spyre_backend.engine import attention
from spyre_backend.engine.kv_cache import KVPool
from spyre_backend.engine.kv_cache_manager import NULL_BLOCK
from spyre_backend.engine.sampler import Sample, SampleRow, sample
from spyre_backend.models import ModelSpec


@dataclass
class SequenceInput:
    """One sequence's share of a step, as the runner needs it: plain data, no sessions, no text."""

    request_id: int
    token_ids: list[int]  # the tokens to compute (image placeholders included)
    start: int  # position of the first one
    block_ids: tuple[int, ...] | list[int]  # the sequence's KV blocks, covering start + len(token_ids)
    image_features: torch.Tensor | None = None  # [placeholders among token_ids, hidden] (host)
    sampling: SampleRow | None = None  # the step reaches the sequence's end: sample its next token

    @property
    def wants_logits(self) -> bool:
        return self.sampling is not None


@dataclass
class ModelRunnerOutput:
    sampled: dict[int, Sample]  # request id -> the token sampled for it (sequences that sample)


@dataclass
class StepInputs:
    """One padded forward pass: rows are sequences, columns their new tokens."""

    embeds: torch.Tensor  # [batch, q_len, hidden], unscaled (FMS applies embedding_multiplier)
    positions: torch.Tensor  # [batch, q_len]
    slots: torch.Tensor  # [batch, q_len] flat KV slot per token (null block for padding)
    block_table: torch.Tensor  # [batch, ctx_blocks]
    last_index: torch.Tensor  # [batch] column of the token whose logits are wanted
    # a mixed step (batch 1): the decode rows' tables; the row's last ``len(decode_block_table)``
    # tokens are theirs, and ``last_index`` has the chunk's last token, then each decode row's
    decode_block_table: torch.Tensor | None = None  # [rows, ctx_blocks]

    @property
    def shape(self) -> tuple[int, ...]:
        """(batch, q_len, ctx_blocks), and for a mixed step (decode rows, their ctx_blocks) too."""
        shape = (self.embeds.shape[0], self.embeds.shape[1], self.block_table.shape[1])
        return shape if self.decode_block_table is None else shape + tuple(self.decode_block_table.shape)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        rest = () if self.decode_block_table is None else (self.decode_block_table,)
        return (self.embeds, self.positions, self.slots, self.block_table, self.last_index) + rest


def next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class ModelRunner:
    def __init__(self, checkpoint: str, *, plan: DevicePlan, spec: ModelSpec,
                 num_kv_blocks: int | Callable[[int, int], int], block_size: int, max_context: int,
                 prefill_chunk: int, decode_batch_sizes: list[int], prefill_align: int = 0):
        """``num_kv_blocks`` may be a function of the KV bytes per token and of the memory available
        once the weights are loaded (sizing from a memory budget). ``prefill_align``: 0 for the
        device's (``DevicePlan.prefill_align``); it must divide ``block_size``.

        Raises memory.InsufficientMemory, before loading anything, where the weights and one full
        context cannot fit in the memory available."""
        self.plan = plan
        self.device = plan.torch_device
        self.dtype = plan.dtype
        self.spec = spec
        self.block_size = block_size
        self.prefill_align = prefill_align or plan.prefill_align(block_size)
        if block_size % self.prefill_align or prefill_chunk % self.prefill_align:
            raise ValueError(f"prefill_align {self.prefill_align} must divide block_size {block_size} "
                             f"and prefill_chunk {prefill_chunk}")
        self.max_context = max_context
        self.prefill_chunk = prefill_chunk
        self.decode_batch_sizes = sorted(decode_batch_sizes)
        self.max_blocks_per_seq = -(-max_context // block_size)
        self.context_buckets = self._context_buckets()  # fixed at load; looked up every step
        self.attn_name = attention.register(fused_decode=plan.attends_in_place)
        self.mixes_steps = plan.mixes_steps and self.max_blocks_per_seq >= 2  # mixed sizes are >= 2

        memory.decoder_estimate(checkpoint, self.dtype, spec,
                                min_kv_tokens=(self.max_blocks_per_seq + 1) * block_size
                                ).check(memory.available_bytes(self.device))
        self.image_token_id = spec.image_token_id
        self.lm = spec.load_language_model(checkpoint, self.dtype, self.device.type).to(self.device)
        self.layers_prepared = plan.prepare(self.lm, decoder=True)  # e.g. the CPU's decode kernel
        text = spec.text
        self.hidden_size = text.hidden_size
        self.logits_scaling = text.logits_scaling
        bytes_per_token = text.kv_bytes_per_token(self.dtype)
        self.weight_bytes = memory.module_bytes(self.lm)
        release_freed_memory()  # what loading dropped, before the pool is sized from what is left
        if callable(num_kv_blocks):
            num_kv_blocks = num_kv_blocks(bytes_per_token, memory.available_bytes(self.device))
        self.kv_pool = KVPool(
            num_layers=text.num_layers, num_blocks=num_kv_blocks, block_size=block_size,
            kv_heads=text.kv_heads, head_dim=text.head_dim, dtype=self.dtype, device=self.device,
        )
        self._forward = plan.compile(self._forward_impl, name="granite_decoder")
        self.shapes_run: set[tuple[int, ...]] = set()

    # -- the static shape set --------------------------------------------------------------
    def _context_buckets(self) -> list[int]:
        """Context sizes in blocks: powers of two with a midpoint between each pair from 8 on
        (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, ...), so a context is padded by at most a third, not
        doubled: attention gathers and reads the whole bucket every step."""
        buckets, b = [], 1
        while b < self.max_blocks_per_seq:
            buckets.append(b)
            if b >= 8 and b + b // 2 < self.max_blocks_per_seq:
                buckets.append(b + b // 2)
            b *= 2
        return buckets + [self.max_blocks_per_seq]

    def _ctx_blocks(self, needed: int) -> int:
        return next(b for b in self.context_buckets if b >= needed)

    def shape_set(self) -> list[tuple[int, int, int]]:
        """Every (batch, q_len, ctx_blocks) this runner can run."""
        return self._shapes(range(self.prefill_align, self.prefill_chunk + 1, self.prefill_align))

    def warmup_shapes(self) -> list[tuple[int, int, int]]:
        """The shapes warmup runs. A static compiler (sendnn) builds a program per shape: all of
        them. Inductor's graphs are symbolic in the bucketed dims, so one run per kind of shape
        would do; warmup runs each context bucket with the smallest prefill and with every
        block-multiple one, about a quarter of the prefill shapes once they are padded to 16."""
        if self.plan.compile_backend == "sendnn":
            return self.shape_set()
        if not self.plan.compiles_all_steps:  # decode steps only, past the first block (_compiled_decode_step)
            return [(batch, 1, ctx) for batch in self.decode_batch_sizes for ctx in self.context_buckets if ctx > 1]
        return self._shapes(sorted({self.prefill_align, *range(self.block_size, self.prefill_chunk + 1, self.block_size)}))

    def _shapes(self, q_lens) -> list[tuple[int, int, int]]:
        shapes = []
        for q_len in q_lens:
            shapes += [(1, q_len, ctx) for ctx in self.context_buckets if ctx * self.block_size >= q_len]
        shapes += [(batch, 1, ctx) for batch in self.decode_batch_sizes for ctx in self.context_buckets]
        return shapes

    @torch.no_grad()
    def warmup(self) -> None:
        """Compile before serving: each warmup shape runs once, and the one mixed graph (eager:
        nothing to compile, nothing to run)."""
        if self.plan.compile_backend == "eager":
            return
        for batch, q_len, ctx in self.warmup_shapes():
            self.forward(self.dummy_inputs(batch, q_len, ctx))
        if self.compiles_mixed_steps:  # one graph for every mixed step (the module doc)
            self.forward(self.mixed_example())

    @property
    def compiles_mixed_steps(self) -> bool:
        return self.mixes_steps and self.plan.compile_backend != "eager" and self.plan.compiles_all_steps

    # -- prefix-cache copies ------------------------------------------------------------------
    @torch.no_grad()
    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy KV blocks (source, destination) in every layer: the cached segments a sequence
        takes into a block of its own (``KVCacheManager.take_cached``)."""
        if not copies:
            return
        source = torch.tensor([s for s, _ in copies], device=self.device)
        destination = torch.tensor([d for _, d in copies], device=self.device)
        for keys, values in self.kv_pool.layers:
            keys.index_copy_(0, destination, keys.index_select(0, source))
            values.index_copy_(0, destination, values.index_select(0, source))

    # -- one engine step ----------------------------------------------------------------------
    @torch.no_grad()
    def execute(self, sequences: list[SequenceInput], block_copies: list[tuple[int, int]] = ()) -> ModelRunnerOutput:
        """One engine step: copy the prefix cache's blocks, compute every sequence's tokens into
        the KV cache, and sample the next token of each sequence that asks for one."""
        self.copy_blocks(block_copies)  # before the step writes anything
        logits = self.logits(sequences)
        rows = [i for i, seq in enumerate(sequences) if seq.sampling is not None]
        if not rows:
            return ModelRunnerOutput({})
        # never the image placeholder: the engine finds images by that token id, so a sampled one
        # would be taken for an image without features (a text token for transformers)
        samples = sample(torch.stack([logits[i] for i in rows]), [sequences[i].sampling for i in rows],
                         never=[self.image_token_id])
        return ModelRunnerOutput({sequences[i].request_id: s for i, s in zip(rows, samples)})

    @torch.no_grad()
    def logits(self, sequences: list[SequenceInput]) -> list[torch.Tensor | None]:
        """Compute every sequence's tokens into the KV cache; float32 logits [vocab] of each
        sequence's last token where ``wants_logits`` (None elsewhere), in the given order.

        Sequences of several tokens (prompt chunks) run one prefill program each; single tokens
        (decode rows) run together in one decode program; where steps mix, a step of one chunk and
        decode rows runs as one mixed program.
        """
        chunks = [i for i, seq in enumerate(sequences) if len(seq.token_ids) > 1]
        decode_rows = [i for i, seq in enumerate(sequences) if len(seq.token_ids) == 1]
        # at most max_running decode rows: decode_inputs refuses more than its largest batch
        rows = [sequences[i] for i in decode_rows]
        chunk_embeds = {i: self.embed_prompt(torch.tensor(sequences[i].token_ids), sequences[i].image_features)
                        for i in chunks}
        runs: list[tuple[list[int], StepInputs]] = []  # (the sequences' indexes, in output row order), inputs
        if self.mixes_steps and len(chunks) == 1 and rows:
            seq = sequences[chunks[0]]
            runs.append((chunks + decode_rows, self.mixed_inputs(
                chunk_embeds[chunks[0]], seq.start, list(seq.block_ids),
                self._decode_embeds(rows), [row.start for row in rows], [list(row.block_ids) for row in rows])))
        else:
            runs += [([i], self.prefill_inputs(chunk_embeds[i], sequences[i].start, list(sequences[i].block_ids)))
                     for i in chunks]
            if rows:
                runs.append((decode_rows, self.decode_inputs(self._decode_embeds(rows), [seq.start for seq in rows],
                                                             [list(seq.block_ids) for seq in rows])))
        logits: list[torch.Tensor | None] = [None] * len(sequences)
        for indexes, step in runs:
            out = self.forward(step)
            for j, i in enumerate(indexes):
                if sequences[i].wants_logits:
                    logits[i] = out[j]
        return logits

    def _decode_embeds(self, rows: list[SequenceInput]) -> torch.Tensor:
        embeds = self.embed_tokens(torch.tensor([seq.token_ids[0] for seq in rows]))  # embeddings here too
        for j, seq in enumerate(rows):
            if seq.image_features is not None:  # a one-token chunk that is an image position
                embeds[j] = seq.image_features[0].to(self.device, self.dtype)
        return embeds

    # -- embeddings ------------------------------------------------------------------------
    @torch.no_grad()
    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.lm.base_model.embedding(token_ids.to(self.device))

    @torch.no_grad()
    def embed_prompt(self, token_ids: torch.Tensor, image_features: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with image features written over the image placeholder positions."""
        embeds = self.embed_tokens(token_ids.unsqueeze(0))
        features = None if image_features is None else image_features.to(self.device, self.dtype).unsqueeze(0)
        return self.spec.merge(token_ids.unsqueeze(0).to(self.device), embeds, features, self.image_token_id)[0]

    # -- padded inputs ---------------------------------------------------------------------
    def prefill_inputs(self, embeds: torch.Tensor, start: int, block_table: list[int], min_ctx: int = 1,
                       q_len: int = 0) -> StepInputs:
        """One sequence's new tokens ``embeds`` [n, hidden] starting at position ``start``, padded to
        ``q_len`` tokens (0: the next multiple of ``prefill_align``)."""
        n = embeds.shape[0]
        if n > self.prefill_chunk:
            raise ValueError(f"prefill of {n} tokens exceeds prefill_chunk {self.prefill_chunk}")
        q_len = max(n, q_len) if q_len else -(-n // self.prefill_align) * self.prefill_align
        padded = torch.zeros(1, q_len, self.hidden_size, dtype=self.dtype, device=self.device)
        padded[0, :n] = embeds
        positions = torch.arange(start, start + q_len, device=self.device).unsqueeze(0)
        ctx = self._ctx_blocks(max(min_ctx, -(-(start + q_len) // self.block_size)))
        bt = torch.full((1, ctx), NULL_BLOCK, dtype=torch.long, device=self.device)
        table = torch.tensor(block_table[:ctx], dtype=torch.long, device=self.device)
        bt[0, : len(table)] = table
        slots = torch.full((1, q_len), NULL_BLOCK * self.block_size, dtype=torch.long, device=self.device)
        real = positions[0, :n]
        slots[0, :n] = bt[0, real // self.block_size] * self.block_size + real % self.block_size
        return StepInputs(padded, positions, slots, bt, torch.tensor([n - 1], device=self.device))

    def decode_inputs(self, embeds: torch.Tensor, positions: list[int], block_tables: list[list[int]],
                      rows: int = 0, min_ctx: int = 1) -> StepInputs:
        """One new token per sequence at ``positions``; the batch is padded to a configured size
        (or to ``rows``)."""
        n = len(positions)
        batch = next((b for b in self.decode_batch_sizes if b >= n), None)
        if batch is None:
            raise ValueError(f"decode batch {n} exceeds the largest configured size {self.decode_batch_sizes[-1]}")
        batch = max(n, rows) if rows else batch
        bs = self.block_size
        ctx = self._ctx_blocks(max(min_ctx, max(p // bs + 1 for p in positions)))
        # built as Python lists, one tensor each: per-row tensor ops cost more than the rows' data
        # (padding rows and blocks point at the null block)
        tables = [table[:ctx] + [NULL_BLOCK] * max(0, ctx - len(table)) for table in block_tables]
        slots = [table[p // bs] * bs + p % bs for table, p in zip(tables, positions)]
        pad = batch - n
        padded = torch.zeros(batch, 1, self.hidden_size, dtype=self.dtype, device=self.device)
        padded[:n, 0] = embeds
        return StepInputs(
            padded,
            torch.tensor([[p] for p in positions] + [[0]] * pad, dtype=torch.long, device=self.device),
            torch.tensor([[s] for s in slots] + [[NULL_BLOCK * bs]] * pad, dtype=torch.long, device=self.device),
            torch.tensor(tables + [[NULL_BLOCK] * ctx] * pad, dtype=torch.long, device=self.device),
            torch.zeros(batch, dtype=torch.long, device=self.device),
        )

    def mixed_inputs(self, chunk_embeds: torch.Tensor, start: int, block_table: list[int],
                     row_embeds: torch.Tensor, positions: list[int], block_tables: list[list[int]]) -> StepInputs:
        """A prompt chunk and decode rows as one row of tokens (the chunk's, then one per decode row;
        2 blocks of context each, and where compiled 2 rows at least: see the module doc). The
        chunk's padding brings the whole row to a multiple of ``prefill_align`` tokens, no more: a
        CPU matmul reads its weight once per block of 16 rows (scheduler.mixed_prompt_tokens), so
        13 prompt tokens and 3 decode rows are one block where a chunk padded to 16 and rows padded
        to a decode batch of 4 would be two. Eager takes the rows there are: 15 prompt tokens and
        1 row stay one block."""
        num_rows = max(2, len(positions)) if self.compiles_mixed_steps else len(positions)
        align = self.prefill_align
        total = -(-(chunk_embeds.shape[0] + num_rows) // align) * align
        chunk = self.prefill_inputs(chunk_embeds, start, block_table, min_ctx=2, q_len=total - num_rows)
        rows = self.decode_inputs(row_embeds, positions, block_tables, rows=num_rows, min_ctx=2)
        q_len, batch = chunk.embeds.shape[1], rows.embeds.shape[0]
        return StepInputs(
            torch.cat([chunk.embeds, rows.embeds.transpose(0, 1)], dim=1),
            torch.cat([chunk.positions, rows.positions.T], dim=1),
            torch.cat([chunk.slots, rows.slots.T], dim=1),
            chunk.block_table,
            torch.cat([chunk.last_index, torch.arange(q_len, q_len + batch, device=self.device)]),
            decode_block_table=rows.block_table,
        )

    def mixed_example(self) -> StepInputs:
        """Mixed inputs for warmup that touch only the null block (2 decode rows: every size >= 2)."""
        chunk_ctx, row_ctx = 2, self.context_buckets[-1]
        zeros = lambda n: torch.zeros(n, self.hidden_size, dtype=self.dtype)  # noqa: E731
        return self.mixed_inputs(zeros(self.block_size), 0, [NULL_BLOCK] * chunk_ctx,
                                 zeros(2), [(row_ctx - 1) * self.block_size] * 2, [[NULL_BLOCK] * row_ctx] * 2)

    def dummy_inputs(self, batch: int, q_len: int, ctx: int) -> StepInputs:
        """Inputs of a given shape that only touch the null block (for warmup)."""
        z = lambda *shape: torch.zeros(*shape, dtype=torch.long, device=self.device)  # noqa: E731
        return StepInputs(torch.zeros(batch, q_len, self.hidden_size, dtype=self.dtype, device=self.device),
                          z(batch, q_len), z(batch, q_len), z(batch, ctx), z(batch))

    # -- forward ---------------------------------------------------------------------------
    def _mask(self, positions: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
        """[batch, 1, q_len, ctx]: causal by absolute position; also hides the never-written tail
        of the last block."""
        kv_pos = torch.arange(block_table.shape[1] * self.block_size, device=positions.device)
        return kv_pos.view(1, 1, 1, -1) <= positions.unsqueeze(1).unsqueeze(-1)

    def _forward_impl(self, embeds, positions, slots, block_table, last_index, decode_block_table=None):
        if decode_block_table is None:
            attn = {"mask": self._mask(positions, block_table)}
        else:  # a mixed step: the row's last tokens are the decode rows'
            chunk = embeds.shape[1] - decode_block_table.shape[0]
            attn = {"mask": self._mask(positions[:, :chunk], block_table), "decode_block_table": decode_block_table,
                    "decode_mask": self._mask(positions[0, chunk:].unsqueeze(1), decode_block_table)}
        hidden, _ = self.lm.base_model(
            embeds, position_ids=positions, past_key_value_states=self.kv_pool.layers, use_cache=True,
            attn_name=self.attn_name, slot_mapping=slots, block_table=block_table, **attn,
        )
        # a row per sequence; a mixed step's one row broadcasts against its 1 + rows indexes
        last = hidden[torch.arange(hidden.shape[0], device=embeds.device), last_index]
        return (self.lm.head(last) / self.logits_scaling).float()

    @torch.no_grad()
    def forward(self, step: StepInputs) -> torch.Tensor:
        """Float32 logits [batch, vocab] at each row's ``last_index`` (Granite-scaled)."""
        tensors = step.tensors()
        if not (self.plan.compiles_all_steps or self._compiled_decode_step(step)):
            return self._forward_impl(*tensors)
        if step.shape not in self.shapes_run:  # its first run compiles (warmup): later runs reuse the graph
            self.shapes_run.add(step.shape)
            self.plan.mark_bucket_dims(*[(t, 0) for t in tensors], *[(t, 1) for t in tensors if t.dim() > 1])
        return self._forward(*tensors)

    @staticmethod
    def _compiled_decode_step(step: StepInputs) -> bool:
        """Where only decode steps are compiled (DevicePlan.compiles_all_steps): a decode step past
        its first KV block. The first block's contexts (at most one block of tokens) are rare at
        the sizes that compile only decode, and would cost two graphs more (size-1 dims specialize)."""
        return step.decode_block_table is None and step.embeds.shape[1] == 1 and step.block_table.shape[1] > 1
