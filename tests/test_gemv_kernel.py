"""The bf16 decode kernel (device/kernels/bf16_gemv.cpp): built here, exact to fp32 sums, and its
fallback when it cannot be built."""

import shutil

import pytest
import torch

from spyre_backend.device import gemv_kernel

needs_compiler = pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="no C++ compiler")


@needs_compiler
def test_the_kernel_builds_and_equals_the_fp32_product_rounded_to_bf16():
    assert gemv_kernel.load()
    torch.manual_seed(0)
    # K: whole vectors, a tail, shorter than a vector; N: not a multiple of a task's 64 rows
    for n, k in ((1000, 2048), (130, 100), (7, 5), (64, 8192)):
        weight = torch.randn(n, k).to(torch.bfloat16)
        for rows in range(1, gemv_kernel.MAX_ROWS + 1):
            x = torch.randn(rows, k).to(torch.bfloat16)
            got = torch.ops.spyre_kernels.bf16_gemv(x, weight)
            want = torch.nn.functional.linear(x.float(), weight.float())
            assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
            # fp32 sums in another order, then one rounding to bf16 (8 bits of mantissa)
            torch.testing.assert_close(got.float(), want, rtol=2 ** -7, atol=1e-3 * k ** 0.5)
            assert torch.equal(got, torch.ops.spyre_kernels.bf16_gemv(x, weight))  # deterministic


@needs_compiler
def test_the_kernel_names_its_limits():
    assert gemv_kernel.load()
    weight = torch.randn(16, 32).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="1 to 4 rows"):
        torch.ops.spyre_kernels.bf16_gemv(torch.randn(5, 32).to(torch.bfloat16), weight)
    with pytest.raises(RuntimeError, match="contiguous 2-D bf16"):
        torch.ops.spyre_kernels.bf16_gemv(torch.randn(1, 32), weight.float())
    with pytest.raises(RuntimeError, match=r"x must be \[rows, 32\]"):
        torch.ops.spyre_kernels.bf16_gemv(torch.randn(1, 31).to(torch.bfloat16), weight)


def test_without_a_compiler_or_when_turned_off_the_kernel_is_not_used(monkeypatch, tmp_path):
    monkeypatch.setenv("SPYRE_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(gemv_kernel, "_compiler", lambda: None)
    assert gemv_kernel._load() is False
    monkeypatch.setenv("SPYRE_BF16_GEMV", "0")
    monkeypatch.setattr(gemv_kernel, "_compiler", lambda: pytest.fail("not asked for"))
    assert gemv_kernel._load() is False
    assert not list(tmp_path.iterdir())


def test_a_failed_build_says_why_and_leaves_nothing_in_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SPYRE_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(gemv_kernel, "_compiler", lambda: "false")  # a "compiler" that always fails
    monkeypatch.setattr(gemv_kernel, "_library_path", lambda compiler: tmp_path / "bf16_gemv-x.so")
    with pytest.raises(RuntimeError, match="compiling bf16_gemv.cpp failed"):
        gemv_kernel.build("false")
    assert gemv_kernel._load() is False
    assert [p.name for p in tmp_path.iterdir()] == [".build.lock"]
