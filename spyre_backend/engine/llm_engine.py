"""The engine's public face: any thread hands requests over (``add_request`` / ``stop_sequence``)
and returns; one engine thread drains the inbox and runs the ``EngineCore``'s steps, so nothing the
core owns needs locking.

Outside ``engine/`` nobody reaches the parts (runner, KV cache, turns, scheduler): the service
uses ``warmup()``, ``seal()``, ``stats()`` and ``room_for()``; the bench, the load log and the
tests read ``probe`` (``engine/probe.py``).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

from spyre_backend.config import EngineLimits, SchedulerConfig, ServingConfig
from spyre_backend.device import plan_for
from spyre_backend.engine.core import EngineCore
from spyre_backend.engine.model_runner import ModelRunner
from spyre_backend.engine.probe import EngineProbe
from spyre_backend.engine.request import Request
from spyre_backend.engine.scheduler import choose_mixed_chunk
from spyre_backend.errors import InvalidRequest

log = logging.getLogger(__name__)
_WAKE = object()  # an inbox item that only wakes the engine thread (a grammar finished compiling)


@dataclass
class StopSequence:
    """Control message: stop the running turn of a sequence (Triton 2.51 ensembles do not forward
    client cancellation, so a request carrying ``stop`` on the same sequence id does it)."""

    sequence_id: int | str
    end: bool
    reply: Callable[[str | None], None]  # None: stopped; otherwise the error text


@dataclass
class EngineStats:
    free_blocks: int
    total_blocks: int
    running: int
    waiting: int
    sessions: int
    preemptions: int = 0  # since start
    prefix_queries: int = 0  # tokens looked up in the prefix cache, since start
    prefix_hits: int = 0  # of those, tokens found cached
    cached_blocks: int = 0  # blocks registered in the prefix cache (held or free)


class LLMEngine:
    @classmethod
    def from_config(cls, checkpoint: str, config: ServingConfig, spec, tokenizer,
                    on_step: Callable[[EngineStats], None] | None = None) -> "LLMEngine":
        """Load the model and size the KV pool as ``config`` says (the pool from the memory left
        after the weights, where it says so)."""
        cache, scheduler = config.cache, config.scheduler
        runner = ModelRunner(
            checkpoint, plan=plan_for(config.device, checkpoint), spec=spec,
            num_kv_blocks=lambda per_token, available: cache.kv_blocks(per_token, scheduler.max_running, available),
            block_size=cache.block_size, max_context=cache.max_context, prefill_chunk=scheduler.prefill_chunk,
            decode_batch_sizes=cache.decode_batch_sizes, prefill_align=cache.prefill_align,
        )
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        return cls(runner, tokenizer, eos_token_ids=eos, scheduler=scheduler, limits=config.engine,
                   enable_prefix_caching=cache.enable_prefix_caching, on_step=on_step)

    def __init__(self, runner: ModelRunner, tokenizer, *, eos_token_ids: list[int],
                 scheduler: SchedulerConfig | None = None, limits: EngineLimits | None = None,
                 enable_prefix_caching: bool = True, on_step: Callable[[EngineStats], None] | None = None):
        self.limits = limits or EngineLimits()
        self._core = EngineCore(runner, tokenizer, eos_token_ids=eos_token_ids,
                                scheduler=scheduler or SchedulerConfig(), limits=self.limits,
                                enable_prefix_caching=enable_prefix_caching)
        self._runner = runner
        self.probe = EngineProbe(self._core)
        self.on_step = on_step
        self._inbox: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._one_off_ids = itertools.count()
        self._last_stats: EngineStats | None = None

    # -- public API (any thread) ----------------------------------------------------------
    def validate(self, request: Request) -> None:
        """Refuse at once what could never run (raises InvalidRequest)."""
        runner = self._runner
        limit = runner.max_context
        if request.num_prompt_tokens == 0:
            raise InvalidRequest("the prompt is empty")
        if request.num_prompt_tokens + request.params.max_tokens > limit:
            raise InvalidRequest(
                f"prompt ({request.num_prompt_tokens} tokens) + max_tokens ({request.params.max_tokens}) "
                f"exceeds the maximum context length {limit}")
        problem = self._core.fits_pool(request.num_prompt_tokens + request.params.max_tokens)
        if problem:
            raise InvalidRequest(problem)
        # every image placeholder gets exactly one feature row: checked here, never inside a step
        placeholders = int((request.prompt_ids == runner.image_token_id).sum())
        features = 0 if request.image_features is None else int(request.image_features.shape[0])
        if placeholders != features:
            raise InvalidRequest(f"the prompt has {placeholders} image placeholder tokens but {features} image "
                                 f"features were given (one per placeholder)")
        if features and request.image_features.shape[-1] != runner.hidden_size:
            raise InvalidRequest(f"image features are {request.image_features.shape[-1]} wide; the LLM takes "
                                 f"{runner.hidden_size}")

    def room_for(self, num_prompt_tokens: int) -> int:
        """How many tokens a one-off request with this prompt could generate (context and pool)."""
        kv = self._core.kv
        return min(self._runner.max_context, kv.num_usable * kv.block_size) - num_prompt_tokens

    def add_request(self, request: Request) -> None:
        self.validate(request)
        request.deadline = request.arrival + self.limits.max_request_s
        if request.sequence_id is None:  # a one-off sequence of its own
            request.sequence_id = ("one-off", next(self._one_off_ids))
            request.sequence_start = request.sequence_end = True
        if request.params.structured is not None:  # compiled off the engine thread; the request waits for it
            request.grammar = self._core.structured.compile(request.params.structured)
            request.grammar.add_done_callback(lambda _done: self._inbox.put(_WAKE))
        self._inbox.put(request)

    def stop_sequence(self, sequence_id, end: bool, reply: Callable[[str | None], None]) -> None:
        self._inbox.put(StopSequence(sequence_id, end, reply))

    def warmup(self) -> None:
        """Run every shape that will be compiled (nothing for eager), then size the mixed chunk
        where the config leaves it to measurement; on the calling thread, only before any request
        was added."""
        self._runner.warmup()
        scheduler = self._core.scheduler
        if scheduler.config.mixed_prefill_chunk == -1 and self._runner.mixes_steps:
            probe = self.probe
            decode_s = probe.time_decode(1, scheduler.config.prefill_chunk, repeats=2)
            scheduler.mixed_chunk = choose_mixed_chunk(
                lambda tokens: probe.time_prefill(tokens, repeats=1), decode_s, scheduler.config.mixed_step_slowdown,
                self._runner.prefill_align, self._core.kv.block_size, scheduler.config.prefill_chunk)

    def seal(self, sealed: bool = True) -> None:
        """After warmup, in a process that serves only this model: nothing may compile from here
        (``DevicePlan.seal_compiled``)."""
        self._runner.plan.seal_compiled(sealed)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="llm-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._inbox.put(None)
        if self._thread:
            self._thread.join(timeout=30)
        self._core.close()

    def stats(self) -> EngineStats:
        core = self._core
        s, kv = core.scheduler, core.kv
        return EngineStats(kv.num_free, kv.num_usable, len(s.running), len(s.waiting), len(core.turns),
                           s.num_preemptions, s.prefix_queries, s.prefix_hits, kv.num_cached)

    # -- engine thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping:
            timeout = None if self._core.scheduler.has_work else 1.0
            wait = self._core.compile_wait(time.monotonic())
            if timeout and wait is not None:  # wake in time to refuse a compile past its limit
                timeout = min(timeout, wait + 0.001)
            self._drain_inbox(timeout=timeout)
            try:
                self._core.step()
            except Exception:  # the model step itself failed (per-request failures end that request
                log.exception("engine step failed")  # alone, in step()): fail the batch, keep serving
                self._core.fail_running()
            self._report_stats()

    def _drain_inbox(self, timeout: float | None) -> None:
        try:
            item = self._inbox.get(timeout=timeout) if timeout else self._inbox.get_nowait()
            while True:
                if isinstance(item, Request):
                    self._core.add(item)
                elif isinstance(item, StopSequence):
                    item.reply(self._core.stop(item.sequence_id, item.end))
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _report_stats(self) -> None:
        if self.on_step is None:
            return
        stats = self.stats()
        if stats != self._last_stats:
            self._last_stats = stats
            self.on_step(stats)
