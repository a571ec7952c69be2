"""Opt-in int8 weight-only linears (``quantization: int8``): the LLM decoder reads one byte a
weight instead of two (bf16) or four (fp32), for a decode step bound by reading its weights.

The quantizer is torchao's (``quantize_`` with ``Int8WeightOnlyConfig``: symmetric, one scale per
output row); nothing here rounds a weight. Activations stay in the model's dtype. What runs the
matmul with the quantized weight:

- On the CPU, a decode step's few rows (up to ``cpu_kernels.MAX_ROWS``) run our decode kernel,
  which reads the int8 weight at memory speed and applies the scale to each fp32 sum (an 8192 x
  2048 weight at one row: 0.8 ms, 20 GB/s, where torch's ``_weight_int8pack_mm`` took 1.4 ms at
  12 GB/s; cpu_kernels.py). More rows up to ``INT8_MM_MAX_ROWS`` (larger decode batches, a mixed
  step; up to ``NATIVE_BF16_INT8_MM_MAX_ROWS`` where the CPU has bf16 arithmetic) run torch's
  ``_weight_int8pack_mm``, and more still (prefill chunks, mixed steps) a dense matmul on the weight
  converted to the compute dtype for that call, into a buffer kept per weight shape: that kernel is
  built for few rows (at 512 rows it took 15x a dense matmul's time), and its fp32 path is slow at
  every row count (18-24 ms for one row of 16384 x 2048), so with fp32 activations only the decode
  kernel's rows stay int8.
  The computation is torchao's (``x @ W_int8.T * scale``), in one opaque op, so eager and inductor
  run the same kernels.
- On CUDA, torchao's quantized tensor as ``quantize_`` leaves it (its own linear).

Only the LLM decoder's ``nn.Linear`` layers are quantized, the LM head included: at the 2b shape
(49156 x 2048) it is the largest single read of a decode step, and on the tiny checkpoint the
first-step KL was the same with it exact (docs/benchmarks.md, int8); a tied head gets an int8 copy
and the embedding keeps the original. The embedding and the vision tower stay as loaded. torchao
is imported only when int8 is asked for.
"""

from __future__ import annotations

import torch
from torch import nn

from spyre_backend.device import cpu_kernels
from spyre_backend.device.cpu_linear import has_native_bf16

# Up to 32 rows through the int8 kernel: a decode batch of 16, or a measured 16-token mixed chunk
# with its decode rows (at 16 it ran mixed steps converted: ITL p50 ~2 s at 4 streams on the 2b
# shape). An 8192 x 2048 weight: 7.9 ms at 16 rows, 14.8 at 32, 20.6 at 48 and 27.7 at 64 in it;
# 18-22 ms converted (2026-12-07, docs/benchmarks.md, int8).
INT8_MM_MAX_ROWS = {torch.bfloat16: 32, torch.float16: 32, torch.float32: 1}
# Where the CPU has bf16 arithmetic (AMX), from 9 rows on the weight converted to bf16 (into a kept
# buffer: _converted) and oneDNN's bf16 matmul were faster: 8192 x 2048 at 16 / 32 / 64 rows 4.4 /
# 4.9 / 7.0 ms against 7.1 / 11.5 / 21.8; at 8 rows level (2026-12-07).
NATIVE_BF16_INT8_MM_MAX_ROWS = 8

_LIBRARY = torch.library.Library("spyre_backend", "FRAGMENT")  # cpu_linear defines the namespace
_LIBRARY.define("int8_linear(Tensor x, Tensor weight, Tensor scale, Tensor? bias) -> Tensor")


def _int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    if 0 < rows.shape[0] <= cpu_kernels.MAX_ROWS and cpu_kernels.ready():
        y = torch.ops.spyre_kernels.decode_gemv(rows, weight, scale)
    elif rows.shape[0] <= (NATIVE_BF16_INT8_MM_MAX_ROWS if x.dtype == torch.bfloat16 and has_native_bf16()
                           else INT8_MM_MAX_ROWS.get(x.dtype, 0)):
        y = torch._weight_int8pack_mm(rows.contiguous(), weight, scale)
    else:  # converted for this call, in fp32 where the CPU has no bf16 arithmetic
        compute = torch.float32 if x.dtype == torch.bfloat16 and not has_native_bf16() else x.dtype
        y = (nn.functional.linear(rows.to(compute), _converted(weight, compute)) * scale.to(compute)).to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _converted(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight`` in ``dtype`` (exact: an int8 fits any float's mantissa), written into a buffer kept
    for its shape: a fresh 32 MiB one is mapped and faulted in on every call (8192 x 2048 to bf16:
    13-15 ms fresh, 2 ms into the kept buffer). One buffer per weight shape (the 2b decoder: ~0.3
    GiB in bf16, twice that in fp32); the engine runs one step at a time."""
    key = (tuple(weight.shape), dtype)
    buffer = _CONVERSION_BUFFERS.get(key)
    if buffer is None:
        buffer = _CONVERSION_BUFFERS[key] = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    return buffer.copy_(weight)


_CONVERSION_BUFFERS: dict[tuple, torch.Tensor] = {}  # only _converted uses these
_LIBRARY.impl("int8_linear", _int8_linear, "CompositeExplicitAutograd")


@torch.library.register_fake("spyre_backend::int8_linear")
def _(x, weight, scale, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


class Int8Linear(nn.Module):
    """``y = (x @ W_int8.T) * scale + b``, from a linear torchao quantized (inference only)."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = linear.weight.shape
        self.weight = linear.weight.qdata.contiguous()  # int8 [out, in]
        self.scale = linear.weight.scale.reshape(-1).to(dtype)  # as torchao applies it: in the activation dtype
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.spyre_backend.int8_linear.default(x, self.weight, self.scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_linears(module: nn.Module, dtype: torch.dtype) -> int:
    """Quantizes every ``nn.Linear`` under ``module`` to int8 weights, in place; ``dtype``: the
    activations'. Returns how many."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_  # only where int8 is asked for

    def wanted(child: nn.Module, _name: str = "") -> bool:
        return type(child) is nn.Linear  # exact: subclasses may read .weight themselves

    found = [(parent, name) for parent in module.modules() for name, child in parent.named_children() if wanted(child)]
    # set_inductor_config=False: torchao would otherwise change inductor's settings process-wide
    quantize_(module, Int8WeightOnlyConfig(set_inductor_config=False), filter_fn=wanted)
    if any(getattr(parent, name).weight.device.type == "cpu" for parent, name in found):
        cpu_kernels.load()
    for parent, name in found:
        linear = getattr(parent, name)
        if linear.weight.device.type == "cpu":
            setattr(parent, name, Int8Linear(linear, dtype))
    return len(found)
