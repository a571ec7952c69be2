"""Where the model runs and how it is compiled: Spyre, CUDA or the CPU, one program everywhere.

``device``: auto | spyre | cpu | cuda. ``compile_backend``: eager | inductor | sendnn.
auto picks spyre where IBM's Spyre stack imports, else cuda where available, else cpu.
On Spyre, tensors live on the host and the compiled graphs run on the card (torch_sendnn);
everything Spyre-specific is in ``spyre.py``.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from typing import Callable

import torch

from spyre_backend.config import CPU_GEMMS, DEVICES, DTYPES, ConfigError, DeviceConfig
from spyre_backend.device import cpu_kernels, cpu_linear, memory, quantize, spyre
from spyre_backend.models import get_spec

PREFILL_ALIGN = 16  # tokens, off Spyre (DevicePlan.prefill_align)


class DeviceError(RuntimeError):
    pass


@dataclass(frozen=True)
class DevicePlan:
    kind: str  # spyre | cpu | cuda
    compile_backend: str  # eager | inductor | sendnn
    dtype: torch.dtype
    cpu_gemm: str = "onednn"  # onednn | mkl: who runs the CPU's large fp32 linears (cpu_linear)
    quantization: str = "none"  # none | int8: the LLM decoder's linears (quantize.py)
    compiled_steps: str = "all"  # all | decode: what compile() is asked for (compiles_all_steps)

    @property
    def torch_device(self) -> torch.device:
        # Spyre graphs take host tensors; the card is reached through the compiled program.
        return torch.device("cuda" if self.kind == "cuda" else "cpu")

    @property
    def compiles_all_steps(self) -> bool:
        """Every step shape is compiled (the vision tower's too). Otherwise (``compiled_steps:
        decode``) only the LLM's decode steps past the first KV block are, and prefill, mixed steps
        and the vision tower run eager: at the 2b shape on 2 cores each decode graph took 70-130 s
        to compile cold (12-16 s from inductor's cache) and ran a decode step 10-30 % faster than
        eager, where compiling every prefill and vision shape would take about an hour."""
        return self.compile_backend == "eager" or self.compiled_steps == "all"

    @property
    def attends_in_place(self) -> bool:
        """Decode attention reads the KV blocks in place (engine/attention.py): on the CPU, through
        our kernel (eager or compiled) or inductor's fusion (compiled)."""
        return self.kind == "cpu"

    @property
    def mixes_steps(self) -> bool:
        """A step's prefill chunk and decode rows run in one forward pass (one read of the weights
        for both). Spyre's compiler takes batch-1 prefill and decode programs only, so there they
        stay two passes."""
        return self.kind in ("cpu", "cuda")

    def prefill_align(self, block_size: int) -> int:
        """The unit a prefill's length is padded to. Spyre runs prefill programs of whole KV blocks;
        elsewhere the length is a symbol of the graph (inductor) or nothing is compiled (eager), and
        16 keeps a short prefill short: on the mid-size model 16 tokens cost half of 64 (prefills
        are compute-bound there). Prefix-cache hits are found to this unit too."""
        return block_size if self.kind == "spyre" else min(PREFILL_ALIGN, block_size)

    def prepare(self, module: torch.nn.Module, decoder: bool = False) -> int:
        """Device-specific rewrites of a loaded model, before anything is compiled from it; returns
        how many layers changed. On the CPU: large fp32 and bf16 linears keep their weights as
        loaded and run our decode kernel for few rows, oneDNN or torch for many (cpu_linear).
        ``quantization: int8``: the ``decoder``'s linears (the LLM; the vision tower stays as
        loaded) get int8 weights instead (quantize.py)."""
        if self.kind == "cpu" and decoder:
            cpu_kernels.load()  # decode attention (engine/attention.py), whatever the linears run
        if self.quantization == "int8" and decoder:
            return quantize.quantize_linears(module, self.dtype)
        if self.kind != "cpu" or not cpu_linear.available():
            return 0
        if self.dtype not in (torch.float32, torch.bfloat16) or (self.dtype == torch.float32 and self.cpu_gemm != "onednn"):
            return 0
        return cpu_linear.cpu_linears(module, self.dtype)

    def compile(self, fn: Callable, *, name: str) -> Callable:
        """Compile ``fn`` for static shapes: each distinct shape is one graph, built at warmup."""
        if self.compile_backend == "eager":
            return fn
        import torch._dynamo
        import torch.fx.experimental._config

        _utf8_locale()
        # one graph per warmed-up shape; dynamo's default limit (8) would silently fall back to eager
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
        # a dim marked dynamic gets a symbol of its own even where the warmup example's sizes are
        # equal (duck shaping would make them one symbol, and the graph hold only while they are)
        torch.fx.experimental._config.use_duck_shape = False
        backend = spyre.compile_backend() if self.compile_backend == "sendnn" else "inductor"
        return torch.compile(fn, backend=backend, dynamic=False, fullgraph=False)

    def seal_compiled(self, sealed: bool = True) -> None:
        """Process-wide: once every compiled function of the process has run every shape it will
        serve, dynamo checks only the guards that tell its cached graphs apart, not every parameter
        and KV pool tensor on every call (a quarter of a tiny decode step's time in the granite_llm
        stub). A compile after this fails instead of running, so only a process that serves a
        warmed-up model seals: each Triton model's stub after its warmup, the benchmark around its
        load runs. Eager has nothing to seal (and need not import dynamo)."""
        if self.compile_backend != "eager":
            torch.compiler.set_stance("default", skip_guard_eval_unsafe=sealed)

    def mark_bucket_dims(self, *marks: tuple[torch.Tensor, int]) -> None:
        """Mark (tensor, dim) pairs whose size only ever takes the static set's padded bucket values.

        sendnn compiles every shape of the set as it is (a Spyre card runs static graphs only).
        Inductor is told these dims are symbolic, so one graph serves every bucket: the inputs are
        padded exactly as on Spyre, but ~110 static shapes would take 20 minutes of compiling on
        two CPU cores and a handful of graphs take about one. Sizes 0 and 1 stay specialized.
        """
        if self.compile_backend != "inductor":
            return
        import torch._dynamo

        for tensor, dim in marks:
            if tensor.shape[dim] > 1:
                torch._dynamo.mark_dynamic(tensor, dim)


def _utf8_locale() -> None:
    """Triton's Python stub embeds an isolated interpreter: it ignores PYTHONUTF8 and LANG and
    leaves LC_CTYPE at "C", so files open as ASCII, and inductor fails at load reading its own
    UTF-8 templates. open() follows the current LC_CTYPE, so switching it here is enough."""
    import locale

    if locale.getpreferredencoding(False).lower().replace("-", "") == "utf8":
        return
    for name in ("C.UTF-8", "C.utf8", "en_US.UTF-8"):
        try:
            locale.setlocale(locale.LC_CTYPE, name)
            return
        except locale.Error:
            continue


# On the CPU a model this large compiles its decode steps only (DevicePlan.compiles_all_steps):
# compiling every shape of the static set (~110 forward passes, ~18k tokens of prefill) takes an
# hour for a 2B model on two cores.
CPU_COMPILE_MAX_PARAMS = 1_000_000_000


def default_compile_backend(device: str) -> str:
    """inductor where it can build (measured faster on the CPU: the tiny checkpoint 2.5x at one
    stream, the mid-size one 1.15x, the 2b shape's decode step 1.2-1.3x; docs/benchmarks.md); eager
    on a CPU without a C++ compiler."""
    if device == "cpu" and not (shutil.which("g++") or shutil.which("c++")):
        return "eager"
    return "inductor"


def default_compiled_steps(device: str, model_params: int = 0) -> str:
    """decode on the CPU for models of CPU_COMPILE_MAX_PARAMS or more (DevicePlan.compiles_all_steps), else all."""
    return "decode" if device == "cpu" and model_params >= CPU_COMPILE_MAX_PARAMS else "all"


def resolve(device: str, compile_backend: str | None, dtype: torch.dtype, cpu_gemm: str = "onednn",
            model_params: int = 0, compiled_steps: str = "auto") -> DevicePlan:
    """``model_params``: the checkpoint's parameter count, for the default ``compiled_steps``."""
    if cpu_gemm not in CPU_GEMMS:
        raise DeviceError(f"cpu_gemm must be one of {CPU_GEMMS}, got {cpu_gemm!r}")
    if device not in DEVICES:
        raise DeviceError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "auto":
        device = "spyre" if spyre.available() else "cuda" if torch.cuda.is_available() else "cpu"
    if device == "spyre":
        spyre.require()  # fails with what is missing
        compile_backend = compile_backend or "sendnn"
        if compile_backend != "sendnn":
            raise DeviceError(f"device spyre runs compiled graphs only: compile_backend must be sendnn, "
                              f"got {compile_backend!r}")
    else:
        compile_backend = compile_backend or default_compile_backend(device)
        if compile_backend not in ("eager", "inductor"):
            raise DeviceError(f"compile_backend {compile_backend!r} needs device spyre; "
                              f"use eager or inductor on {device}")
        if device == "cuda" and not torch.cuda.is_available():
            raise DeviceError("device cuda was asked for but torch sees no CUDA device")
    if compiled_steps == "auto":
        compiled_steps = default_compiled_steps(device, model_params)
    if device == "spyre" and compiled_steps != "all":
        raise DeviceError("device spyre runs compiled graphs only: compiled_steps must be all")
    return DevicePlan(device, compile_backend, dtype, cpu_gemm, compiled_steps=compiled_steps)


def checkpoint_dtype(checkpoint: str) -> str:
    """The dtype a checkpoint says it was saved in (where its config says it is the architecture's:
    ``ModelSpec.declared_dtypes``); float32 where it says none we serve."""
    try:
        declared = get_spec(checkpoint).declared_dtypes
    except (OSError, ValueError):  # no config.json, not JSON, or no architecture we serve
        return "float32"
    return next((dtype for dtype in declared if dtype in DTYPES), "float32")


def torch_dtype(config: DeviceConfig, checkpoint: str = "") -> torch.dtype:
    """The dtype to serve in: ``config.dtype``, or for auto the one ``checkpoint`` was saved in."""
    return getattr(torch, checkpoint_dtype(checkpoint) if config.dtype == "auto" else config.dtype)


def plan_for(config: DeviceConfig, checkpoint: str = "") -> DevicePlan:
    """Resolve device, compile backend and dtype (auto: ``checkpoint``'s); a device that cannot
    be used fails here, at load."""
    try:
        params = sum(memory.tensor_counts(checkpoint).values()) if checkpoint else 0
        plan = resolve(config.device, config.compile_backend or None, torch_dtype(config, checkpoint), config.cpu_gemm,
                       model_params=params, compiled_steps=config.compiled_steps)
    except (DeviceError, RuntimeError) as exc:
        raise ConfigError(f"parameter 'device' ({config.device!r}): {exc}") from None
    if config.quantization != "none" and plan.kind == "spyre":
        raise ConfigError(f"parameter 'quantization' ({config.quantization!r}): not on Spyre, whose compiled "
                          "programs take the model's own dtype; use none there")
    return replace(plan, quantization=config.quantization)
