"""Linear layers on the CPU through oneDNN, with each weight reordered once at load.

PyTorch's fp32 ``nn.Linear`` on the CPU calls MKL's sgemm on the weight as stored. On these
machines that is slow exactly where serving spends its time: the mid-size decoder's matmuls for a
decode step (M = the batch, 1 to 16 rows) ran at 6-15 GB/s, and batch 4 took twice as long as
batch 1. oneDNN, with the weight reordered into its blocked layout once, ran the same matmuls 2-4x
faster and prefill-size ones (M = 512) ~1.5x faster (docs/configuration.md, CPU matmuls).

The reordered weight replaces the original, so memory does not grow (a tied LM head gets its own
copy; the embedding keeps the original). Inductor's own route to prepacked weights (freezing) puts
a copy of every weight into each compiled graph: one more copy of the model per graph.

A single row (a decode step at batch 1) is the exception: with the weight blocked for 16 rows,
oneDNN computes a whole 16-row tile and a mid-size decode step at batch 1 is compute-bound (the
8192 x 1024 linear took 2.3-2.9 ms); with the weight reordered for one row it runs a matrix-vector
kernel at memory speed (1.5-1.7 ms), and the same layout is 1.3-3x slower at 2 to 16 rows. So where
memory allows (``pack_linears(single_row=True)``: the decoder, when the copies take at most a
quarter of the memory available), a layer keeps both layouts and a single row uses the second:
the mid-size decode step at batch 1 went 50-56 -> 39-44 ms (docs/configuration.md, CPU matmuls).

bf16 weights stay as loaded, in ``Bf16Linear``: a decode step's few rows (up to
``gemv_kernel.MAX_ROWS``) run our bf16 matrix-vector kernel, which reads each weight once at memory
speed on any CPU (oneDNN's bf16 kernels reached 11-13 GB/s where memory gives 24:
``gemv_kernel.py``); more rows run torch's linear, which is oneDNN's bf16 kernel on a CPU with bf16
arithmetic (AVX-512 BF16, AMX; a 512-row chunk of an 8192 x 2048 weight took ~27 ms reordered or
not, fp32 ~70 ms). On a CPU without bf16 arithmetic (these AMD cores have neither) torch's bf16
matmul runs at ~20 GFLOPS, fp32 at 90-120, so a matmul of ``UPCAST_MIN_ROWS`` rows or more runs in
fp32 on a converted copy of the weight (the copy costs ~38 ms for an 8192 x 2048 weight; a 512-row
fp32 matmul ~140 ms, in bf16 ~850 ms).

Small weights stay on MKL: a oneDNN call costs ~25 us however small the matmul, MKL's ~9 us, and
below ~1 MiB of weight MKL was as fast or faster. Only exact ``nn.Linear`` modules are swapped
(subclasses such as ``MultiheadAttention``'s projection are read through ``.weight``).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from spyre_backend.device import gemv_kernel, memory

MIN_PACKED_ELEMENTS = 1 << 18  # 1 MiB of fp32 weight: 512 x 512 was the smallest shape oneDNN won
# oneDNN picks its blocking for this many rows: the largest decode batch. With it every row count
# measured (M = 1..1458, the mid-size model's shapes) ran faster than MKL. A hint of 1 made batch 1
# ~15 % faster and batch 16 ~45 % slower; 128 was level with 16.
_ROWS_HINT = 16

# A plain dispatcher op, not torch.library.custom_op: that wrapper cost ~30 us a call, this ~3 us.
# Inductor lowers oneDNN's own linear op only for weights it packed itself (freezing); through
# this op the call stays opaque to it and runs as written, the weight an ordinary graph input.
_LIBRARY = torch.library.Library("spyre_backend", "DEF")
_LIBRARY.define("packed_linear(Tensor x, Tensor weight, Tensor? single_row_weight, Tensor? bias) -> Tensor")
_LIBRARY.define("bf16_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
UPCAST_MIN_ROWS = 32  # bf16 without bf16 arithmetic: ~1.7 ms a row for 8192 x 2048; converting the weight ~38 ms


def _linear(x: torch.Tensor, weight: torch.Tensor, single_row_weight: torch.Tensor | None,
            bias: torch.Tensor | None) -> torch.Tensor:
    if single_row_weight is not None and x.numel() == x.shape[-1]:
        weight = single_row_weight
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


_LIBRARY.impl("packed_linear", _linear, "CompositeExplicitAutograd")


@torch.library.register_fake("spyre_backend::packed_linear")
def _(x, weight, single_row_weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    rows = x.numel() // x.shape[-1]
    if rows <= gemv_kernel.MAX_ROWS and _use_gemv_kernel:
        y = torch.ops.spyre_kernels.bf16_gemv(x.reshape(rows, x.shape[-1]), weight).view(*x.shape[:-1], -1)
        return y if bias is None else y + bias
    if rows >= UPCAST_MIN_ROWS and not has_native_bf16():
        return torch.nn.functional.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)
    return torch.nn.functional.linear(x, weight, bias)


_LIBRARY.impl("bf16_linear", _bf16_linear, "CompositeExplicitAutograd")
_use_gemv_kernel = False  # set by bf16_linears once the kernel has loaded


@torch.library.register_fake("spyre_backend::bf16_linear")
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@functools.cache
def has_native_bf16() -> bool:
    """The CPU does bf16 arithmetic (oneDNN's test: AVX-512 BF16 or AMX)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class Bf16Linear(nn.Module):
    """``y = x @ W.T + b`` with a bf16 ``W`` kept as loaded (see the module doc)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.out_features, self.in_features = linear.weight.shape
        self.weight = linear.weight
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.spyre_backend.bf16_linear.default(x, self.weight, self.bias)


def bf16_linears(module: nn.Module) -> int:
    """Replaces every large bf16 ``nn.Linear`` under ``module`` with Bf16Linear (building the
    decode kernel on first use); returns how many."""
    global _use_gemv_kernel
    found = _packable_linears(module, torch.bfloat16)
    if found:
        _use_gemv_kernel = gemv_kernel.load()
    for parent, name, child in found:
        setattr(parent, name, Bf16Linear(child))
    return len(found)


def available() -> bool:
    return torch.backends.mkldnn.is_available()


class PackedLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` held in oneDNN's blocked layout (inference only)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, single_row: bool = False):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        weight = weight.detach().contiguous()
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight, _ROWS_HINT)
        self.single_row_weight = torch.ops.mkldnn._reorder_linear_weight(weight, 1) if single_row else None
        self.bias = None if bias is None else bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.spyre_backend.packed_linear.default(x, self.packed_weight, self.single_row_weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"single_row={self.single_row_weight is not None}")


def _packable(module: nn.Module, dtype: torch.dtype = torch.float32) -> bool:
    if type(module) is not nn.Linear:
        return False
    weight = module.weight
    return weight.dtype == dtype and weight.device.type == "cpu" and weight.numel() >= MIN_PACKED_ELEMENTS


def available_memory_bytes() -> int:
    return memory.available_bytes()


def pack_linears(module: nn.Module, single_row: bool = False) -> int:
    """Replaces every large fp32 ``nn.Linear`` under ``module`` (in place); returns how many.

    ``single_row``: also keep each weight in the single-row layout (see the module doc), if those
    copies take at most a quarter of the memory available now."""
    packable = _packable_linears(module, torch.float32)
    if single_row:
        copies = sum(child.weight.numel() * child.weight.element_size() for _, _, child in packable)
        single_row = copies <= available_memory_bytes() // 4
    for parent, name, child in packable:
        setattr(parent, name, PackedLinear(child.weight, child.bias, single_row=single_row))
    return len(packable)


def _packable_linears(module: nn.Module, dtype: torch.dtype = torch.float32) -> list[tuple[nn.Module, str, nn.Linear]]:
    found = []
    for name, child in module.named_children():
        if _packable(child, dtype):
            found.append((module, name, child))
        else:
            found += _packable_linears(child, dtype)
    return found
