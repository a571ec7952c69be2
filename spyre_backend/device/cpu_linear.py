"""Linear layers on the CPU through oneDNN, with each weight reordered once at load.

PyTorch's fp32 ``nn.Linear`` on the CPU calls MKL's sgemm on the weight as stored. On these
machines that is slow exactly where serving spends its time: the mid-size decoder's matmuls for a
decode step (M = the batch, 1 to 16 rows) ran at 6-15 GB/s, and batch 4 took twice as long as
batch 1. oneDNN, with the weight reordered into its blocked layout once, ran the same matmuls 2-4x
faster and prefill-size ones (M = 512) ~1.5x faster (README, CPU matmuls).

The reordered weight replaces the original, so memory does not grow (a tied LM head gets its own
copy; the embedding keeps the original). Inductor's own route to prepacked weights (freezing) puts
a copy of every weight into each compiled graph: one more copy of the model per graph.

Small weights stay on MKL: a oneDNN call costs ~25 us however small the matmul, MKL's ~9 us, and
below ~1 MiB of weight MKL was as fast or faster. Only exact ``nn.Linear`` modules are swapped
(subclasses such as ``MultiheadAttention``'s projection are read through ``.weight``).
"""

from __future__ import annotations

import torch
from torch import nn

MIN_PACKED_ELEMENTS = 1 << 18  # 1 MiB of fp32 weight: 512 x 512 was the smallest shape oneDNN won
# oneDNN picks its blocking for this many rows: the largest decode batch. With it every row count
# measured (M = 1..1458, the mid-size model's shapes) ran faster than MKL. A hint of 1 made batch 1
# ~15 % faster and batch 16 ~45 % slower; 128 was level with 16.
_ROWS_HINT = 16

# A plain dispatcher op, not torch.library.custom_op: that wrapper cost ~30 us a call, this ~3 us.
# Inductor lowers oneDNN's own linear op only for weights it packed itself (freezing); through
# this op the call stays opaque to it and runs as written, the weight an ordinary graph input.
_LIBRARY = torch.library.Library("spyre_backend", "DEF")
_LIBRARY.define("packed_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


_LIBRARY.impl("packed_linear", _linear, "CompositeExplicitAutograd")


@torch.library.register_fake("spyre_backend::packed_linear")
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def available() -> bool:
    return torch.backends.mkldnn.is_available()


class PackedLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` held in oneDNN's blocked layout (inference only)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), _ROWS_HINT)
        self.bias = None if bias is None else bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.spyre_backend.packed_linear.default(x, self.packed_weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _packable(module: nn.Module) -> bool:
    if type(module) is not nn.Linear:
        return False
    weight = module.weight
    return weight.dtype == torch.float32 and weight.device.type == "cpu" and weight.numel() >= MIN_PACKED_ELEMENTS


def pack_linears(module: nn.Module) -> int:
    """Replaces every large fp32 ``nn.Linear`` under ``module`` (in place); returns how many."""
    swapped = 0
    for name, child in list(module.named_children()):
        if _packable(child):
            setattr(module, name, PackedLinear(child.weight, child.bias))
            swapped += 1
        else:
            swapped += pack_linears(child)
    return swapped
