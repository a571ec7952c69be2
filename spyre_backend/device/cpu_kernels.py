"""The CPU's decode kernels, built from ``kernels/`` into one library for the machine it runs on:
``torch.ops.spyre_kernels.decode_gemv`` (a decode linear at memory speed) and
``torch.ops.spyre_kernels.decode_attention`` (decode attention read in place from the KV pool).

decode_gemv. A decode step reads every weight once for a handful of rows, so it should cost the
weight's bytes of memory traffic and nothing else: 4 a weight in fp32, 2 in bf16, 1 in int8. The
library kernels did not get there for bf16 and int8 on the 2-core VMs we serve from (2b shape,
8192 x 2048 at one row, DRAM-resident weights, 2026-12-07; memory copies at 24 GB/s, fp32
matrix-vector products at 20-25 GB/s):
- bf16: oneDNN's inner product (AMX brgemm, the weight reordered or not) 2.5-3.1 ms, 11-13 GB/s;
  torch's bf16 ``mv`` 15-18 GB/s; inductor's fused reduction of the upcast product 10 GB/s.
- int8: torch's ``_weight_int8pack_mm`` 1.4 ms, 12 GB/s.
The kernel widens each weight to fp32 in registers (AVX-512 or AVX2, plain C++ elsewhere) and
prefetches ahead in the weight stream: bf16 1.6-1.7 ms (19-21 GB/s), int8 0.8 ms (20 GB/s), fp32
2.7 ms (25 GB/s, level with MKL's; at 4 rows 3.3 ms where MKL took 5.7), so one copy of each
weight, as loaded, serves decode in every dtype. It needs no bf16 arithmetic, so it serves CPUs
without it too. The sums are fp32, as the libraries' are; only their order differs. An int8 row's
sum is multiplied by its scale in fp32.

decode_attention. A decode row reads its whole cached context once a layer. The gather path
copies the row's blocks out of the pool into a padded context that SDPA reads again; inductor's
fusion of the same computation (engine/attention.py) reads in place but ran at ~2 GB/s. The
kernel reads each key and value once, all kv heads of a token together (a block is one
contiguous stretch of the pool), widened to fp32 in registers, with fp32 scores, softmax and
sums; where there are fewer rows than threads, a row's context is split by whole blocks. The 2b
shape, 4 rows of ~1,400 cached tokens, a layer, 2026-12-07: bf16 1.1 ms (the gather 2.7, inductor
5.8), fp32 1.2 ms (the gather 4.9; ~20 GB/s, memory speed). Inductor calls it as an opaque op, so
it serves compiled and eager steps alike, the decode rows of an eager mixed step too.

The library is compiled for the machine it runs on (``-march=native``) on first use, ~25 s, and
cached under ``SPYRE_KERNEL_CACHE`` (default ``~/.cache/spyre_backend/kernels``) by a hash of the
sources, torch and the compiler; ``make setup`` builds it ahead. Without a C++ compiler, or if the
build fails, ``load()`` says why once and returns False, and the callers use torch's own kernels.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

KERNELS = Path(__file__).parent / "kernels"
KERNEL_FILES = sorted(path for path in KERNELS.iterdir() if path.suffix in (".cpp", ".h"))
SOURCES = [path for path in KERNEL_FILES if path.suffix == ".cpp"]  # the header they share: simd.h
ATTENTION_GROUPS = (1, 2, 4, 8, 16)  # query heads per kv head decode_attention takes
MAX_ROWS = 4  # kMaxRows in decode_gemv.cpp: at 8 rows oneDNN was faster in bf16 (9-12 against 14-18 GB/s)
FLAGS = ["-O3", "-march=native", "-std=c++20", "-shared", "-fPIC", "-fopenmp"]

_lock = threading.Lock()
_loaded: bool | None = None


def cache_dir() -> Path:
    return Path(os.environ.get("SPYRE_KERNEL_CACHE") or Path.home() / ".cache" / "spyre_backend" / "kernels")


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _command(compiler: str, output: Path) -> list[str]:
    from torch.utils import cpp_extension

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    libs = [f"-L{p}" for p in cpp_extension.library_paths()]
    return [compiler, *FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *includes, *map(str, SOURCES), "-o", str(output),
            *libs, "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{cpp_extension.library_paths()[0]}"]


def _library_path(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, errors="replace").stdout
    sources = [path.read_text() for path in KERNEL_FILES]
    key = hashlib.sha256("\0".join([*sources, torch.__version__, version, " ".join(FLAGS), _cpu_flags()]).encode())
    return cache_dir() / f"spyre_kernels-{key.hexdigest()[:16]}.so"


def _cpu_flags() -> str:
    """The instruction sets -march=native compiles for, so a cache shared between machines never
    hands one a library built for another."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def build(compiler: str) -> Path:
    """Compiles the kernels into the cache unless it is there; returns the library's path. One process
    builds while others wait on a lock (several Triton model instances start at once)."""
    target = _library_path(compiler)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            partial = target.with_suffix(f".{os.getpid()}.tmp")
            # errors="replace": a stub runs in the C locale, and the compiler quotes in UTF-8
            done = subprocess.run(_command(compiler, partial), capture_output=True, text=True, errors="replace")
            if done.returncode != 0:
                partial.unlink(missing_ok=True)
                raise RuntimeError(f"compiling the CPU kernels in {KERNELS} failed:\n{done.stderr[-2000:]}")
            os.replace(partial, target)
    return target


def ready() -> bool:
    """The kernels are loaded in this process (``load()`` ran and succeeded); builds nothing."""
    return _loaded is True


def load() -> bool:
    """Builds (once per machine) and loads the kernels into this process; True when
    ``torch.ops.spyre_kernels`` can be called. Off with ``SPYRE_CPU_KERNELS=0``."""
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = _load()
        return _loaded


def _load() -> bool:
    if os.environ.get("SPYRE_CPU_KERNELS", "1") == "0":
        return False
    compiler = _compiler()
    if compiler is None:
        log.warning("no C++ compiler: decode linears and attention run through torch (slower; see cpu_kernels.py)")
        return False
    try:
        torch.ops.load_library(str(build(compiler)))
        torch.library.register_fake("spyre_kernels::decode_attention")(_decode_attention_shape)
    except Exception as exc:  # noqa: BLE001 - the kernels are a speed-up: whatever stops them, torch's run
        log.warning("the decode kernels are unavailable, torch's kernels run instead: %s", exc)
        return False
    return True


def _decode_attention_shape(query, key_pool, value_pool, block_table, visible, scale):
    return torch.empty_like(query)  # what inductor needs of the op: its output's shape and dtype


if __name__ == "__main__":  # make setup: build ahead of the first start
    logging.basicConfig(level=logging.INFO)
    print("decode kernels:", "ready" if load() else "unavailable (torch's kernels will run)")
