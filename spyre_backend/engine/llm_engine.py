"""The engine thread: glue between the scheduler, the model runner and the output processor.

Triton's ``execute()`` only hands requests over (``add_request`` / ``stop_sequence``) and returns;
a single engine thread owns the model runner, the KV cache bookkeeping, the sessions and the
scheduler, so none of them needs locking. Everything reaches the thread through its inbox.

Each step: the ``Scheduler`` says which tokens of which sequences to compute (plain data), the
engine looks up those tokens (and the image features of placeholder positions) in the sessions,
the ``ModelRunner`` computes them into the KV cache and returns logits, the sampler picks tokens
and the ``OutputProcessor`` turns them into text and finish decisions.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

from spyre_backend.config import EngineLimits, SchedulerConfig
from spyre_backend.engine.kv_cache_manager import KVCacheManager
from spyre_backend.engine.model_runner import ModelRunner, SequenceInput
from spyre_backend.engine.output_processor import Finished, OutputProcessor
from spyre_backend.engine.prefix_cache import SegmentHasher
from spyre_backend.engine.request import FinishReason, Request
from spyre_backend.engine.sampler import SampleRow, make_generator, sample
from spyre_backend.engine.scheduler import Scheduler
from spyre_backend.engine.sessions import SessionTable
from spyre_backend.errors import SESSION_LOST, InvalidRequest

log = logging.getLogger(__name__)


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
    def __init__(self, runner: ModelRunner, tokenizer, *, eos_token_ids: list[int],
                 scheduler: SchedulerConfig | None = None, limits: EngineLimits | None = None,
                 enable_prefix_caching: bool = True, on_step: Callable[[EngineStats], None] | None = None):
        self.runner = runner
        self.tokenizer = tokenizer
        self.limits = limits or EngineLimits()
        self.image_token_id = runner.image_token_id
        # the prefix cache's unit is the prefill's padding unit: a hit saves what a prefill would pad to
        self.kv = KVCacheManager(runner.kv_pool.num_blocks, runner.block_size, runner.prefill_align)
        self.sessions = SessionTable(self.kv, ttl_s=self.limits.session_ttl_s)
        hasher = SegmentHasher(runner.prefill_align, runner.image_token_id) if enable_prefix_caching else None
        self.scheduler = Scheduler(self.kv, self.sessions, scheduler or SchedulerConfig(), hasher)
        self.output = OutputProcessor(tokenizer, eos_token_ids)
        self.on_step = on_step
        self._inbox: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._one_off_ids = itertools.count()
        self._last_stats: EngineStats | None = None
        self._queued: dict = {}  # sequence id -> deque of turns waiting for the running one

    # -- public API (any thread) ----------------------------------------------------------
    def validate(self, request: Request) -> None:
        """Refuse at once what could never run (raises InvalidRequest)."""
        limit = self.runner.max_context
        if request.num_prompt_tokens == 0:
            raise InvalidRequest("the prompt is empty")
        if request.num_prompt_tokens + request.params.max_tokens > limit:
            raise InvalidRequest(
                f"prompt ({request.num_prompt_tokens} tokens) + max_tokens ({request.params.max_tokens}) "
                f"exceeds the maximum context length {limit}")
        self._check_fits_pool(request.num_prompt_tokens + request.params.max_tokens)
        # every image placeholder gets exactly one feature row: checked here, never inside a step
        placeholders = int((request.prompt_ids == self.image_token_id).sum())
        features = 0 if request.image_features is None else int(request.image_features.shape[0])
        if placeholders != features:
            raise InvalidRequest(f"the prompt has {placeholders} image placeholder tokens but {features} image "
                                 f"features were given (one per placeholder)")
        if features and request.image_features.shape[-1] != self.runner.hidden_size:
            raise InvalidRequest(f"image features are {request.image_features.shape[-1]} wide; the LLM takes "
                                 f"{self.runner.hidden_size}")

    def room_for(self, num_prompt_tokens: int) -> int:
        """How many tokens a one-off request with this prompt could generate (context and pool)."""
        usable_tokens = self.kv.num_usable * self.kv.block_size
        return min(self.runner.max_context, usable_tokens) - num_prompt_tokens

    def _check_fits_pool(self, num_tokens: int) -> None:
        """A sequence must fit the KV pool alone, or preempting the others would never make room."""
        need, usable = self.kv.blocks_for(num_tokens), self.kv.num_usable
        if need > usable:
            raise InvalidRequest(f"{num_tokens} tokens need {need} KV blocks of {self.kv.block_size}; the pool has "
                                 f"{usable} (raise num_kv_blocks or kv_memory_mb, or lower max_tokens)")

    def add_request(self, request: Request) -> None:
        self.validate(request)
        request.deadline = request.arrival + self.limits.max_request_s
        if request.sequence_id is None:  # a one-off sequence of its own
            request.sequence_id = ("one-off", next(self._one_off_ids))
            request.sequence_start = request.sequence_end = True
        self._inbox.put(request)

    def stop_sequence(self, sequence_id, end: bool, reply: Callable[[str | None], None]) -> None:
        self._inbox.put(StopSequence(sequence_id, end, reply))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="llm-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._inbox.put(None)
        if self._thread:
            self._thread.join(timeout=30)

    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(self.kv.num_free, self.kv.num_usable, len(s.running), len(s.waiting), len(self.sessions),
                           s.num_preemptions, s.prefix_queries, s.prefix_hits, self.kv.num_cached)

    @property
    def num_free_blocks(self) -> int:
        return self.kv.num_free

    # -- engine thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping:
            idle = not self.scheduler.has_work
            self._drain_inbox(timeout=1.0 if idle else None)
            try:
                self.step()
            except Exception:  # the model step itself failed (per-request failures end that request
                log.exception("engine step failed")  # alone, in step()): fail the batch, keep serving
                self._fail_running()
            self._report_stats()

    def _fail_running(self) -> None:
        for request in list(self.scheduler.running):
            try:
                self._finish(request, Finished(FinishReason.ERROR), error="internal error in the engine step")
            except Exception:
                log.exception("failing request %s failed", request.request_id)
                self.scheduler.remove(request)
                if request.session is not None:
                    self.sessions.close(request.session)

    def _drain_inbox(self, timeout: float | None) -> None:
        try:
            item = self._inbox.get(timeout=timeout) if timeout else self._inbox.get_nowait()
            while True:
                if isinstance(item, Request):
                    self._accept_turn(item)
                elif isinstance(item, StopSequence):
                    self._stop_sequence(item)
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

    # -- sessions --------------------------------------------------------------------------
    def _accept_turn(self, request: Request) -> None:
        sid = request.sequence_id
        session = self.sessions.get(sid)
        if (session is not None and session.busy) or sid in self._queued:
            self._queued.setdefault(sid, deque()).append(request)  # turns of one sequence run in order
            return
        self._start_turn(request)

    def _start_turn(self, request: Request) -> bool:
        """Make ``request`` its session's running turn; False if it was refused instead."""
        sid = request.sequence_id
        if request.sequence_start:
            if (not request.sequence_end and self.sessions.get(sid) is None
                    and self.sessions.kept() >= self.limits.max_sessions and not self.sessions.evict_oldest_idle()):
                self._reject(request, f"{self.sessions.kept()} sessions are open, the limit "
                                      f"max_sessions={self.limits.max_sessions}; end one (END) and retry")
                return False
            session = self.sessions.open(sid)
        else:
            session = self.sessions.get(sid)
            if session is None:
                why = ("was evicted or expired" if sid in self.sessions.evicted
                       else "is not open on this server (it ended, or was lost in a restart)")
                self._reject(request, f"{SESSION_LOST} sequence {sid} {why}; resend the whole conversation "
                                      "with START (sequence_start)")
                return False
        history = len(session.token_ids)
        total = history + request.num_prompt_tokens + request.params.max_tokens
        problem = None
        if total > self.runner.max_context:
            problem = (f"the conversation ({history} tokens so far) + prompt ({request.num_prompt_tokens}) "
                       f"+ max_tokens ({request.params.max_tokens}) exceeds the maximum context length "
                       f"{self.runner.max_context}")
        else:
            try:
                self._check_fits_pool(total)
            except InvalidRequest as exc:
                problem = str(exc)
        if problem:
            self._reject(request, problem)
            if request.sequence_end:
                self.sessions.close(session)
            return False
        session.active = request
        session.token_ids.extend(request.prompt_ids.tolist())
        if request.image_features is not None:
            session.image_features.append(request.image_features)  # on the host, for recompute
            request.image_features = None
        request.session = session
        request.generator = make_generator(request.params)
        self.output.start(request)
        self.scheduler.add(request)
        return True

    def _end_turn(self, request: Request, completed: bool) -> None:
        session = request.session
        session.active = None
        session.last_active = time.monotonic()
        if not completed:
            # never prefilled: forget its prompt (and its images), the history stays as before the turn
            prompt = session.token_ids[len(session.token_ids) - request.num_prompt_tokens:]
            del session.token_ids[len(session.token_ids) - request.num_prompt_tokens:]
            images = prompt.count(self.image_token_id)
            if images:
                kept = session.features()
                session.image_features = [kept[: kept.shape[0] - images]] if kept.shape[0] > images else []
            # blocks past the kept history may be cached or shared now: drop them, never write them
            session.num_computed = self.kv.truncate(session.sequence_id,
                                                    min(session.num_computed, len(session.token_ids)))
            del session.segment_hashes[len(session.token_ids) // self.kv.segment_size:]
        self.scheduler.register_tail(session)  # before its blocks are freed: they stay cached
        if request.sequence_end:
            self.sessions.close(session)
        queue_ = self._queued.get(session.sequence_id)
        while queue_ and not self._start_turn(queue_.popleft()):
            pass
        if queue_ is not None and not queue_:
            del self._queued[session.sequence_id]

    def _stop_sequence(self, stop: StopSequence) -> None:
        session = self.sessions.get(stop.sequence_id)
        if session is None:
            stop.reply(f"sequence {stop.sequence_id} has no open session or running request")
            return
        for queued in self._queued.pop(stop.sequence_id, ()):
            self._reject(queued, "stopped by a stop request")
        if session.busy:
            session.active.stop_requested = True
            session.active.sequence_end |= stop.end
        elif stop.end:
            self.sessions.close(session)
        stop.reply(None)

    def _reject(self, request: Request, message: str) -> None:
        self.output.reject(request, message)

    # -- one step ----------------------------------------------------------------------------
    def step(self) -> None:
        """Glue: schedule, build the runner's inputs, run, sample, hand tokens to the output processor."""
        now = time.monotonic()
        self.sessions.expire(now)
        for request in [*self.scheduler.running, *self.scheduler.waiting]:
            if request.stop_requested or request.is_cancelled():
                self._finish(request, Finished(FinishReason.CANCELLED))
            elif now > request.deadline:
                self._finish(request, Finished(FinishReason.TIMEOUT))
        out = self.scheduler.schedule()
        if not out.sequences:
            return
        requests = {r.request_id: r for r in self.scheduler.running}
        scheduled, inputs = [], []
        for seq in out.sequences:  # a request whose inputs cannot be built fails alone
            request = requests[seq.request_id]
            try:
                inputs.append(self._sequence_input(request, seq))
                scheduled.append((request, seq))
            except Exception as exc:
                log.exception("request %s: building its step inputs failed", request.request_id)
                self._finish(request, Finished(FinishReason.ERROR), error=f"invalid request: {exc}")
        self.runner.copy_blocks(out.block_copies)  # before the step writes anything
        logits = self.runner.execute(inputs)
        self.scheduler.step_done(out)
        sampling = [(request, row) for (request, seq), row in zip(scheduled, logits) if seq.samples]
        if sampling:
            self._sample([r for r, _ in sampling], torch.stack([row for _, row in sampling]))

    def _sequence_input(self, request: Request, seq) -> SequenceInput:
        session = request.session
        token_ids = session.token_ids[seq.start: seq.start + seq.num_tokens]
        features = None
        if self.image_token_id in token_ids:
            # the features of the placeholders in this range: those of the history, in order
            before = session.token_ids[: seq.start].count(self.image_token_id)
            count = token_ids.count(self.image_token_id)
            all_features = session.features()
            if all_features is None or all_features.shape[0] < before + count:
                raise ValueError(f"the sequence has more image placeholders than image features "
                                 f"({0 if all_features is None else all_features.shape[0]})")
            features = all_features[before: before + count]
        return SequenceInput(token_ids, seq.start, seq.block_ids, features, wants_logits=seq.samples)

    def _sample(self, requests: list[Request], logits: torch.Tensor) -> None:
        rows = [SampleRow(r.params, r.generator, r.prompt_ids, r.output_ids, self.output.banned_tokens(r))
                for r in requests]
        # never the image placeholder: the engine finds images by that token id, so a sampled one
        # would be taken for an image without features (a text token for transformers)
        results = sample(logits, rows, never=[self.image_token_id])
        now = time.monotonic()  # one clock read per step: every row's token is ready now
        for request, result in zip(requests, results):
            try:
                request.session.token_ids.append(result.token)
                finished = self.output.on_token(request, result, now)
            except Exception as exc:  # one request's output failing ends that request alone
                log.exception("request %s: processing its output failed", request.request_id)
                self._finish(request, Finished(FinishReason.ERROR), error=f"internal error: {exc}")
                continue
            if finished is not None:
                self._finish(request, finished)

    def _finish(self, request: Request, finished: Finished, error: str | None = None) -> None:
        """Release what ``request`` holds (scheduler slot, session turn), then send its last output."""
        self.scheduler.remove(request)
        if request.session is not None:
            started = request.num_prefill_tokens > 0  # some of this turn was computed
            completed = request.sampled_any or started
            if finished.reason in (FinishReason.ERROR, FinishReason.TIMEOUT) or (started and not request.sampled_any):
                # failed, or stopped half-way through its prompt: the session cannot continue
                request.sequence_end = True
            self._end_turn(request, completed=completed)
        try:
            self.output.finish(request, finished, error)
        except Exception:
            log.exception("sending the final response of request %s failed", request.request_id)
