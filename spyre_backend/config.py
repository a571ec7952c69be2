"""Model configuration: ``config.pbtxt`` parameters, overridable by SPYRE_<NAME> environment variables.

One typed section per concern, each default written once, here: where the models run
(``DeviceConfig``), the KV cache and the static shapes (``CacheConfig``), the scheduler
(``SchedulerConfig``), the engine's request and session limits (``EngineLimits``), the preprocessor's
input limits (``InputLimits``), the vision encoder (``VisionConfig``) and the granite_vision front
(``FrontConfig``). ``ServingConfig`` holds them all; parameters keep flat names (``max_running``, not
``scheduler.max_running``), each the name of one section's field. A config.pbtxt names only the
parameters its model sets differently from these defaults.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from dataclasses import dataclass, field, fields, replace

from spyre_backend import DEFAULT_CHECKPOINT

_PBTXT_PARAMETER = re.compile(r'key:\s*"(\w+)"\s*value:\s*\{\s*string_value:\s*"([^"]*)"')
_BOOLS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}

# the values of the device parameters (spyre_backend/device resolves them into a DevicePlan)
DEVICES = ("auto", "spyre", "cpu", "cuda")
COMPILE_BACKENDS = ("eager", "inductor", "sendnn")
CPU_GEMMS = ("onednn", "mkl")
DTYPES = ("float32", "bfloat16", "float16")  # torch's names
QUANTIZATIONS = ("none", "int8")
COMPILED_STEPS = ("all", "decode")


class ConfigError(ValueError):
    pass


def pbtxt_parameters(path: str | Path) -> dict[str, str]:
    """The ``parameters`` of the config.pbtxt at ``path``, as written there."""
    return dict(_PBTXT_PARAMETER.findall(Path(path).read_text()))


def _check(section, ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"parameter {name!r}: {message} (got {getattr(section, name)!r})")


@dataclass
class DeviceConfig:
    device: str = "auto"  # auto | spyre | cpu | cuda
    compile_backend: str = ""  # eager | inductor | sendnn; empty: sendnn on spyre, else device.default_compile_backend
    # auto | all | decode: the steps inductor compiles; decode: the LLM's decode steps past the first KV block
    # (the rest run eager); auto: decode for a CPU model of device.CPU_COMPILE_MAX_PARAMS or more, else all
    compiled_steps: str = "auto"
    dtype: str = "auto"  # auto: the checkpoint's (config.json "dtype"/"torch_dtype"; float32 where it says none)
    cpu_gemm: str = "onednn"  # onednn | mkl: the CPU's large fp32 linears (spyre_backend/device/cpu_linear.py)
    num_threads: int = 0  # torch intra-op threads; 0: one for narrow models, else torch's default (device/process.py)
    # none | int8: the LLM decoder's linears with int8 weights (torchao; activations stay in dtype; not on
    # Spyre); opt-in, none is the exact path (spyre_backend/device/quantize.py, docs/benchmarks.md int8)
    quantization: str = "none"

    def validate(self) -> None:
        _check(self, self.device in DEVICES, "device", f"must be one of {list(DEVICES)}")
        _check(self, self.compile_backend in ("", *COMPILE_BACKENDS), "compile_backend",
               f"must be one of {list(COMPILE_BACKENDS)} (or empty for the device's default)")
        _check(self, self.compiled_steps in ("auto", *COMPILED_STEPS), "compiled_steps",
               f"must be auto or one of {list(COMPILED_STEPS)}")
        _check(self, self.dtype in ("auto", *DTYPES), "dtype", f"must be auto or one of {sorted(DTYPES)}")
        _check(self, self.cpu_gemm in CPU_GEMMS, "cpu_gemm", f"must be one of {list(CPU_GEMMS)}")
        _check(self, self.num_threads >= 0, "num_threads", "must be >= 0")
        _check(self, self.quantization in QUANTIZATIONS, "quantization", f"must be one of {list(QUANTIZATIONS)}")


@dataclass
class CacheConfig:
    """The KV pool and the static shapes the model runner is compiled for."""

    block_size: int = 64  # KV block and prefill padding granularity
    max_context: int = 4096  # tokens per sequence (prompt + output)
    num_kv_blocks: int = 0  # 0: sized from memory (kv_memory_mb, else kv_memory_fraction)
    kv_memory_mb: int = 0  # alternative to num_kv_blocks: size the KV pool from a memory budget
    # with neither set: this share of the memory available once the weights are loaded, and no
    # more than max_running full contexts (vLLM sizes its pool from a memory share the same way)
    kv_memory_fraction: float = 0.5
    decode_batch_sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    enable_prefix_caching: bool = True  # full blocks shared by content (engine/prefix_cache.py)
    # prefill padding and prefix-cache unit in tokens; 0: the device's (16, or block_size on Spyre)
    prefill_align: int = 0

    def validate(self) -> None:
        _check(self, self.block_size > 0, "block_size", "must be positive")
        _check(self, self.max_context > 0 and self.max_context % self.block_size == 0, "max_context",
               "must be a positive multiple of block_size")
        _check(self, self.num_kv_blocks >= 0, "num_kv_blocks", "must be >= 0")
        _check(self, self.prefill_align >= 0 and (not self.prefill_align or self.block_size % self.prefill_align == 0),
               "prefill_align", "must be 0 (the device's) or divide block_size")
        _check(self, self.kv_memory_mb >= 0, "kv_memory_mb", "must be >= 0")
        _check(self, 0 < self.kv_memory_fraction <= 1, "kv_memory_fraction", "must be in (0, 1]")
        _check(self, bool(self.decode_batch_sizes) and all(b > 0 for b in self.decode_batch_sizes),
               "decode_batch_sizes", "must be positive sizes")

    def min_kv_blocks(self) -> int:
        """The smallest pool: one full context, and the padding block."""
        return self.max_context // self.block_size + 1

    def kv_blocks(self, bytes_per_token: int, max_running: int, available_bytes: int = 0) -> int:
        """Blocks in the KV pool (one more is reserved for padding). ``available_bytes``: memory
        available now, the weights loaded (0: unknown, then max_running full contexts)."""
        if self.num_kv_blocks:
            return self.num_kv_blocks
        block_bytes = bytes_per_token * self.block_size
        if self.kv_memory_mb:
            return max(2, self.kv_memory_mb * 2**20 // block_bytes)
        full = max_running * (self.max_context // self.block_size) + 1
        if not available_bytes:
            return full
        blocks = min(full, int(available_bytes * self.kv_memory_fraction) // block_bytes)
        if blocks < self.min_kv_blocks():
            need = self.min_kv_blocks() * block_bytes
            raise ConfigError(
                f"the KV pool for one {self.max_context}-token context needs {need / 2**30:.2f} GiB and "
                f"kv_memory_fraction={self.kv_memory_fraction} of the {available_bytes / 2**30:.1f} GiB available "
                f"after loading the weights is {available_bytes * self.kv_memory_fraction / 2**30:.2f} GiB: "
                "lower max_context, raise kv_memory_fraction, or set dtype=bfloat16")
        return blocks


@dataclass
class SchedulerConfig:
    max_running: int = 16  # requests admitted at once (the decode batch)
    prefill_chunk: int = 512  # most prompt tokens of one request in one step (a multiple of block_size)
    max_num_batched_tokens: int = 0  # tokens per step, decode rows included; 0: prefill_chunk + max_running
    max_prefills: int = 1  # requests that get a prompt chunk in one step
    # most tokens in a step that also carries decode rows, theirs included (a multiple of
    # block_size; 0: prefill_chunk; engine/scheduler.py, mixed_prompt_tokens): a long prompt then
    # prefills in smaller pieces while other streams are decoding, so their next token waits for a
    # short step, not a whole chunk. -1: measured at
    # warmup, the largest chunk whose step takes at most mixed_step_slowdown decode steps
    # (engine/scheduler.py, choose_mixed_chunk; 256 until then)
    mixed_prefill_chunk: int = -1
    mixed_step_slowdown: float = 2.0  # a measured mixed chunk: how many decode steps its step may take

    @property
    def token_budget(self) -> int:
        return self.max_num_batched_tokens or self.prefill_chunk + self.max_running

    def validate(self) -> None:
        _check(self, self.max_running > 0, "max_running", "must be positive")
        _check(self, self.prefill_chunk > 0, "prefill_chunk", "must be positive")
        _check(self, self.max_num_batched_tokens >= 0, "max_num_batched_tokens", "must be >= 0")
        _check(self, self.max_prefills > 0, "max_prefills", "must be positive")
        _check(self, self.mixed_prefill_chunk >= -1, "mixed_prefill_chunk", "must be -1 (measured), 0 or a size")
        _check(self, self.mixed_step_slowdown >= 1, "mixed_step_slowdown", "must be >= 1")


@dataclass
class EngineLimits:
    """Limits the engine enforces on requests and sessions (each refusal names its limit)."""

    session_ttl_s: int = 600  # idle sessions are freed after this
    max_request_s: int = 600  # wall-clock limit of one request
    max_sessions: int = 256  # open sessions (sequences kept between turns)
    max_tokens_limit: int = 4096  # cap on max_tokens
    default_max_tokens: int = 16
    max_grammar_bytes: int = 64 * 1024  # structured output: the largest schema, regex, choices or grammar (bytes)
    max_schema_depth: int = 32  # structured output: how deep a JSON schema may nest (JSON levels)
    grammar_compile_timeout_s: float = 10.0  # a request whose grammar compiles longer is refused
    grammar_cache_size: int = 256  # compiled grammars kept, by their constraint's canonical text

    def validate(self) -> None:
        for name in ("session_ttl_s", "max_request_s", "max_sessions", "max_tokens_limit", "default_max_tokens",
                     "max_grammar_bytes", "max_schema_depth", "grammar_compile_timeout_s", "grammar_cache_size"):
            _check(self, getattr(self, name) > 0, name, "must be positive")


@dataclass
class InputLimits:
    """Enforced by the preprocessor before any work is done (each refusal names the limit)."""

    max_images: int = 8  # images per request
    max_image_bytes: int = 20 * 2**20  # encoded bytes per image
    max_image_pixels: int = 4096 * 4096  # per image, read from the header before decoding
    max_text_bytes: int = 2**20  # text_input size
    max_prompt_tokens: int = 0  # 0: max_context
    # PDF documents (preprocess/documents.py): each page is one image, counted against max_images and
    # rendered with at most max_image_pixels, checked from the page size before rendering
    max_document_bytes: int = 32 * 2**20  # encoded bytes per document
    max_document_pages: int = 8  # pages taken from one document (a request's pages: "1-3,7" picks fewer)
    document_dpi: int = 96  # render resolution when the request names none
    max_document_dpi: int = 300  # the most a request may ask for
    # every render runs in a child process with these bounds (a PDF bomb costs at most this): killed
    # past the time, its address space capped
    document_render_timeout_s: float = 20.0
    document_render_memory_mb: int = 2048

    def validate(self) -> None:
        for name in ("max_images", "max_image_bytes", "max_image_pixels", "max_text_bytes", "max_document_bytes",
                     "max_document_pages", "document_dpi", "max_document_dpi", "document_render_timeout_s",
                     "document_render_memory_mb"):
            _check(self, getattr(self, name) > 0, name, "must be positive")
        _check(self, self.max_prompt_tokens >= 0, "max_prompt_tokens", "must be >= 0")
        _check(self, self.document_dpi <= self.max_document_dpi, "document_dpi", "must be <= max_document_dpi")


@dataclass
class VisionConfig:
    # features of recently seen images (keyed by their preprocessed pixels), LRU within this budget (MiB); 0: off
    encoder_cache_mb: int = 256
    processed_image_cache_mb: int = 128  # preprocess: recent images' crops, keyed by their bytes (MiB); 0: none
    # most crops per tower run (rounded down to a power of two; an image's crops may take several runs);
    # 0: auto, enough crops for ~2048 patch rows per matmul (1-2 for 384 px SigLIP crops, 128 for the tiny one)
    max_crop_batch: int = 0

    def validate(self) -> None:
        _check(self, self.encoder_cache_mb >= 0, "encoder_cache_mb", "must be >= 0")
        _check(self, self.processed_image_cache_mb >= 0, "processed_image_cache_mb", "must be >= 0")
        _check(self, self.max_crop_batch >= 0, "max_crop_batch", "must be >= 0")


@dataclass
class FrontConfig:
    """The granite_vision front (serving/front.py)."""

    # Requests the front may have waiting for the pipeline's first response. Each one holds a thread
    # of the Python backend's pool (thread-pool-size, 32 by default) until that response comes; the
    # pool also delivers every streamed response, so keep this below it or streams stall behind
    # queued requests. Requests over the limit wait in the front.
    max_pipeline_starts: int = 24

    def validate(self) -> None:
        _check(self, self.max_pipeline_starts >= 1, "max_pipeline_starts", "must be an integer >= 1")


_SECTIONS = {"device": DeviceConfig, "cache": CacheConfig, "scheduler": SchedulerConfig, "engine": EngineLimits,
             "inputs": InputLimits, "vision": VisionConfig, "front": FrontConfig}


@dataclass
class ServingConfig:
    checkpoint: str = ""  # empty: SPYRE_CHECKPOINT, else the shipped tiny checkpoint
    # granite_llm: least time between two streamed responses of one request (0: one per token, as soon
    # as made); 100 ms (ten updates a second) merges the tokens of fast streams: every response crosses
    # five processes, and at 16 tiny streams 25 ms gave 853-906 tokens/s, 100 ms 1,073-1,176 (docs/configuration.md, Streaming)
    stream_interval_ms: int = 100
    device: DeviceConfig = field(default_factory=DeviceConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    engine: EngineLimits = field(default_factory=EngineLimits)
    inputs: InputLimits = field(default_factory=InputLimits)
    vision: VisionConfig = field(default_factory=VisionConfig)
    front: FrontConfig = field(default_factory=FrontConfig)

    @staticmethod
    def parameters() -> dict[str, str]:
        """Every parameter name, with the section it belongs to ("" for the top level)."""
        names = {f.name: "" for f in fields(ServingConfig) if f.name not in _SECTIONS}
        for section, cls in _SECTIONS.items():
            for f in fields(cls):
                assert f.name not in names, f"parameter {f.name} in two sections"
                names[f.name] = section
        return names

    @classmethod
    def from_model_config(cls, model_config: dict | str) -> "ServingConfig":
        if isinstance(model_config, str):
            model_config = json.loads(model_config)
        raw = {k: v.get("string_value", "") for k, v in model_config.get("parameters", {}).items()}
        for name in cls.parameters():
            env = os.environ.get(f"SPYRE_{name.upper()}")
            if env is not None:
                raw[name] = env
        return cls.from_strings(raw)

    @classmethod
    def from_pbtxt(cls, path: str | Path, **parameters: str) -> "ServingConfig":
        """What the Triton model of the config.pbtxt at ``path`` runs with: its parameters, then
        ``parameters`` (e.g. ``checkpoint=...``), then SPYRE_* environment variables, as the server
        applies them (for running a model's engine in-process with the server's settings)."""
        found = {**pbtxt_parameters(path), **parameters}
        return cls.from_model_config({"parameters": {k: {"string_value": v} for k, v in found.items()}})

    @classmethod
    def from_strings(cls, raw: dict[str, str]) -> "ServingConfig":
        config = cls()
        known = cls.parameters()
        for name, text in raw.items():
            if name not in known:
                continue  # other models' parameters share the namespace
            target = getattr(config, known[name]) if known[name] else config
            default = getattr(target, name)
            try:
                if isinstance(default, list):
                    value = [int(x) for x in str(text).replace(",", " ").split()]
                elif isinstance(default, bool):
                    value = _BOOLS[str(text).strip().lower()]
                elif isinstance(default, float):
                    value = float(text)
                elif isinstance(default, int):
                    value = int(text)
                else:
                    value = str(text)
            except (ValueError, KeyError):
                raise ConfigError(f"parameter {name!r}: cannot parse {text!r} as {type(default).__name__}") from None
            setattr(target, name, value)
        config.validate()
        return config

    def validate(self) -> None:
        _check(self, self.stream_interval_ms >= 0, "stream_interval_ms", "must be >= 0")
        for section in _SECTIONS:
            getattr(self, section).validate()
        # across sections
        cache, scheduler = self.cache, self.scheduler
        _check(scheduler, scheduler.prefill_chunk % cache.block_size == 0, "prefill_chunk",
               "must be a positive multiple of block_size")
        _check(scheduler, scheduler.mixed_prefill_chunk == -1 or scheduler.mixed_prefill_chunk % cache.block_size == 0,
               "mixed_prefill_chunk", "must be a multiple of block_size")
        _check(cache, max(cache.decode_batch_sizes) >= scheduler.max_running, "decode_batch_sizes",
               "must be positive sizes, the largest at least max_running")

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint or os.environ.get("SPYRE_CHECKPOINT") or str(DEFAULT_CHECKPOINT)

    def input_limits(self) -> InputLimits:
        """The preprocessor's limits, with the prompt limit resolved (0: max_context)."""
        return replace(self.inputs, max_prompt_tokens=self.inputs.max_prompt_tokens or self.cache.max_context)
