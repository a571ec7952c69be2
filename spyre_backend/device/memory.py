"""What a model needs in memory, checked before it loads; what the machine has left (for the KV pool).

A checkpoint too large for the machine must fail at load with a message that says what it needs
and what lowers it, not grow until the kernel's OOM killer ends the stub (which Triton reports
only as "Stub process ... is not healthy"). The weights' size is read from the safetensors
headers (no tensor is read); the KV pool is sized after the weights are in memory, from what the
kernel says is available then (``CacheConfig.kv_blocks``).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from spyre_backend.models import ModelSpec

GiB = 2**30
# Besides weights and KV: the interpreter, torch, tokenizer, compiled graphs and step temporaries
# (measured: 0.9-1.4 GB resident for a stub serving the tiny checkpoint).
RUNTIME_OVERHEAD_BYTES = int(1.5 * GiB)

_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


class InsufficientMemory(RuntimeError):
    pass


def tensor_counts(checkpoint: str | Path) -> dict[str, int]:
    """Element count of every tensor in the checkpoint's safetensors files, from their headers."""
    counts: dict[str, int] = {}
    for file in sorted(Path(checkpoint).glob("*.safetensors")):
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for name, entry in header.items():
            if name != "__metadata__" and entry["dtype"] in _ITEMSIZE:
                n = 1
                for d in entry["shape"]:
                    n *= d
                counts[name] = n
    return counts


def weight_bytes(checkpoint: str | Path, dtype: torch.dtype, prefixes: tuple[str, ...] = ()) -> int:
    """Bytes of the weights (those whose names start with one of ``prefixes``; all without) in ``dtype``."""
    counts = tensor_counts(checkpoint)
    return sum(n for name, n in counts.items() if not prefixes or name.startswith(prefixes)) * dtype.itemsize


def available_bytes(device: torch.device | None = None) -> int:
    """Memory a new allocation can take without swapping: the GPU's free memory on CUDA, else the
    kernel's MemAvailable (0 where it cannot be read)."""
    if device is not None and device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return _meminfo("MemAvailable")


def _meminfo(field: str) -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def resident_bytes() -> tuple[int, int]:
    """(resident now, peak resident) of this process, from /proc/self/status (0s where unreadable)."""
    values = {"VmRSS": 0, "VmHWM": 0}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in values:
                    values[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return values["VmRSS"], values["VmHWM"]


def gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


@dataclass
class LoadEstimate:
    """What loading one model will take, and what lowers it; ``check`` refuses before loading."""

    model: str  # granite_llm | vision_encoder
    weights: int  # bytes, in the serving dtype
    transient: int = 0  # bytes held only while loading (weights read and dropped)
    kv_minimum: int = 0  # bytes of the smallest KV pool that serves one full context
    dtype: str = "float32"
    remedies: tuple[str, ...] = ()

    @property
    def needed(self) -> int:
        return self.weights + self.transient + self.kv_minimum + RUNTIME_OVERHEAD_BYTES

    def check(self, available: int) -> None:
        if available and self.needed > available:
            parts = [f"weights {gib(self.weights)} in {self.dtype}"]
            if self.transient:
                parts.append(f"{gib(self.transient)} more while loading")
            if self.kv_minimum:
                parts.append(f"KV for one full context {gib(self.kv_minimum)}")
            parts.append(f"runtime ~{gib(RUNTIME_OVERHEAD_BYTES)}")
            raise InsufficientMemory(
                f"{self.model} needs ~{gib(self.needed)} of memory ({', '.join(parts)}) and "
                f"{gib(available)} is available: {'; '.join(self.remedies) or 'free memory'}")


def dtype_remedy(dtype: torch.dtype) -> tuple[str, ...]:
    return ("set parameter dtype=bfloat16 (half the weights and KV)",) if dtype == torch.float32 else ()


def decoder_estimate(checkpoint: str | Path, dtype: torch.dtype, spec: ModelSpec, min_kv_tokens: int) -> LoadEstimate:
    """granite_llm: the language model (a tied LM head counted as its own copy, as the CPU's packed
    linears hold it), the vision tower read with it and dropped, KV for ``min_kv_tokens``."""
    counts = tensor_counts(checkpoint)  # the headers read once
    everything = sum(counts.values()) * dtype.itemsize
    vision = sum(n for name, n in counts.items() if name.startswith(spec.vision_weights)) * dtype.itemsize
    return LoadEstimate(
        "granite_llm", weights=everything - vision, transient=vision,
        kv_minimum=min_kv_tokens * spec.text.kv_bytes_per_token(dtype), dtype=str(dtype).removeprefix("torch."),
        remedies=dtype_remedy(dtype) + ("lower max_context (KV for one full context is the least the pool takes)",),
    )


def vision_estimate(checkpoint: str | Path, dtype: torch.dtype, spec: ModelSpec) -> LoadEstimate:
    return LoadEstimate("vision_encoder", weights=weight_bytes(checkpoint, dtype, spec.vision_model_weights),
                        dtype=str(dtype).removeprefix("torch."), remedies=dtype_remedy(dtype))


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of every tensor a module holds (parameters, buffers and plain tensor attributes, such
    as cpu_linear's packed weights), each storage counted once (tied weights share one)."""
    seen: dict[int, int] = {}
    for m in module.modules():
        tensors = [*m.parameters(recurse=False), *m.buffers(recurse=False),
                   *(v for v in vars(m).values() if isinstance(v, torch.Tensor))]
        for t in tensors:
            try:
                storage = t.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
            except (NotImplementedError, RuntimeError):  # oneDNN's blocked weights are opaque
                seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())
