"""How close the model's phases come to this machine's limits.

Limits measured in the same run: fp32 matmul GFLOP/s (large square matrices, the better of MKL
and oneDNN, the two libraries the serving code's matmuls may run on) and memory bandwidth (a
large tensor copy, counted as bytes read + written, and a large reduction, bytes read; the higher
of the two is the roof). Work estimated from the model's shape:

- vision encoding: FLOPs of the SigLIP tower (patch embedding, 27 layers of attention + MLP) and
  the projector, per real crop (padding crops of a static batch are not useful work);
- prefill: FLOPs of the Granite layers on the prompt's tokens, causal attention (a token attends
  to itself and everything before it), the LM head on the last token only;
- decode step: FLOPs as for one token per sequence, and bytes read: every weight matrix once
  plus each sequence's K and V for its context.

A phase's roofline time is max(FLOPs / peak FLOP/s, bytes / bandwidth); the fraction reported
is roofline time / measured time (1.0 = at the limit). Matmul-like phases are compute bound;
decode at small batch is bandwidth bound. Useful work only: padding to static shapes (64-token
blocks, power-of-two contexts and crop batches) is counted as overhead, not work.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from spyre_backend.device import cpu_linear
from spyre_backend.engine.probe import best_time
from spyre_backend.models import spec_from_config

# -- the model's shape and its work (pure arithmetic) -----------------------------------------
@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    v_hidden: int
    v_intermediate: int
    v_layers: int
    crop: int
    patch: int
    feature_layers: int  # vision layers concatenated into the projector's input

    @classmethod
    def from_config(cls, config: dict) -> "ModelShape":
        """The shape a checkpoint's config.json dict describes."""
        spec = spec_from_config(config)
        t, v = spec.text, spec.vision
        return cls(
            hidden=t.hidden_size, layers=t.num_layers, heads=t.num_heads, kv_heads=t.kv_heads, head_dim=t.head_dim,
            intermediate=t.intermediate_size, vocab=t.vocab_size, v_hidden=v.hidden_size,
            v_intermediate=v.intermediate_size, v_layers=v.num_layers, crop=v.image_size, patch=v.patch_size,
            feature_layers=len(v.feature_layers),
        )

    @property
    def patches(self) -> int:
        return (self.crop // self.patch) ** 2

    @property
    def layer_params(self) -> int:
        """Weights of one Granite layer's matmuls: q, k, v, o and the gated MLP (gate, up, down)."""
        q = self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        return self.hidden * q + 2 * self.hidden * kv + q * self.hidden + 3 * self.hidden * self.intermediate

    @property
    def text_weight_params(self) -> int:
        """Weights a decode step reads: every layer, and the (tied) embedding matrix as LM head."""
        return self.layers * self.layer_params + self.vocab * self.hidden

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim  # elements; times the dtype size


def vision_flops(s: ModelShape, crops: int) -> float:
    p, d, f = s.patches, s.v_hidden, s.v_intermediate
    patch_embedding = 2 * p * 3 * s.patch * s.patch * d
    layer = 2 * p * (4 * d * d + 2 * d * f) + 4 * p * p * d  # projections + MLP, then QK^T and AV
    projector = 2 * p * (s.feature_layers * d * s.hidden + s.hidden * s.hidden)
    return float(crops * (patch_embedding + s.v_layers * layer + projector))


def attention_flops(s: ModelShape, queries: int, keys_each: float) -> float:
    """QK^T and AV for ``queries`` tokens attending to ``keys_each`` keys on average, all layers."""
    return 4.0 * s.heads * s.head_dim * queries * keys_each * s.layers


def prefill_flops(s: ModelShape, n: int, start: int = 0) -> float:
    """Prompt tokens start..start+n-1; token t attends to t+1 keys (causal)."""
    linear = 2.0 * n * s.layers * s.layer_params
    mean_keys = start + (n + 1) / 2
    return linear + attention_flops(s, n, mean_keys) + 2.0 * s.hidden * s.vocab


def decode_flops(s: ModelShape, batch: int, context: int) -> float:
    return batch * (2.0 * s.layers * s.layer_params + 2.0 * s.hidden * s.vocab) + attention_flops(s, batch, context)


def decode_bytes(s: ModelShape, batch: int, context: int, dtype_bytes: int = 4) -> float:
    return float(dtype_bytes * (s.text_weight_params + batch * context * s.kv_bytes_per_token))


def weight_bytes_vision(s: ModelShape, dtype_bytes: int = 4) -> float:
    layer = 4 * s.v_hidden ** 2 + 2 * s.v_hidden * s.v_intermediate
    return float(dtype_bytes * (s.v_layers * layer + s.feature_layers * s.v_hidden * s.hidden + s.hidden ** 2))


def roofline_fraction(flops: float, nbytes: float, seconds: float, peak_flops: float, bandwidth: float) -> dict:
    """Roofline time of a phase and the fraction of it achieved by ``seconds``."""
    compute_s, memory_s = flops / peak_flops, nbytes / bandwidth
    bound = max(compute_s, memory_s)
    return {"measured_ms": seconds * 1e3, "flops": flops, "bytes": nbytes, "compute_ms": compute_s * 1e3,
            "memory_ms": memory_s * 1e3, "bound": "compute" if compute_s >= memory_s else "memory",
            "achieved_gflops": flops / seconds / 1e9, "achieved_gbs": nbytes / seconds / 1e9,
            "fraction": bound / seconds}


# -- this machine's limits ----------------------------------------------------------------------
def measure_machine(sizes=(1024, 2048, 3072), copy_mib: int = 512, repeats: int = 3) -> dict:
    """Best fp32 matmul rate over a few sizes and both CPU GEMM libraries the serving code may use
    (MKL through torch.mm, oneDNN as cpu_linear calls it), and memory bandwidth
    (copy and read)."""
    matmul, onednn = {}, {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        matmul[n] = 2.0 * n ** 3 / best_time(lambda: torch.mm(a, b), repeats) / 1e9
        if cpu_linear.available():
            linear = torch.nn.Linear(n, n, bias=False)
            linear.weight.data = b.T.contiguous()
            layer = cpu_linear.CpuLinear(linear)  # a @ b as the serving code's linear
            with torch.no_grad():
                onednn[n] = 2.0 * n ** 3 / best_time(lambda: layer(a), repeats) / 1e9
    x = torch.ones(copy_mib * 2 ** 20 // 4)
    y = torch.empty_like(x)
    copy = 2.0 * x.numel() * 4 / best_time(lambda: y.copy_(x), repeats + 2) / 1e9
    read = 1.0 * x.numel() * 4 / best_time(lambda: x.sum(), repeats + 2) / 1e9
    return {"threads": torch.get_num_threads(), "matmul_gflops_by_size": matmul,
            "onednn_gflops_by_size": onednn, "matmul_gflops": max([*matmul.values(), *onednn.values()]),
            "copy_gbs": copy, "read_gbs": read,
            "bandwidth_gbs": max(copy, read)}


# -- the model's phases, timed on the serving code ---------------------------------------------
def time_vision(encoder, prompt, repeats: int = 3) -> tuple[float, int]:
    pixels, sizes = torch.from_numpy(prompt.pixel_values), torch.from_numpy(prompt.image_sizes)
    crops = sum(encoder.crops_per_image(size) for size in sizes)
    return best_time(lambda: encoder.encode(pixels, sizes), repeats), int(crops)


def analyse(shape: ModelShape, machine: dict, *, vision_s: float, crops: int, prefill_s: float, prompt_tokens: int,
            decode_s: dict[int, float], context: int) -> dict:
    peak, bandwidth = machine["matmul_gflops"] * 1e9, machine["bandwidth_gbs"] * 1e9
    out = {"shape": asdict(shape), "prompt_tokens": prompt_tokens, "crops": crops, "decode_context": context,
           "vision": roofline_fraction(vision_flops(shape, crops), weight_bytes_vision(shape), vision_s, peak,
                                       bandwidth),
           "prefill": roofline_fraction(prefill_flops(shape, prompt_tokens), decode_bytes(shape, 0, 0), prefill_s,
                                        peak, bandwidth)}
    for batch, seconds in decode_s.items():
        out[f"decode_b{batch}"] = roofline_fraction(decode_flops(shape, batch, context),
                                                    decode_bytes(shape, batch, context), seconds, peak, bandwidth)
    return out
