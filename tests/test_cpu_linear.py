"""The CPU's large linears through oneDNN with weights reordered at load (device/cpu_linear.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spyre_backend.config import ConfigError, ServingConfig
from spyre_backend.device import DevicePlan, cpu_linear, resolve
from spyre_backend.device.cpu_linear import PackedLinear, pack_linears

pytestmark = pytest.mark.skipif(not cpu_linear.available(), reason="this torch has no oneDNN")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [(1,), (3,), (16,), (2, 7)])
def test_packed_linear_computes_what_linear_does(bias, rows):
    torch.manual_seed(0)
    linear = nn.Linear(512, 768, bias=bias)
    x = torch.randn(*rows, 512)
    with torch.no_grad():
        want = linear(x)
        got = PackedLinear(linear.weight, linear.bias)(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [(1,), (1, 1), (2,), (16,)])
def test_single_row_layout_computes_what_linear_does(rows):
    """A layer that keeps the single-row layout too: one row takes it, more rows the blocked one."""
    torch.manual_seed(0)
    linear = nn.Linear(512, 768)
    x = torch.randn(*rows, 512)
    packed = PackedLinear(linear.weight, linear.bias, single_row=True)
    assert packed.single_row_weight is not None
    with torch.no_grad():
        torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-5)


def test_single_row_copies_only_where_memory_allows(monkeypatch):
    def model():
        return nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 1024))

    plenty, tight = model(), model()
    assert pack_linears(plenty, single_row=True) == 2
    assert all(m.single_row_weight is not None for m in plenty)
    monkeypatch.setattr(cpu_linear, "available_memory_bytes", lambda: 4 * 3 * 2**20)  # copies: 3 MiB: fits
    assert pack_linears(tight, single_row=True) == 2 and tight[1].single_row_weight is not None
    tight = model()
    monkeypatch.setattr(cpu_linear, "available_memory_bytes", lambda: 4 * 3 * 2**20 - 1)
    assert pack_linears(tight, single_row=True) == 2
    assert all(m.single_row_weight is None for m in tight)  # still packed, one layout only
    assert all(m.single_row_weight is None for m in (lambda m: (pack_linears(m), m)[1])(model()))


def test_only_large_fp32_linears_are_swapped():
    model = nn.Sequential(
        nn.Linear(512, 512),  # 1 MiB of weight: swapped
        nn.Linear(512, 256),  # below the threshold: MKL is as fast
        nn.MultiheadAttention(512, 8),  # its out_proj is a Linear subclass read through .weight
        nn.Sequential(nn.Linear(1024, 512, bias=False)),  # nested: swapped
        nn.Linear(512, 512).to(torch.bfloat16),
    )
    assert pack_linears(model) == 2
    assert [type(m) for m in (model[0], model[1], model[3][0], model[4])] == [PackedLinear, nn.Linear, PackedLinear, nn.Linear]
    assert type(model[2].out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear


def test_device_plan_prepares_only_the_cpu_with_onednn():
    def model():
        return nn.Sequential(nn.Linear(512, 512))

    assert resolve("cpu", "eager", torch.float32).prepare(model()) == 1  # the default
    assert resolve("cpu", "eager", torch.float32, "mkl").prepare(model()) == 0
    assert DevicePlan("spyre", "sendnn", torch.float16).prepare(model()) == 0  # sendnn compiles the graph as written
    with pytest.raises(ConfigError, match="'cpu_gemm'"):
        ServingConfig.from_strings({"cpu_gemm": "blas"})


def test_packed_linear_compiles_with_inductor_over_symbolic_rows():
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 1024), nn.GELU(), nn.Linear(1024, 512, bias=False)).eval()
    packed = nn.Sequential(*[PackedLinear(m.weight, m.bias) if isinstance(m, nn.Linear) else m for m in model]).eval()
    torch._dynamo.reset()
    compiled = torch.compile(packed, backend="inductor", dynamic=False)
    with torch.no_grad():
        first = torch.randn(4, 512)
        torch._dynamo.mark_dynamic(first, 0)
        compiled(first)
        graphs = counters["stats"]["unique_graphs"]
        for rows in (2, 8, 64):
            x = torch.randn(rows, 512)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == graphs  # one graph for every row count


def test_engine_with_every_linear_packed_matches_transformers(checkpoint, reference, monkeypatch):
    """The shipped checkpoint's weights are all below the threshold; with none left on MKL, greedy
    output through the engine still equals transformers' generate()."""
    from tests.test_engine import CASES, make_stack

    monkeypatch.setattr(cpu_linear, "MIN_PACKED_ELEMENTS", 0)
    stack = make_stack(checkpoint)
    try:
        assert stack.engine.probe.layers_prepared > 0 and stack.enc.layers_prepared > 0
        handles = [stack.submit(q, imgs) for q, imgs in CASES]  # batched together
        for (q, imgs), handle in zip(CASES, handles):
            assert handle.wait().text == reference.generate(reference.chat_prompt(q, len(imgs)), imgs, 20)["text"]
    finally:
        stack.service.shutdown()


def test_bf16_linears_keep_their_weights_and_match_torch():
    """bf16 weights are not copied or reordered (Bf16Linear holds the loaded tensor); a decode
    step's few rows run our kernel where it built, more rows torch's linear (or fp32 where the CPU
    has no bf16 arithmetic). Every row count equals the fp32 product to bf16 rounding."""
    torch.manual_seed(0)
    reference = nn.Linear(512, 1024).to(torch.bfloat16)
    model = nn.Sequential(nn.Linear(512, 1024).to(torch.bfloat16))
    model[0].load_state_dict(reference.state_dict())
    loaded = model[0].weight
    assert resolve("cpu", "eager", torch.bfloat16).prepare(model, single_row=True) == 1
    assert type(model[0]) is cpu_linear.Bf16Linear and model[0].weight is loaded
    with torch.no_grad():
        for rows in (1, 2, 3, 4, 5, 8, 64):
            x = torch.randn(rows, 512, dtype=torch.bfloat16)
            want = nn.functional.linear(x.float(), reference.weight.float(), reference.bias.float())
            got = model(x)
            assert got.dtype == torch.bfloat16 and got.shape == (rows, 1024)
            torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=2e-2)
