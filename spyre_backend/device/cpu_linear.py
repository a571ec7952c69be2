"""The CPU's large linears: one copy of each weight, as loaded, and the kernel that suits the rows.

A decode step reads every weight once for a handful of rows, so it is bound by memory: up to
``cpu_kernels.MAX_ROWS`` rows run our matrix-vector kernel, which reads an fp32, bf16 or int8
weight once at memory speed (``cpu_kernels.py``). On the 2b shape's 8192 x 2048 weight at one row,
2026-12-07: fp32 2.7 ms (25 GB/s, level with MKL's), bf16 1.7 ms (19 GB/s; oneDNN's bf16 kernel
reached 11-13), int8 0.8 ms (20 GB/s; torch's ``_weight_int8pack_mm`` 1.4 ms).

More rows (larger decode batches, prefill chunks) are bound by compute:
- fp32 through oneDNN's inner product on the weight as stored. Reordered into oneDNN's blocked
  layout it was 0-15 % faster at 5-64 rows and level at 256-512, but a reordered copy cannot serve
  the kernel, so it was a second copy of the model (the 2b shape in fp32 peaked at 21.8 GiB with
  one); MKL's sgemm took 1.5-2x oneDNN's time at 5-16 rows (docs/configuration.md, CPU matmuls).
- bf16 through torch's linear, which is oneDNN's bf16 kernel on a CPU with bf16 arithmetic
  (AVX-512 BF16, AMX; a 512-row chunk of an 8192 x 2048 weight took ~27 ms, fp32 ~70 ms). On a CPU
  without it (these AMD cores have neither) torch's bf16 matmul runs at ~20 GFLOPS, fp32 at 90-120,
  so a matmul of ``UPCAST_MIN_ROWS`` rows or more runs in fp32 on a converted copy of the weight
  for that call (the copy costs ~38 ms for an 8192 x 2048 weight; a 512-row fp32 matmul ~140 ms,
  in bf16 ~850 ms).

Weights are never copied, so a tied LM head shares the embedding's. Small weights stay on
``nn.Linear`` (MKL): a oneDNN call costs ~25 us however small the matmul, MKL's ~9 us, and below
~1 MiB of weight MKL was as fast or faster. Only exact ``nn.Linear`` modules are swapped
(subclasses such as ``MultiheadAttention``'s projection are read through ``.weight``).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from spyre_backend.device import cpu_kernels

MIN_SWAPPED_ELEMENTS = 1 << 18  # 1 MiB of fp32 weight: 512 x 512 was the smallest shape oneDNN won
UPCAST_MIN_ROWS = 32  # bf16 without bf16 arithmetic: ~1.7 ms a row for 8192 x 2048; converting the weight ~38 ms

# A plain dispatcher op, not torch.library.custom_op: that wrapper cost ~30 us a call, this ~3 us.
# Through it the call stays opaque to inductor and runs as written, the weight an ordinary input.
_LIBRARY = torch.library.Library("spyre_backend", "DEF")
_LIBRARY.define("cpu_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")


def _cpu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    rows = x.numel() // x.shape[-1]
    if 0 < rows <= cpu_kernels.MAX_ROWS and cpu_kernels.ready():
        y = torch.ops.spyre_kernels.decode_gemv(x.reshape(rows, x.shape[-1]), weight).view(*x.shape[:-1], -1)
        return y if bias is None else y + bias
    if weight.dtype == torch.float32:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    if rows >= UPCAST_MIN_ROWS and not has_native_bf16():
        return torch.nn.functional.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)
    return torch.nn.functional.linear(x, weight, bias)


_LIBRARY.impl("cpu_linear", _cpu_linear, "CompositeExplicitAutograd")


@torch.library.register_fake("spyre_backend::cpu_linear")
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@functools.cache
def has_native_bf16() -> bool:
    """The CPU does bf16 arithmetic (oneDNN's test: AVX-512 BF16 or AMX)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def available() -> bool:
    return torch.backends.mkldnn.is_available()


class CpuLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` (fp32 or bf16) kept as loaded (see the module doc)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.out_features, self.in_features = linear.weight.shape
        self.weight = linear.weight
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.spyre_backend.cpu_linear.default(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"dtype={self.weight.dtype}")


def cpu_linears(module: nn.Module, dtype: torch.dtype) -> int:
    """Replaces every large ``nn.Linear`` of ``dtype`` (fp32 or bf16) under ``module`` with CpuLinear,
    in place, loading the decode kernel (built on first use); returns how many."""
    found = swappable_linears(module, dtype)
    if found:
        cpu_kernels.load()
    for parent, name, child in found:
        setattr(parent, name, CpuLinear(child))
    return len(found)


def _swappable(module: nn.Module, dtype: torch.dtype) -> bool:
    if type(module) is not nn.Linear:
        return False
    weight = module.weight
    return weight.dtype == dtype and weight.device.type == "cpu" and weight.numel() >= MIN_SWAPPED_ELEMENTS


def swappable_linears(module: nn.Module, dtype: torch.dtype) -> list[tuple[nn.Module, str, nn.Linear]]:
    found = []
    for name, child in module.named_children():
        if _swappable(child, dtype):
            found.append((module, name, child))
        else:
            found += swappable_linears(child, dtype)
    return found
