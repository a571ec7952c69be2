"""Builds the LLM engine from a ServingConfig and turns engine outputs into stream semantics.

Stream semantics follow Triton's vLLM backend: with ``stream`` each response carries the new
text and the last one is flagged final; without it a single final response carries everything
(the prompt first unless ``exclude_input_in_output``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from transformers import AutoTokenizer

from spyre_backend.config import ServingConfig
from spyre_backend.device import memory, process
from spyre_backend.engine.llm_engine import EngineStats, LLMEngine
from spyre_backend.engine.request import Request, RequestOutput
from spyre_backend.engine.sampling_params import SamplingParams
from spyre_backend.errors import InvalidRequest
from spyre_backend.models import get_spec
from spyre_backend.serving.control import polled_every
from spyre_backend.serving.warmup import warmup_llm

log = logging.getLogger(__name__)


@dataclass
class GenerateInputs:
    input_ids: np.ndarray  # [n] int64, placeholders expanded
    image_features: np.ndarray | None  # [n_features, hidden]
    prompt_text: str = ""
    stream: bool = False
    exclude_input_in_output: bool = False
    max_tokens: int | None = None
    sampling_parameters: str | None = None
    sampling_overrides: dict = field(default_factory=dict)  # TRT-LLM-style separate inputs
    sequence_id: int | str | None = None
    sequence_start: bool = True
    sequence_end: bool = True
    cache_salt: str = ""  # the tenant's: its prefix-cache hits are only its own


class LLMService:
    def __init__(self, config: ServingConfig, on_stats: Callable[[EngineStats], None] | None = None,
                 warmup: bool = True):
        started = time.monotonic()
        self.config = config
        checkpoint = config.checkpoint_dir
        self.spec = get_spec(checkpoint)
        threads = process.apply_threads(config.device, self.spec.text.hidden_size)
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        self.engine = LLMEngine.from_config(checkpoint, config, self.spec, self.tokenizer, on_step=on_stats)
        loaded = time.monotonic() - started
        process.apply_serving_allocator()
        self.engine.start()
        warmed = warmup_llm(self, checkpoint) if warmup else 0.0
        probe, block_size = self.engine.probe, config.cache.block_size
        plan = probe.plan
        resident, peak = memory.resident_bytes()
        log.warning("granite_llm: loaded %s in %.1f s, warmup %.1f s (%s, %s, %s, %d threads; %d static shapes; "
                    "mixed chunk %d); "
                    "memory: weights %s, KV pool %s (%d blocks of %d tokens, %d tokens), resident %s, peak %s",
                    checkpoint, loaded, warmed, plan.kind,
                    plan.compile_backend if plan.compiles_all_steps else f"{plan.compile_backend} decode steps",
                    str(plan.dtype).removeprefix("torch."),
                    threads, len(probe.shape_set()), probe.mixed_chunk, memory.gib(probe.weight_bytes), memory.gib(probe.kv_pool_bytes),
                    probe.num_kv_blocks, block_size, (probe.num_kv_blocks - 1) * block_size,
                    memory.gib(resident), memory.gib(peak))

    def submit(self, inputs: GenerateInputs, send: Callable[[str, RequestOutput], None],
               is_cancelled: Callable[[], bool] = lambda: False) -> None:
        """Queue a generation; ``send(text, output)`` is called for each response to emit.

        Raises InvalidRequest for a request that can never run.
        """
        params = SamplingParams.from_request(inputs.sampling_parameters, max_tokens=inputs.max_tokens,
                                             limits=self.config.engine,
                                             default_max_tokens=self.config.engine.default_max_tokens,
                                             overrides=inputs.sampling_overrides)
        if params.max_tokens is None:  # what the context leaves (OpenAI clients that set no max_tokens)
            room = self.engine.room_for(len(inputs.input_ids))
            params.max_tokens = max(1, min(room, self.config.engine.max_tokens_limit))
            params.validate()  # min_tokens against the resolved value
        if params.max_tokens > self.config.engine.max_tokens_limit:
            raise InvalidRequest(f"max_tokens {params.max_tokens} is over the limit "
                                 f"max_tokens_limit={self.config.engine.max_tokens_limit}")
        features = None
        if inputs.image_features is not None and inputs.image_features.size:
            features = torch.from_numpy(np.ascontiguousarray(inputs.image_features))
        pieces: list[str] = []
        logprobs: list[dict] = []
        prefix = "" if inputs.exclude_input_in_output or inputs.stream else inputs.prompt_text

        def on_output(out: RequestOutput) -> None:
            if inputs.stream:
                if out.text or out.finished or out.logprobs:
                    send(out.text, out)
                return
            pieces.append(out.text)
            logprobs.extend(out.logprobs or [])
            if out.finished:
                if out.logprobs is not None:
                    out.logprobs = logprobs
                send(prefix + "".join(pieces), out)

        request = Request(
            prompt_ids=torch.from_numpy(np.ascontiguousarray(inputs.input_ids, dtype=np.int64)),
            image_features=features, params=params, on_output=on_output,
            is_cancelled=polled_every(is_cancelled),
            sequence_id=inputs.sequence_id, sequence_start=inputs.sequence_start, sequence_end=inputs.sequence_end,
            cache_salt=inputs.cache_salt,
        )
        self.engine.add_request(request)

    def image_tokens(self, input_ids: np.ndarray | None) -> int:
        """The image placeholders among a request's prompt tokens (the usage's image_tokens)."""
        return 0 if input_ids is None else int(np.count_nonzero(np.asarray(input_ids) == self.spec.image_token_id))

    def stop(self, sequence_id, end: bool, reply: Callable[[str | None], None]) -> None:
        """Stop the running turn of ``sequence_id``; ``reply(None)`` on success, else the error."""
        self.engine.stop_sequence(sequence_id, end, reply)

    def seal_compiled(self, sealed: bool = True) -> None:
        """After warmup, in a process that serves only this model (DevicePlan.seal_compiled)."""
        self.engine.seal(sealed)

    def shutdown(self) -> None:
        self.engine.stop()

