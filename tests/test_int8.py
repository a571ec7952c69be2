"""The opt-in int8 weight-only mode (``quantization: int8``, spyre_backend/device/quantize.py):
its validation, its linears in eager and under inductor, the default path left alone, and the
tiny checkpoint served with it against the exact path (tools/int8_quality.py measures the rest)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from spyre_backend.config import ConfigError, DeviceConfig, ServingConfig
from spyre_backend.device import cpu_kernels, plan_for, quantize, spyre
from tools import int8_quality

# Bounds from the measurement (docs/benchmarks.md, int8: 16/16 same answers, first-step KL mean
# 1.7e-6 and max 2.3e-5 in fp32): ~50x the mean, and at most one answer of the few asked differing.
MAX_MEAN_KL = 1e-4
PROMPTS = ["text_only", "landscape_200x150", "portrait_60x200", "two_images"]


def test_quantization_is_validated_and_off_by_default():
    assert DeviceConfig().quantization == "none"
    assert ServingConfig.from_strings({"quantization": "int8"}).device.quantization == "int8"
    with pytest.raises(ConfigError, match="'quantization'"):
        ServingConfig.from_strings({"quantization": "int4"})


def test_refused_on_spyre(monkeypatch):
    monkeypatch.setattr(spyre, "require", lambda: None)  # as if the Spyre stack were installed
    with pytest.raises(ConfigError, match="'quantization'.*Spyre"):
        plan_for(DeviceConfig(device="spyre", quantization="int8"))
    assert plan_for(DeviceConfig(device="spyre")).quantization == "none"


def test_default_path_never_imports_torchao_nor_changes_a_weight():
    # a fresh interpreter: the test process may have imported torchao already
    code = """
import sys, torch
from spyre_backend.config import DeviceConfig
from spyre_backend.device import plan_for
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
weights = [(l, l.weight, l.weight.detach().clone()) for l in model]
for compile_backend in ("eager", "inductor"):
    assert plan_for(DeviceConfig(device="cpu", compile_backend=compile_backend)).prepare(model, decoder=True) == 0
assert all(l.weight is w and torch.equal(w, before) for l, w, before in weights)
assert "torchao" not in sys.modules, "torchao imported"
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_int8_linears_in_eager_and_under_inductor():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 32)).to(dtype)
        many = torch.randn(40, 64, dtype=dtype)  # over INT8_MM_MAX_ROWS: the converted weight
        want = model(many)
        plan = plan_for(DeviceConfig(device="cpu", compile_backend="eager", dtype=str(dtype).removeprefix("torch."),
                                     quantization="int8"))
        assert plan.prepare(model) == 0  # what runs no single rows (the vision tower) stays as loaded
        assert plan.prepare(model, decoder=True) == 2
        assert all(isinstance(layer, quantize.Int8Linear) for layer in (model[0], model[2]))
        with torch.no_grad():
            got = model(many)
            one = model(many[:1])  # one row: torch's int8 kernel
            compiled = torch.compile(model, backend="inductor", dynamic=False)(many)
        assert (got.float() - want.float()).abs().max() <= 0.02 * want.float().abs().max()
        torch.testing.assert_close(one, got[:1], rtol=2e-2, atol=2e-3)
        torch.testing.assert_close(compiled, got, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("native_bf16", [True, False])
def test_every_row_count_takes_a_path_that_computes_the_same(monkeypatch, native_bf16):
    """The decode kernel (1-4 rows), torch's int8 kernel, the converted weight (into a buffer kept
    per shape, not grown per call): each row count equals the fp64 product to bf16 rounding."""
    cpu_kernels.load()  # where a compiler is: rows 1-4 through it
    monkeypatch.setattr(quantize, "has_native_bf16", lambda: native_bf16)
    monkeypatch.setattr(quantize, "_CONVERSION_BUFFERS", {})
    torch.manual_seed(0)
    weight = torch.randint(-127, 128, (96, 64), dtype=torch.int8)
    scale = (torch.rand(96) / 100).to(torch.bfloat16)
    for rows in (1, 4, 5, 8, 9, 16, 32, 33, 40, 40):
        x = torch.randn(rows, 64).to(torch.bfloat16)
        want = (x.double() @ weight.double().T) * scale.double()
        got = torch.ops.spyre_backend.int8_linear(x, weight, scale, None)
        assert got.dtype == torch.bfloat16 and got.shape == (rows, 96)
        torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    assert len(quantize._CONVERSION_BUFFERS) == 1  # one shape, one buffer, however many calls


def test_tiny_checkpoint_served_in_int8_answers_as_fp32(checkpoint):
    rows = int8_quality.quality(str(checkpoint), [("float32", "int8")], "eager", names=PROMPTS)["float32:int8"]
    assert sum(r["match"] for r in rows) >= len(rows) - 1, rows
    assert sum(r["kl"] for r in rows) / len(rows) <= MAX_MEAN_KL, rows
