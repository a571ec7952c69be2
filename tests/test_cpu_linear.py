"""The CPU's large linears: weights kept as loaded, our decode kernel for few rows, oneDNN or torch
for many (device/cpu_linear.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spyre_backend.config import ConfigError, ServingConfig
from spyre_backend.device import DevicePlan, cpu_linear, cpu_kernels, resolve
from spyre_backend.device.cpu_linear import CpuLinear, cpu_linears

pytestmark = pytest.mark.skipif(not cpu_linear.available(), reason="this torch has no oneDNN")


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [(1,), (3,), (1, 4), (16,), (2, 7)])
def test_cpu_linear_computes_what_linear_does(bias, rows, kernel, monkeypatch):
    """Up to MAX_ROWS rows through the decode kernel (where it built), more through oneDNN; both
    with the kernel off."""
    if kernel and not cpu_kernels.load():
        pytest.skip("the decode kernel did not build here")
    monkeypatch.setattr(cpu_kernels, "ready", lambda: kernel)
    torch.manual_seed(0)
    linear = nn.Linear(512, 768, bias=bias)
    x = torch.randn(*rows, 512)
    with torch.no_grad():
        want = linear(x)
        got = CpuLinear(linear)(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_weights_are_kept_as_loaded_and_a_tied_head_shares_the_embedding():
    """One copy of each weight: what the decode kernel reads is what was loaded."""
    embedding = nn.Embedding(1000, 512)
    head = nn.Linear(512, 1000, bias=False)
    head.weight = embedding.weight
    model = nn.Sequential(nn.Linear(512, 1024), head)
    loaded = [p.data_ptr() for p in model.parameters()]
    assert cpu_linears(model, torch.float32) == 2
    assert all(type(m) is CpuLinear for m in model)
    assert model[1].weight is embedding.weight
    assert [p.data_ptr() for p in model.parameters()] == loaded


def test_only_large_fp32_linears_are_swapped():
    model = nn.Sequential(
        nn.Linear(512, 512),  # 1 MiB of weight: swapped
        nn.Linear(512, 256),  # below the threshold: MKL is as fast
        nn.MultiheadAttention(512, 8),  # its out_proj is a Linear subclass read through .weight
        nn.Sequential(nn.Linear(1024, 512, bias=False)),  # nested: swapped
        nn.Linear(512, 512).to(torch.bfloat16),
    )
    assert cpu_linears(model, torch.float32) == 2
    assert [type(m) for m in (model[0], model[1], model[3][0], model[4])] == [CpuLinear, nn.Linear, CpuLinear, nn.Linear]
    assert type(model[2].out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear


def test_device_plan_prepares_only_the_cpu_with_onednn():
    def model():
        return nn.Sequential(nn.Linear(512, 512))

    assert resolve("cpu", "eager", torch.float32).prepare(model()) == 1  # the default
    assert resolve("cpu", "eager", torch.float32, "mkl").prepare(model()) == 0
    assert DevicePlan("spyre", "sendnn", torch.float16).prepare(model()) == 0  # sendnn compiles the graph as written
    with pytest.raises(ConfigError, match="'cpu_gemm'"):
        ServingConfig.from_strings({"cpu_gemm": "blas"})


def test_cpu_linear_compiles_with_inductor_over_symbolic_rows():
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 1024), nn.GELU(), nn.Linear(1024, 512, bias=False)).eval()
    swapped = nn.Sequential(*[CpuLinear(m) if isinstance(m, nn.Linear) else m for m in model]).eval()
    torch._dynamo.reset()
    compiled = torch.compile(swapped, backend="inductor", dynamic=False)
    with torch.no_grad():
        first = torch.randn(4, 512)
        torch._dynamo.mark_dynamic(first, 0)
        compiled(first)
        graphs = counters["stats"]["unique_graphs"]
        for rows in (2, 8, 64):
            x = torch.randn(rows, 512)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == graphs  # one graph for every row count


def test_engine_with_every_linear_swapped_matches_transformers(checkpoint, reference, monkeypatch):
    """The shipped checkpoint's weights are all below the threshold; with none left on MKL, greedy
    output through the engine still equals transformers' generate()."""
    from tests.test_engine import CASES, make_stack

    monkeypatch.setattr(cpu_linear, "MIN_SWAPPED_ELEMENTS", 0)
    stack = make_stack(checkpoint)
    try:
        assert stack.engine.probe.layers_prepared > 0 and stack.enc.layers_prepared > 0
        handles = [stack.submit(q, imgs) for q, imgs in CASES]  # batched together
        for (q, imgs), handle in zip(CASES, handles):
            assert handle.wait().text == reference.generate(reference.chat_prompt(q, len(imgs)), imgs, 20)["text"]
    finally:
        stack.service.shutdown()


def test_bf16_linears_keep_their_weights_and_match_torch():
    """bf16 weights are not copied or reordered (CpuLinear holds the loaded tensor); a decode
    step's few rows run our kernel where it built, more rows torch's linear (or fp32 where the CPU
    has no bf16 arithmetic). Every row count equals the fp32 product to bf16 rounding."""
    torch.manual_seed(0)
    reference = nn.Linear(512, 1024).to(torch.bfloat16)
    model = nn.Sequential(nn.Linear(512, 1024).to(torch.bfloat16))
    model[0].load_state_dict(reference.state_dict())
    loaded = model[0].weight
    assert resolve("cpu", "eager", torch.bfloat16).prepare(model, decoder=True) == 1
    assert type(model[0]) is cpu_linear.CpuLinear and model[0].weight is loaded
    with torch.no_grad():
        for rows in (1, 2, 3, 4, 5, 8, 64):
            x = torch.randn(rows, 512, dtype=torch.bfloat16)
            want = nn.functional.linear(x.float(), reference.weight.float(), reference.bias.float())
            got = model(x)
            assert got.dtype == torch.bfloat16 and got.shape == (rows, 1024)
            torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=2e-2)
