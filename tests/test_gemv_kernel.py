"""The decode kernel (device/kernels/decode_gemv.cpp): built here, for bf16, int8 and fp32 weights
equal to the fp32 product up to the order of its sums, and its fallback when it cannot be built."""

import shutil

import pytest
import torch

from spyre_backend.device import gemv_kernel

needs_compiler = pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="no C++ compiler")

# K: whole cache lines, a tail, shorter than a vector; N: not a multiple of a task's rows
SHAPES = ((1000, 2048), (130, 100), (7, 5), (64, 8192))


@needs_compiler
@pytest.mark.parametrize("activations", [torch.bfloat16, torch.float32])
def test_the_kernel_builds_and_equals_the_fp32_product_for_bf16_weights(activations):
    assert gemv_kernel.load() and gemv_kernel.ready()
    torch.manual_seed(0)
    for n, k in SHAPES:
        weight = torch.randn(n, k).to(torch.bfloat16)
        for rows in range(1, gemv_kernel.MAX_ROWS + 1):
            x = torch.randn(rows, k).to(activations)
            got = torch.ops.spyre_kernels.decode_gemv(x, weight)
            want = torch.nn.functional.linear(x.float(), weight.float())
            assert got.dtype == activations and got.shape == (rows, n)
            # fp32 sums in another order, then (bf16 activations) one rounding to 8 bits of mantissa
            tolerance = 2 ** -7 if activations == torch.bfloat16 else 1e-5
            torch.testing.assert_close(got.float(), want, rtol=tolerance, atol=1e-3 * k ** 0.5)
            assert torch.equal(got, torch.ops.spyre_kernels.decode_gemv(x, weight))  # deterministic


@needs_compiler
def test_int8_weights_are_scaled_per_output_row():
    assert gemv_kernel.load()
    torch.manual_seed(0)
    for n, k in SHAPES:
        weight = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        scale = torch.rand(n) / 100
        for rows in range(1, gemv_kernel.MAX_ROWS + 1):
            x = torch.randn(rows, k)
            want = (x.double() @ weight.double().T) * scale.double()
            got = torch.ops.spyre_kernels.decode_gemv(x, weight, scale)
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * k ** 0.5)
            # bf16 activations and scale, as torchao's quantized linear has them
            got = torch.ops.spyre_kernels.decode_gemv(x.to(torch.bfloat16), weight, scale.to(torch.bfloat16))
            want = (x.to(torch.bfloat16).double() @ weight.double().T) * scale.to(torch.bfloat16).double()
            assert got.dtype == torch.bfloat16
            torch.testing.assert_close(got.double(), want, rtol=2 ** -7, atol=1e-3 * k ** 0.5)


@needs_compiler
def test_fp32_weights_match_torch():
    assert gemv_kernel.load()
    torch.manual_seed(0)
    for n, k in SHAPES:
        weight = torch.randn(n, k)
        for rows in range(1, gemv_kernel.MAX_ROWS + 1):
            x = torch.randn(rows, k)
            torch.testing.assert_close(torch.ops.spyre_kernels.decode_gemv(x, weight),
                                       torch.nn.functional.linear(x, weight), rtol=1e-5, atol=1e-5 * k ** 0.5)


@needs_compiler
def test_the_kernel_names_its_limits():
    assert gemv_kernel.load()
    weight = torch.randn(16, 32).to(torch.bfloat16)
    gemv = torch.ops.spyre_kernels.decode_gemv
    with pytest.raises(RuntimeError, match="1 to 4 rows"):
        gemv(torch.randn(5, 32), weight)
    with pytest.raises(RuntimeError, match="bf16, int8 or fp32"):
        gemv(torch.randn(1, 32), weight.half())
    with pytest.raises(RuntimeError, match="contiguous and 2-D"):
        gemv(torch.randn(1, 16), weight.T)
    with pytest.raises(RuntimeError, match=r"x must be \[rows, 32\]"):
        gemv(torch.randn(1, 31), weight)
    int8 = torch.zeros(16, 32, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="int8 weight needs its scale"):
        gemv(torch.randn(1, 32), int8)
    with pytest.raises(RuntimeError, match="int8 weight needs its scale"):
        gemv(torch.randn(1, 32), weight, torch.ones(16))
    with pytest.raises(RuntimeError, match=r"one scale per output row \(16\)"):
        gemv(torch.randn(1, 32), int8, torch.ones(15))


def test_without_a_compiler_or_when_turned_off_the_kernel_is_not_used(monkeypatch, tmp_path):
    monkeypatch.setenv("SPYRE_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(gemv_kernel, "_compiler", lambda: None)
    assert gemv_kernel._load() is False
    monkeypatch.setenv("SPYRE_GEMV_KERNEL", "0")
    monkeypatch.setattr(gemv_kernel, "_compiler", lambda: pytest.fail("not asked for"))
    assert gemv_kernel._load() is False
    assert not list(tmp_path.iterdir())


def test_a_failed_build_says_why_and_leaves_nothing_in_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SPYRE_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(gemv_kernel, "_compiler", lambda: "false")  # a "compiler" that always fails
    monkeypatch.setattr(gemv_kernel, "_library_path", lambda compiler: tmp_path / "decode_gemv-x.so")
    with pytest.raises(RuntimeError, match="compiling decode_gemv.cpp failed"):
        gemv_kernel.build("false")
    assert gemv_kernel._load() is False
    assert [p.name for p in tmp_path.iterdir()] == [".build.lock"]
