"""What a process serving a model sets: torch's threads before the load, the allocator after it.

The allocator's setting (``keep_freed_memory``) comes after the load: set before, the heap would
keep what loading drops (granite_llm reads the vision tower and lets it go).
"""

from __future__ import annotations

import torch

from spyre_backend.config import DeviceConfig
from spyre_backend.device.host_memory import keep_freed_memory

NARROW_MODEL_WIDTH = 256  # hidden size under which num_threads=0 means one thread
TORCH_DEFAULT_THREADS = torch.get_num_threads()  # before any model changed it (one per core, or OMP_NUM_THREADS)


def apply_threads(config: DeviceConfig, model_width: int) -> int:
    """Sets torch's intra-op threads for a model ``model_width`` wide, before loading it; returns the count.

    0 (auto): a model narrower than NARROW_MODEL_WIDTH gets one thread. Its ops are too small to
    split (each parallel region costs more than it saves), and every Triton stub is a process
    of its own on the same cores: two threads each made the tiny checkpoint 1.6x slower at 16
    streams (docs/benchmarks.md). Wider models keep torch's default, one thread per core.
    """
    threads = config.num_threads or (1 if model_width < NARROW_MODEL_WIDTH else TORCH_DEFAULT_THREADS)
    torch.set_num_threads(threads)  # also undoes an earlier model's setting in the same process
    return threads


def apply_serving_allocator() -> None:
    """After the load, before warmup: step temporaries reuse heap pages (device/host_memory.py)."""
    keep_freed_memory()
