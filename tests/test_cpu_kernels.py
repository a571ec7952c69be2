"""The CPU's decode kernels (device/kernels/), built here: decode_gemv for bf16, int8 and fp32 weights
equal to the fp32 product up to the order of its sums; decode_attention equal to the gather path's
attention (and to fp64); and the fallback when they cannot be built."""

import shutil

import pytest
import torch

from spyre_backend.device import cpu_kernels

needs_compiler = pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="no C++ compiler")

# K: whole cache lines, a tail, shorter than a vector; N: not a multiple of a task's rows
SHAPES = ((1000, 2048), (130, 100), (7, 5), (64, 8192))


@needs_compiler
@pytest.mark.parametrize("activations", [torch.bfloat16, torch.float32])
def test_the_kernel_builds_and_equals_the_fp32_product_for_bf16_weights(activations):
    assert cpu_kernels.load() and cpu_kernels.ready()
    torch.manual_seed(0)
    for n, k in SHAPES:
        weight = torch.randn(n, k).to(torch.bfloat16)
        for rows in range(1, cpu_kernels.MAX_ROWS + 1):
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
    assert cpu_kernels.load()
    torch.manual_seed(0)
    for n, k in SHAPES:
        weight = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        scale = torch.rand(n) / 100
        for rows in range(1, cpu_kernels.MAX_ROWS + 1):
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
    assert cpu_kernels.load()
    torch.manual_seed(0)
    for n, k in SHAPES:
        weight = torch.randn(n, k)
        for rows in range(1, cpu_kernels.MAX_ROWS + 1):
            x = torch.randn(rows, k)
            torch.testing.assert_close(torch.ops.spyre_kernels.decode_gemv(x, weight),
                                       torch.nn.functional.linear(x, weight), rtol=1e-5, atol=1e-5 * k ** 0.5)


@needs_compiler
def test_the_kernel_names_its_limits():
    assert cpu_kernels.load()
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


def _paged(dtype, *, blocks=40, block_size=16, kv_heads=2, head_dim=64, seed=0):
    torch.manual_seed(seed)
    shape = (blocks, block_size, kv_heads, head_dim)
    return torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)


def _visible(positions, ctx_blocks, block_size):
    """The model runner's decode mask: cached token i is seen by a row at position p where i <= p."""
    return torch.arange(ctx_blocks * block_size).view(1, -1) <= torch.tensor(positions).view(-1, 1)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 24, 8])  # whole vectors, a tail, shorter than a vector
def test_decode_attention_equals_the_gather_path(dtype, group, head_dim):
    from spyre_backend.engine import attention

    assert cpu_kernels.load()
    kv_heads, block_size = 2, 16
    keys, values = _paged(dtype, kv_heads=kv_heads, head_dim=head_dim)
    for rows, ctx_blocks in ((1, 1), (3, 5), (5, 12)):
        table = torch.stack([torch.randperm(39)[:ctx_blocks] + 1 for _ in range(rows)])
        positions = [int(p) for p in torch.randint(0, ctx_blocks * block_size, (rows,))]
        positions[0] = ctx_blocks * block_size - 1  # a row that sees its whole table
        visible = _visible(positions, ctx_blocks, block_size)
        query = torch.randn(rows, 1, kv_heads * group, head_dim).to(dtype)
        scale = head_dim ** -0.5
        got = torch.ops.spyre_kernels.decode_attention(query.view(rows, -1, head_dim), keys, values, table, visible,
                                                       scale)
        assert got.dtype == dtype and got.shape == (rows, kv_heads * group, head_dim)
        mask = visible.view(rows, 1, 1, -1)
        exact = attention._compute(query.double(), keys.double(), values.double(), kv_heads * group, kv_heads, 0.0,
                                   scale, block_table=table, mask=mask)[:, 0]
        gathered = attention._compute(query, keys, values, kv_heads * group, kv_heads, 0.0, scale,
                                      block_table=table, mask=mask)[:, 0]
        # fp32 sums in another order than SDPA's, then (bf16) one rounding of the output
        tolerance = 2 ** -7 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(got.double(), exact, rtol=tolerance, atol=tolerance)
        assert (got.double() - exact).abs().max() <= (gathered.double() - exact).abs().max() * 2 + 1e-6
        assert torch.equal(got, torch.ops.spyre_kernels.decode_attention(
            query.view(rows, -1, head_dim), keys, values, table, visible, scale))  # deterministic


@needs_compiler
def test_decode_attention_reads_only_the_visible_tokens_of_its_own_blocks():
    assert cpu_kernels.load()
    keys, values = _paged(torch.float32, blocks=8, block_size=4, kv_heads=1, head_dim=16)
    table = torch.tensor([[3, 5]])
    query = torch.randn(1, 2, 16)
    visible = _visible([5], 2, 4)
    got = torch.ops.spyre_kernels.decode_attention(query, keys, values, table, visible, 0.25)
    # what is not read may be anything: other blocks, and the hidden tail of the row's last block
    keys[[0, 1, 2, 4, 6, 7]] = float("nan")
    values[[0, 1, 2, 4, 6, 7]] = float("nan")
    keys[5, 2:], values[5, 2:] = float("nan"), float("nan")
    assert torch.equal(got, torch.ops.spyre_kernels.decode_attention(query, keys, values, table, visible, 0.25))


@needs_compiler
def test_decode_attention_names_its_limits():
    assert cpu_kernels.load()
    keys, values = _paged(torch.float32, blocks=4, block_size=4, kv_heads=2, head_dim=8)
    attend = torch.ops.spyre_kernels.decode_attention
    table, visible = torch.tensor([[1, 2]]), _visible([3], 2, 4)
    with pytest.raises(RuntimeError, match="bf16 or fp32"):
        attend(torch.randn(1, 4, 8), keys.half(), values.half(), table, visible, 1.0)
    with pytest.raises(RuntimeError, match="pools must match"):
        attend(torch.randn(1, 4, 8), keys, values[:2], table, visible, 1.0)
    with pytest.raises(RuntimeError, match=r"\[rows, heads, 8\] with heads a multiple of 2"):
        attend(torch.randn(1, 3, 8), keys, values, table, visible, 1.0)
    with pytest.raises(RuntimeError, match="1, 2, 4, 8 or 16 query heads per kv head, got 3"):
        attend(torch.randn(1, 6, 8), keys, values, table, visible, 1.0)
    with pytest.raises(RuntimeError, match=r"visible must be bool \[rows, 8\]"):
        attend(torch.randn(1, 4, 8), keys, values, table, visible[:, :7], 1.0)
    with pytest.raises(RuntimeError, match="block 4 is not in the pool"):
        attend(torch.randn(1, 4, 8), keys, values, torch.tensor([[1, 4]]), visible, 1.0)


def test_without_a_compiler_or_when_turned_off_the_kernel_is_not_used(monkeypatch, tmp_path):
    monkeypatch.setenv("SPYRE_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_kernels, "_compiler", lambda: None)
    assert cpu_kernels._load() is False
    monkeypatch.setenv("SPYRE_CPU_KERNELS", "0")
    monkeypatch.setattr(cpu_kernels, "_compiler", lambda: pytest.fail("not asked for"))
    assert cpu_kernels._load() is False
    assert not list(tmp_path.iterdir())


def test_a_failed_build_says_why_and_leaves_nothing_in_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SPYRE_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_kernels, "_compiler", lambda: "false")  # a "compiler" that always fails
    monkeypatch.setattr(cpu_kernels, "_library_path", lambda compiler: tmp_path / "spyre_kernels-x.so")
    with pytest.raises(RuntimeError, match="compiling the CPU kernels in .* failed"):
        cpu_kernels.build("false")
    assert cpu_kernels._load() is False
    assert [p.name for p in tmp_path.iterdir()] == [".build.lock"]
