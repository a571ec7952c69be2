"""The engine loop: admits requests, runs prefill and batched decode steps, streams outputs.

Triton's ``execute()`` only hands requests over (``add_request``) and returns; a single engine
thread owns the model, the KV cache and the scheduler, so none of them needs locking.
"""

from __future__ import annotations

import logging
import queue
import threading
import traceback

import torch

from spyre_backend.engine.detokenizer import IncrementalDetokenizer
from spyre_backend.engine.model_runner import ModelRunner
from spyre_backend.engine.request import FinishReason, Request, RequestOutput
from spyre_backend.engine.sampler import make_generator, sample
from spyre_backend.engine.sampling_params import InvalidRequest
from spyre_backend.engine.scheduler import Scheduler

log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, runner: ModelRunner, tokenizer, *, max_running: int, eos_token_ids: list[int]):
        self.runner = runner
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids)
        self.scheduler = Scheduler(runner.kv_cache, max_running=max_running)
        self._inbox: queue.Queue[Request | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # -- public API (any thread) ----------------------------------------------------------
    def validate(self, request: Request) -> None:
        """Refuse at once what could never run (raises InvalidRequest)."""
        limit = self.runner.max_context
        if request.num_prompt_tokens == 0:
            raise InvalidRequest("the prompt is empty")
        if request.max_total_tokens > limit:
            raise InvalidRequest(
                f"prompt ({request.num_prompt_tokens} tokens) + max_tokens ({request.params.max_tokens}) "
                f"exceeds the maximum context length {limit}")
        if self.runner.kv_cache.blocks_needed(request.max_total_tokens) > self.runner.kv_cache.allocator.num_blocks - 1:
            raise InvalidRequest("the request needs more KV blocks than the cache holds")

    def add_request(self, request: Request) -> None:
        self.validate(request)
        self._inbox.put(request)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="llm-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._inbox.put(None)
        if self._thread:
            self._thread.join(timeout=30)

    @property
    def num_free_blocks(self) -> int:
        return self.runner.kv_cache.num_free_blocks

    # -- engine thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping:
            idle = not self.scheduler.running and not self.scheduler.waiting
            self._drain_inbox(block=idle)
            try:
                self.step()
            except Exception:  # a bug must not kill the loop: fail the batch, keep serving
                message = traceback.format_exc()
                log.error("engine step failed:\n%s", message)
                for request in list(self.scheduler.running):
                    self._finish(request, FinishReason.ERROR, error="internal error in the engine step")

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            while True:
                if item is not None:
                    self.scheduler.add(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def step(self) -> None:
        """One engine iteration: drop cancelled requests, admit one prefill, decode the rest."""
        for request in [*self.scheduler.running, *self.scheduler.waiting]:
            if request.is_cancelled():
                self._finish(request, FinishReason.CANCELLED)
        decoding = list(self.scheduler.running)
        request = self.scheduler.next_prefill()
        if request is not None:
            self._prefill(request)
        if decoding:
            self._decode(decoding)

    def _prefill(self, request: Request) -> None:
        request.generator = make_generator(request.params)
        request.detokenizer = IncrementalDetokenizer(self.tokenizer)
        embeds = self.runner.embed_prompt(request.prompt_ids, request.image_features)
        request.image_features = None  # images matter only at prefill: drop them now
        step = self.runner.prefill_inputs(embeds, start=0, block_table=request.block_table)
        logits = self.runner.forward(step)
        request.num_computed = request.num_prompt_tokens
        self._append_tokens([request], logits)

    def _decode(self, requests: list[Request]) -> None:
        last_tokens = torch.tensor([r.output_ids[-1] for r in requests], dtype=torch.long)
        embeds = self.runner.embed_tokens(last_tokens)  # decode takes embeddings too
        step = self.runner.decode_inputs(embeds, [r.num_tokens - 1 for r in requests],
                                         [r.block_table for r in requests])
        logits = self.runner.forward(step)[: len(requests)]
        for r in requests:
            r.num_computed = r.num_tokens
        self._append_tokens(requests, logits)

    def _append_tokens(self, requests: list[Request], logits: torch.Tensor) -> None:
        tokens = sample(logits, [r.params for r in requests], [r.generator for r in requests])
        for request, token in zip(requests, tokens):
            self._on_token(request, token)

    def _on_token(self, request: Request, token: int) -> None:
        params = request.params
        if not params.ignore_eos and token in self.eos_token_ids or token in params.stop_token_ids:
            request.output_ids.append(token)
            self._finish(request, FinishReason.STOP)
            return
        request.output_ids.append(token)
        delta = request.detokenizer.add(token)
        if params.stop:
            text = request.detokenizer.text
            hit = min((i for i in (text.find(s) for s in params.stop) if i >= 0), default=-1)
            if hit >= 0:
                # the stop string and what follows it are not emitted
                emitted = len(text) - len(delta)
                self._finish(request, FinishReason.STOP, text=text[emitted:hit] if hit > emitted else "")
                return
        if len(request.output_ids) >= params.max_tokens:
            self._finish(request, FinishReason.LENGTH, text=delta + request.detokenizer.flush())
            return
        if delta:
            request.on_output(RequestOutput(delta, False, request.num_prompt_tokens, len(request.output_ids)))

    def _finish(self, request: Request, reason: FinishReason, text: str = "", error: str | None = None) -> None:
        self.scheduler.finish(request)
        if reason == FinishReason.STOP and request.detokenizer is not None and not text:
            text = request.detokenizer.flush()
        try:
            request.on_output(RequestOutput(text, True, request.num_prompt_tokens, len(request.output_ids),
                                            finish_reason=reason, error=error))
        except Exception:
            log.exception("sending the final response of request %s failed", request.request_id)
