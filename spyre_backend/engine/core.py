"""The engine core: one step is ``schedule -> runner.execute -> scheduler.update_from_output``, as in
vLLM v1, then the output processor turns the sampled tokens into text and finish decisions.

It runs on the engine thread only (``LLMEngine`` owns the thread and the inbox), so nothing it
owns needs locking: the model runner, the KV cache bookkeeping, the turns (sessions) and the
scheduler. Each piece of state has one writer: ``Turns`` the sessions, the ``Scheduler`` its
queues and the requests' scheduling counters, the ``KVCacheManager`` the blocks, the
``OutputProcessor`` each request's stream. The core only decides when a turn starts and ends,
and holds a request with a grammar until it has compiled; each sampled step it gives the sampler
the grammar's token bitmask and hands the sampled token to the matcher (``StructuredOutputs``).
"""

from __future__ import annotations

import logging
import threading
import time

from spyre_backend.config import EngineLimits, SchedulerConfig
from spyre_backend.engine.kv_cache_manager import KVCacheManager
from spyre_backend.engine.model_runner import ModelRunner, SequenceInput
from spyre_backend.engine.output_processor import Finished, OutputProcessor
from spyre_backend.engine.prefix_cache import SegmentHasher
from spyre_backend.engine.request import Request
from spyre_backend.engine.sampler import SampleRow
from spyre_backend.engine.scheduler import ScheduledSequence, Scheduler
from spyre_backend.engine.structured_output import GrammarError, StructuredOutputs
from spyre_backend.engine.turns import Turns
from spyre_backend.errors import InvalidRequest
from spyre_backend.protocol import FinishReason

log = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, runner: ModelRunner, tokenizer, *, eos_token_ids: list[int], scheduler: SchedulerConfig,
                 limits: EngineLimits, enable_prefix_caching: bool):
        self.runner = runner
        self.limits = limits
        # the prefix cache's unit is the prefill's padding unit: a hit saves what a prefill would pad to
        self.kv = KVCacheManager(runner.kv_pool.num_blocks, runner.block_size, runner.prefill_align)
        hasher = SegmentHasher(runner.prefill_align, runner.image_token_id) if enable_prefix_caching else None
        self.turns = Turns(self.kv, image_token_id=runner.image_token_id, ttl_s=limits.session_ttl_s,
                           max_sessions=limits.max_sessions, max_context=runner.max_context, hasher=hasher)
        self.scheduler = Scheduler(self.kv, self.turns, scheduler)
        self.output = OutputProcessor(tokenizer, eos_token_ids)
        self._tokenizer = tokenizer
        self._structured: StructuredOutputs | None = None  # made at the first request with a grammar
        self._structured_lock = threading.Lock()
        self.compiling: list[Request] = []  # requests waiting for their grammar, in arrival order

    @property
    def structured(self) -> StructuredOutputs:
        """The grammars and matchers (any thread may compile: LLMEngine.add_request). The engine
        thread's per-row calls read ``_structured`` without the lock: a request with a grammar
        was compiled through this property, so it exists."""
        with self._structured_lock:
            if self._structured is None:
                self._structured = StructuredOutputs(self._tokenizer, self.runner.spec.text.vocab_size, self.limits)
            return self._structured

    def fits_pool(self, num_tokens: int) -> str | None:
        """Why a sequence of ``num_tokens`` can never run (it must fit the KV pool alone, or
        preempting the others would never make room); None if it can."""
        need, usable = self.kv.blocks_for(num_tokens), self.kv.num_usable
        if need > usable:
            return (f"{num_tokens} tokens need {need} KV blocks of {self.kv.block_size}; the pool has "
                    f"{usable} (raise num_kv_blocks or kv_memory_mb, or lower max_tokens)")
        return None

    def close(self) -> None:
        """The engine stopped: no more compiles."""
        if self._structured is not None:
            self._structured.shutdown()

    # -- turns -----------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        """A request from the inbox: it starts now or waits behind its sequence's running turn
        (a request with a grammar waits for its compile first: ``admit_compiled``)."""
        if request.grammar is not None and not request.grammar.done():
            self.compiling.append(request)
            return
        if request.grammar is not None and request.grammar.exception() is not None:
            self.output.reject(request, str(request.grammar.exception()))
            return
        if self.turns.arrive(request):
            self._start_turn(request)

    def compile_wait(self, now: float) -> float | None:
        """Seconds until the first waiting compile runs past its limit (None: nothing compiles)."""
        if not self.compiling:
            return None
        first = min(request.arrival for request in self.compiling)
        return max(0.0, first + self.limits.grammar_compile_timeout_s - now)

    def admit_compiled(self, now: float) -> None:
        """Requests whose grammar is ready go on; those cancelled or past the compile limit end."""
        waiting, self.compiling = self.compiling, []
        timeout = self.limits.grammar_compile_timeout_s
        for request in waiting:
            if request.grammar.done():
                self.add(request)
            elif request.is_cancelled():
                self.output.emit(request, "", True, FinishReason.CANCELLED)
            elif now > request.arrival + timeout:
                self.output.reject(request, f"the structured output's grammar did not compile within "
                                            f"grammar_compile_timeout_s={timeout:g} s")
            else:
                self.compiling.append(request)

    def stop(self, sequence_id, end: bool) -> str | None:
        """Stop the running turn of ``sequence_id`` (at the next step); the error, else None."""
        error, dropped = self.turns.stop(sequence_id, end)
        for queued in dropped:
            self.output.reject(queued, "stopped by a stop request")
        return error

    def _start_turn(self, request: Request) -> bool:
        """Start ``request``'s turn (the scheduler queues it); False if it was refused instead."""
        error = self.turns.start(request, self.fits_pool)
        if error is not None:
            self.output.reject(request, error)
            return False
        self.output.start(request)
        self.scheduler.add(request)
        return True

    def _finish(self, request: Request, finished: Finished, error: str | None = None) -> None:
        """Release what ``request`` holds (scheduler slot, session turn), send its last output, then
        start the next turn queued on its sequence."""
        self.scheduler.remove(request)
        if request.grammar is not None:
            self._structured.release(request.request_id)
        if request.session is not None:
            started = request.num_prefill_tokens > 0  # some of this turn was computed
            # failed, or stopped half-way through its prompt: the session cannot continue
            broken = finished.reason in (FinishReason.ERROR, FinishReason.TIMEOUT) or (started and not request.sampled_any)
            self.turns.end(request, completed=request.sampled_any or started, broken=broken)
        try:
            self.output.finish(request, finished, error)
        except Exception:
            log.exception("sending the final response of request %s failed", request.request_id)
        queued = self.turns.next_queued(request.sequence_id)
        while queued is not None and not self._start_turn(queued):
            queued = self.turns.next_queued(request.sequence_id)

    def fail_running(self) -> None:
        """The model step itself failed: end every running request with an error."""
        for request in list(self.scheduler.running):
            try:
                self._finish(request, Finished(FinishReason.ERROR), error="internal error in the engine step")
            except Exception:
                log.exception("failing request %s failed", request.request_id)
                self.scheduler.remove(request)
                if request.session is not None:
                    self.turns.close(request.session)

    # -- one step ----------------------------------------------------------------------------
    def step(self) -> None:
        now = time.monotonic()
        self.turns.expire(now)
        if self.compiling:
            self.admit_compiled(now)
        for request in self.scheduler.requests():
            if request.session.stop_requested or request.is_cancelled():
                self._finish(request, Finished(FinishReason.CANCELLED))
            elif now > request.deadline:
                self._finish(request, Finished(FinishReason.TIMEOUT))
        out = self.scheduler.schedule()
        if not out.sequences:
            return
        requests = {r.request_id: r for r in self.scheduler.running}
        inputs = []
        for seq in out.sequences:  # a request whose inputs cannot be built fails alone
            request = requests[seq.request_id]
            try:
                inputs.append(self._sequence_input(request, seq))
            except Exception as exc:
                log.exception("request %s: building its step inputs failed", request.request_id)
                self._finish(request, Finished(FinishReason.ERROR), error=f"invalid request: {exc}")
        constrained = [i for i in inputs if i.sampling is not None and i.sampling.allowed is not None]
        if constrained:  # filled while the model runs; the sampler waits for them
            ready = self._structured.fill([i.request_id for i in constrained])
            for i in constrained:
                i.sampling.allowed_ready = ready
        result = self.runner.execute(inputs, out.block_copies)
        sampled = self.scheduler.update_from_output(out, result.sampled)
        now = time.monotonic()  # one clock read per step: every row's token is ready now
        for request, sample in sampled:
            try:
                ended = request.grammar is not None and self._advance_grammar(request, sample.token)
                finished = self.output.on_token(request, sample, now)
                if finished is None and ended:  # its grammar took its stop token (ignore_eos too)
                    finished = Finished(FinishReason.STOP)
            except Exception as exc:  # one request's output failing ends that request alone
                log.exception("request %s: processing its output failed", request.request_id)
                self._finish(request, Finished(FinishReason.ERROR), error=f"internal error: {exc}")
                continue
            if finished is not None:
                self._finish(request, finished)

    def _advance_grammar(self, request: Request, token: int) -> bool:
        """The request's matcher takes its sampled token; True when the grammar has ended."""
        structured = self._structured
        if not structured.accept(request.request_id, token):
            raise GrammarError(f"the grammar refused the sampled token {token}")  # the mask rules it out
        return structured.ended(request.request_id)

    def _sequence_input(self, request: Request, seq: ScheduledSequence) -> SequenceInput:
        session = request.session
        image_token_id = self.runner.image_token_id
        token_ids = session.token_ids[seq.start: seq.start + seq.num_tokens]
        features = None
        if image_token_id in token_ids:
            # the features of the placeholders in this range: those of the history, in order
            before = session.token_ids[: seq.start].count(image_token_id)
            count = token_ids.count(image_token_id)
            all_features = session.features()
            if all_features is None or all_features.shape[0] < before + count:
                raise InvalidRequest(f"the sequence has more image placeholders than image features "
                                     f"({0 if all_features is None else all_features.shape[0]})")
            features = all_features[before: before + count]
        sampling = None
        if seq.samples:
            allowed = None if request.grammar is None else self._structured.bitmask(request.request_id,
                                                                                   request.grammar.result())
            sampling = SampleRow(request.params, request.generator, request.prompt_ids, request.output_ids,
                                 self.output.banned_tokens(request), allowed)
        return SequenceInput(request.request_id, token_ids, seq.start, seq.block_ids, features, sampling)
