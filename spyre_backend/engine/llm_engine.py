"""The engine loop: sessions, admission, chunked prefill and batched decode, streamed outputs.

Triton's ``execute()`` only hands requests over (``add_request`` / ``stop_sequence``) and returns;
a single engine thread owns the model, the KV cache, the sessions and the scheduler, so none of
them needs locking. Everything reaches the thread through its inbox.
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

from spyre_backend.engine.detokenizer import IncrementalDetokenizer
from spyre_backend.engine.model_runner import ModelRunner
from spyre_backend.engine.request import FinishReason, Request, RequestOutput, RequestTiming
from spyre_backend.engine.sampler import SampleRow, make_generator, sample
from spyre_backend.engine.sampling_params import InvalidRequest
from spyre_backend.engine.scheduler import Scheduler
from spyre_backend.engine.sessions import SessionTable

log = logging.getLogger(__name__)


@dataclass
class EngineLimits:
    max_running: int = 16
    prefill_chunk: int = 512
    session_ttl_s: float = 600.0
    max_request_s: float = 600.0
    max_sessions: int = 256


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


class LLMEngine:
    def __init__(self, runner: ModelRunner, tokenizer, *, eos_token_ids: list[int],
                 limits: EngineLimits | None = None, on_step: Callable[[EngineStats], None] | None = None):
        self.runner = runner
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids)
        self.limits = limits or EngineLimits()
        self.kv_cache = runner.kv_cache
        self.sessions = SessionTable(self.kv_cache, ttl_s=self.limits.session_ttl_s)
        self.scheduler = Scheduler(self.kv_cache, self.sessions, max_running=self.limits.max_running,
                                   prefill_chunk=self.limits.prefill_chunk)
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
        return EngineStats(self.kv_cache.num_free_blocks, self.kv_cache.allocator.num_blocks - 1,
                           len(self.scheduler.running), len(self.scheduler.waiting), len(self.sessions))

    @property
    def num_free_blocks(self) -> int:
        return self.kv_cache.num_free_blocks

    # -- engine thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping:
            idle = not self.scheduler.running and not self.scheduler.waiting
            self._drain_inbox(timeout=1.0 if idle else None)
            try:
                self.step()
            except Exception:  # a bug must not kill the loop: fail the batch, keep serving
                log.exception("engine step failed")
                self._fail_running()
            self._report_stats()

    def _fail_running(self) -> None:
        for request in list(self.scheduler.running):
            try:
                self._finish(request, FinishReason.ERROR, error="internal error in the engine step")
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
                self._reject(request, f"sequence {sid} {why}; resend the whole conversation with sequence_start")
                return False
        history = len(session.token_ids)
        if history + request.num_prompt_tokens + request.params.max_tokens > self.runner.max_context:
            self._reject(request, f"the conversation ({history} tokens so far) + prompt ({request.num_prompt_tokens}) "
                                  f"+ max_tokens ({request.params.max_tokens}) exceeds the maximum context length "
                                  f"{self.runner.max_context}")
            if request.sequence_end:
                self.sessions.close(session)
            return False
        session.active = request
        session.token_ids.extend(request.prompt_ids.tolist())
        request.session = session
        self.scheduler.add(request)
        return True

    def _end_turn(self, request: Request, completed: bool) -> None:
        session = request.session
        session.active = None
        session.last_active = time.monotonic()
        if not completed:
            # never prefilled: forget its prompt, the history stays as before the turn
            del session.token_ids[len(session.token_ids) - request.num_prompt_tokens:]
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
        request.on_output(RequestOutput("", True, request.num_prompt_tokens, 0, FinishReason.ERROR, error=message))

    # -- one step ----------------------------------------------------------------------------
    def step(self) -> None:
        now = time.monotonic()
        self.sessions.expire(now)
        for request in [*self.scheduler.running, *self.scheduler.waiting]:
            if request.stop_requested or request.is_cancelled():
                self._finish(request, FinishReason.CANCELLED)
            elif now > request.deadline:
                self._finish(request, FinishReason.TIMEOUT)
        for request in self.scheduler.admit():
            self._prepare(request)
        plan = self.scheduler.plan()
        if plan.prefill is not None:
            self._prefill_chunk(plan.prefill, plan.prefill_tokens)
        if plan.decode:
            self._decode(plan.decode)

    def _prepare(self, request: Request) -> None:
        """Embeddings of everything this turn must compute: the previous turn's last token (it was
        sampled but never fed back) and the new prompt, image features merged in."""
        session = request.session
        request.generator = make_generator(request.params)
        request.detokenizer = IncrementalDetokenizer(self.tokenizer)
        carried = session.token_ids[session.num_computed: len(session.token_ids) - request.num_prompt_tokens]
        prompt = self.runner.embed_prompt(request.prompt_ids, request.image_features)
        if carried:
            prompt = torch.cat([self.runner.embed_tokens(torch.tensor(carried)), prompt])
        request.prefill_embeds = prompt
        request.image_features = None  # images matter only at prefill: drop them now

    def _prefill_chunk(self, request: Request, n: int) -> None:
        session = request.session
        chunk = request.prefill_embeds[request.num_prefilled: request.num_prefilled + n]
        step = self.runner.prefill_inputs(chunk, start=session.num_computed, block_table=session.block_table)
        logits = self.runner.forward(step)
        session.num_computed += n
        request.num_prefilled += n
        if request.num_prefilled == request.prefill_embeds.shape[0]:
            request.prefill_embeds = None
            self._append_tokens([request], logits)

    def _decode(self, requests: list[Request]) -> None:
        last_tokens = torch.tensor([r.session.token_ids[-1] for r in requests], dtype=torch.long)
        embeds = self.runner.embed_tokens(last_tokens)  # decode takes embeddings too
        step = self.runner.decode_inputs(embeds, [r.session.num_computed for r in requests],
                                         [r.session.block_table for r in requests])
        logits = self.runner.forward(step)[: len(requests)]
        for r in requests:
            r.session.num_computed += 1
        self._append_tokens(requests, logits)

    def _append_tokens(self, requests: list[Request], logits: torch.Tensor) -> None:
        rows = []
        for r in requests:
            p = r.params
            banned = []
            if len(r.output_ids) < p.min_tokens:
                banned = [*([] if p.ignore_eos else self.eos_token_ids), *p.stop_token_ids]
            rows.append(SampleRow(p, r.generator, r.prompt_ids, r.output_ids, banned))
        results = sample(logits, rows)
        now = time.monotonic()  # one clock read per step: every row's token is ready now
        for request, result in zip(requests, results):
            if request.first_token_at is None:
                request.first_token_at = now
            request.last_token_at = now
            self._on_token(request, result)

    def _on_token(self, request: Request, result) -> None:
        token, params = result.token, request.params
        request.output_ids.append(token)
        request.session.token_ids.append(token)
        if result.logprob is not None:
            request.pending_logprobs.append({
                "token_id": token, "logprob": result.logprob,
                "top": [{"token_id": t, "logprob": lp} for t, lp in (result.top or [])]})
        if (not params.ignore_eos and token in self.eos_token_ids) or token in params.stop_token_ids:
            self._finish(request, FinishReason.STOP)
            return
        request.detokenizer.add(token)
        text = request.detokenizer.text
        if params.stop:
            # search only where a new match can start: a stop string may span token boundaries
            begin = max(0, request.num_emitted_chars - max(map(len, params.stop)))
            hits = [i for i in (text.find(s, begin) for s in params.stop) if i >= 0]
            if hits:
                self._finish(request, FinishReason.STOP, stop_at=min(hits))
                return
        if len(request.output_ids) >= params.max_tokens:
            self._finish(request, FinishReason.LENGTH)
            return
        # hold back a tail that could still become a stop string
        safe = len(text) - (max(map(len, params.stop)) - 1 if params.stop else 0)
        if safe > request.num_emitted_chars:
            self._emit(request, text[request.num_emitted_chars:safe], finished=False)

    def _emit(self, request: Request, text: str, finished: bool, reason: FinishReason | None = None,
              error: str | None = None) -> None:
        request.num_emitted_chars += len(text)
        logprobs = request.pending_logprobs if request.params.logprobs is not None else None
        request.pending_logprobs = []
        prefilled = request.num_prefilled
        timing = None
        if finished:
            timing = RequestTiming(request.arrival, request.first_token_at, request.last_token_at,
                                   time.monotonic(), len(request.output_ids))
        request.on_output(RequestOutput(text, finished, request.num_prompt_tokens, len(request.output_ids),
                                        reason, error, logprobs, prefilled, timing))

    def _finish(self, request: Request, reason: FinishReason, error: str | None = None,
                stop_at: int | None = None) -> None:
        self.scheduler.remove(request)
        text = ""
        if request.detokenizer is not None and reason != FinishReason.ERROR:
            request.detokenizer.flush()
            full = request.detokenizer.text
            text = full[request.num_emitted_chars: stop_at if stop_at is not None else len(full)]
        if request.session is not None:
            started = request.num_prefilled > 0
            if reason in (FinishReason.ERROR, FinishReason.TIMEOUT) or request.prefill_embeds is not None and started:
                # stopped half-way through its prefill or failed: the session cannot continue
                request.sequence_end = True
            self._end_turn(request, completed=started)
        try:
            self._emit(request, text, True, reason, error)
        except Exception:
            log.exception("sending the final response of request %s failed", request.request_id)
