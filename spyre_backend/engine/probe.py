"""What the outside may know of the engine's parts: read-only views for the load log, the tests and
the bench, and timings of single model steps for the bench's roofline (run them only while the
engine is idle: they use the model and the KV pool on the calling thread).
"""

from __future__ import annotations

import time

import torch

from spyre_backend.engine.core import EngineCore


def best_time(fn, repeats: int) -> float:
    """The fastest of ``repeats`` runs of ``fn``, after one run that is not timed (the first run of
    a shape may compile, or touch memory for the first time)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


class EngineProbe:
    def __init__(self, core: EngineCore):
        self._core = core
        self._runner = core.runner
        self._kv = core.kv

    # -- KV cache and sessions -------------------------------------------------------------------
    @property
    def free_blocks(self) -> int:
        return self._kv.num_free

    @property
    def usable_blocks(self) -> int:
        return self._kv.num_usable

    @property
    def cached_blocks(self) -> int:
        return self._kv.num_cached

    @property
    def segment_size(self) -> int:
        return self._kv.segment_size

    def blocks_for(self, num_tokens: int) -> int:
        return self._kv.blocks_for(num_tokens)

    @property
    def num_sessions(self) -> int:
        return len(self._core.turns)

    def has_session(self, sequence_id) -> bool:
        return self._core.turns.get(sequence_id) is not None

    @property
    def mixed_chunk(self) -> int:
        """Most prompt tokens in a step that carries decode rows (0: no limit)."""
        return self._core.scheduler.mixed_chunk

    # -- structured output -------------------------------------------------------------------------
    @property
    def num_grammar_matchers(self) -> int:
        """Matchers held by requests (0 when none has run with a grammar)."""
        structured = self._core._structured
        return 0 if structured is None else structured.num_matchers

    @property
    def num_grammar_compiles(self) -> int:
        """Grammars compiled since start (the cache's misses)."""
        structured = self._core._structured
        return 0 if structured is None else structured.num_compiles

    # -- the model runner --------------------------------------------------------------------------
    @property
    def plan(self):
        return self._runner.plan

    @property
    def image_token_id(self) -> int:
        return self._runner.image_token_id

    @property
    def hidden_size(self) -> int:
        return self._runner.hidden_size

    @property
    def weight_bytes(self) -> int:
        return self._runner.weight_bytes

    @property
    def kv_pool_bytes(self) -> int:
        return self._runner.kv_pool.nbytes

    @property
    def num_kv_blocks(self) -> int:
        return self._runner.kv_pool.num_blocks

    @property
    def prefill_align(self) -> int:
        return self._runner.prefill_align

    @property
    def decode_batch_sizes(self) -> list[int]:
        return list(self._runner.decode_batch_sizes)

    @property
    def mixes_steps(self) -> bool:
        return self._runner.mixes_steps

    @property
    def attn_name(self) -> str:
        return self._runner.attn_name

    @property
    def layers_prepared(self) -> int:
        return self._runner.layers_prepared

    def shape_set(self) -> list[tuple[int, int, int]]:
        return self._runner.shape_set()

    def warmup_shapes(self) -> list[tuple[int, int, int]]:
        return self._runner.warmup_shapes()

    @property
    def mixed_warmup_shape(self) -> tuple[int, ...] | None:
        """The shape of the mixed step warmup runs (None where steps do not mix)."""
        return self._runner.mixed_example().shape if self._runner.mixes_steps else None

    @property
    def shapes_run(self) -> set[tuple[int, ...]]:
        return set(self._runner.shapes_run)

    # -- timings of single steps (engine idle) -------------------------------------------------------
    def time_prefill(self, num_tokens: int, repeats: int = 2) -> float:
        """A whole prompt of ``num_tokens`` in prefill_chunk pieces, as the engine runs it."""
        runner, kv = self._runner, self._kv
        kv.allocate("probe", num_tokens)
        table = list(kv.block_ids("probe"))
        embeds = torch.randn(num_tokens, runner.hidden_size, dtype=runner.dtype) * 0.02

        def prefill():
            for start in range(0, num_tokens, runner.prefill_chunk):
                chunk = embeds[start: start + runner.prefill_chunk]
                logits = runner.forward(runner.prefill_inputs(chunk, start=start, block_table=table))
            logits.cpu()  # waits for an asynchronous device (CUDA)

        try:
            return best_time(prefill, repeats)
        finally:
            kv.free("probe")

    def time_decode(self, batch: int, context: int, repeats: int = 3) -> float:
        """One decode step of ``batch`` sequences at position ``context``."""
        runner, kv = self._runner, self._kv
        owners = [("probe", i) for i in range(batch)]
        for owner in owners:
            kv.allocate(owner, context + 1)
        tables = [list(kv.block_ids(owner)) for owner in owners]
        embeds = torch.randn(batch, runner.hidden_size, dtype=runner.dtype) * 0.02
        step = runner.decode_inputs(embeds, [context] * batch, tables)
        try:
            return best_time(lambda: runner.forward(step).cpu(), repeats)  # .cpu(): waits for CUDA
        finally:
            for owner in owners:
                kv.free(owner)
