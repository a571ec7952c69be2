"""The device layer, the static shape set, and compiled execution (inductor on the CPU)."""

from __future__ import annotations

import pytest
import torch

from spyre_backend.config import ConfigError, ServingConfig
from spyre_backend.device import DeviceError, plan_for, resolve
from spyre_backend.device.process import TORCH_DEFAULT_THREADS, apply_threads
from spyre_backend.device import spyre as spyre_device
from spyre_backend.engine import attention
from testkit.images import shape_png
from tests.test_engine import make_stack


def test_spyre_without_ibm_stack_fails_clearly():
    assert not spyre_device.available()
    with pytest.raises(RuntimeError, match="torch_sendnn"):
        resolve("spyre", None, torch.float16)
    with pytest.raises(ConfigError, match="'device'.*torch_sendnn"):
        plan_for(ServingConfig.from_strings({"device": "spyre"}).device)


def test_device_choices():
    assert resolve("auto", None, torch.float32).kind == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve("cpu", None, torch.float32).compile_backend == "inductor"  # the fast path is the default
    assert resolve("cpu", "eager", torch.float32).compile_backend == "eager"
    with pytest.raises(DeviceError, match="needs device spyre"):
        resolve("cpu", "sendnn", torch.float32)
    with pytest.raises(ConfigError, match="'compile_backend'"):
        ServingConfig.from_strings({"compile_backend": "tvm"})


def test_shape_set_is_static_and_covers_what_runs(checkpoint):
    stack = make_stack(checkpoint)
    try:
        probe = stack.engine.probe
        shapes = set(probe.shape_set())
        assert probe.prefill_align == 16  # off Spyre a prefill is padded to 16 tokens, not a block
        assert all(q % probe.prefill_align == 0 for b, q, _ in shapes if q > 1)
        assert {b for b, q, _ in shapes if q == 1} == set(probe.decode_batch_sizes)
        image = shape_png("triangle", "green", "white", (200, 150))
        handles = [stack.submit("What is in the image?", [image]), stack.submit("Say hello."),
                   stack.submit("What shape is it?", [shape_png(size=(400, 20))])]
        for h in handles:
            h.wait()
        mixed = {shape for shape in probe.shapes_run if len(shape) == 5}
        assert probe.shapes_run - mixed <= shapes  # nothing ran outside the warmed-up set
        # on the CPU a prompt chunk and the decode rows of its step ran as one pass: one row of
        # tokens, 2 blocks of context each (eager: the decode rows there are; compiled, 2 at least:
        # test_inductor_warmup_compiles_everything_and_matches_eager)
        assert probe.mixes_steps and mixed
        assert all(b == 1 and rows >= 1 and ctx >= 2 and row_ctx >= 2 for b, _, ctx, rows, row_ctx in mixed)
        assert any(rows == 1 for _, _, _, rows, _ in mixed)  # not padded to 2 where nothing compiles
        # padded as a whole, chunk and rows together, to whole blocks of rows (ModelRunner.mixed_inputs)
        assert all(tokens % probe.prefill_align == 0 for _, tokens, _, _, _ in mixed)
    finally:
        stack.service.shutdown()


def test_inductor_warmup_compiles_everything_and_matches_eager(checkpoint):
    import torch._dynamo
    from torch._dynamo.utils import counters

    small = {"max_context": "256", "prefill_chunk": "64", "max_running": "2", "decode_batch_sizes": "2",
             "device": "cpu"}
    torch._dynamo.reset()
    graphs_before = counters["stats"]["unique_graphs"]  # other tests of this process compiled too
    compiled = make_stack(checkpoint, compile_backend="inductor", **small)
    eager = make_stack(checkpoint, compile_backend="eager", **small)
    try:
        probe = compiled.engine.probe
        # on the CPU decode rows attend in place, compiled or eager (the kernel, where it builds)
        assert probe.attn_name == eager.engine.probe.attn_name == attention.FUSED_DECODE_ATTN_NAME
        graphs_after_warmup = counters["stats"]["unique_graphs"]
        # bucketed dims are symbolic for inductor: fewer graphs than shapes, every warmup shape ran
        # (and the shapes of warmup's real requests)
        warmed = set(probe.shapes_run)
        assert set(probe.warmup_shapes()) | {probe.mixed_warmup_shape} <= warmed
        assert 0 < graphs_after_warmup - graphs_before < len(warmed)
        assert set(probe.warmup_shapes()) < set(probe.shape_set())
        compiled.engine.seal()  # as the granite_llm stub does after warmup: nothing may compile from here
        traffic = [("What is in the image?", [shape_png("triangle", "green", "white", (200, 150))]),
                   ("Say hello.", []), ("What is the capital of France?", [])]
        got = [compiled.submit(q, imgs, max_tokens=12) for q, imgs in traffic]  # batched together
        want = [eager.submit(q, imgs, max_tokens=12).wait().text for q, imgs in traffic]
        assert [h.wait().text for h in got] == want
        for words in (2, 9, 14):  # alone, so each runs a plain prefill: lengths warmup did not run
            question = " ".join(["Please"] * words) + " say hello."
            assert compiled.submit(question, [], max_tokens=4).wait().text == eager.submit(question, [], max_tokens=4).wait().text
        assert counters["stats"]["unique_graphs"] == graphs_after_warmup  # no recompilation
        unseen = probe.shapes_run - warmed
        assert len({shape for shape in unseen if len(shape) == 5}) > 0  # mixed, unseen sizes
        # each with 2 decode rows at least (a size of 1 would be specialised away from the graph)
        assert all(shape[3] >= 2 for shape in probe.shapes_run if len(shape) == 5)
        # prefills of lengths warmup did not run, served by the same graphs
        assert {shape for shape in unseen if len(shape) == 3} and unseen - set(probe.shape_set()) == {
            shape for shape in unseen if len(shape) == 5}
    finally:
        compiled.engine.seal(False)
        compiled.service.shutdown()
        eager.service.shutdown()


def test_compiling_only_decode_steps_matches_eager_and_compiles_nothing_else(checkpoint):
    """compiled_steps: decode (the default for large models on the CPU): warmup compiles the decode
    steps past the first block and nothing else; prefill, mixed steps and the vision tower run
    eager, and the answers equal eager's."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from spyre_backend.vision.encoder import VisionEncoder

    small = {"max_context": "256", "prefill_chunk": "64", "max_running": "2", "decode_batch_sizes": "1 2",
             "device": "cpu"}
    torch._dynamo.reset()
    graphs_before = counters["stats"]["unique_graphs"]
    compiled = make_stack(checkpoint, compile_backend="inductor", compiled_steps="decode", **small)
    eager = make_stack(checkpoint, compile_backend="eager", **small)
    try:
        probe = compiled.engine.probe
        assert not probe.plan.compiles_all_steps
        assert probe.warmup_shapes() and all(q == 1 and ctx > 1 for _, q, ctx in probe.warmup_shapes())
        graphs_after_warmup = counters["stats"]["unique_graphs"]
        assert 0 < graphs_after_warmup - graphs_before <= 2  # batch 1 and batch 2, symbolic in the context
        assert all(len(shape) == 3 and shape[1] == 1 and shape[2] > 1 for shape in probe.shapes_run)
        compiled.engine.seal()  # a compile from here would fail: eager steps must not try
        traffic = [("What is in the image?", [shape_png("triangle", "green", "white", (200, 150))]),
                   ("Say hello.", []), ("What is the capital of France?", [])]
        got = [compiled.submit(q, imgs, max_tokens=12) for q, imgs in traffic]  # batched: mixed steps too
        want = [eager.submit(q, imgs, max_tokens=12).wait().text for q, imgs in traffic]
        assert [h.wait().text for h in got] == want
        assert counters["stats"]["unique_graphs"] == graphs_after_warmup
        assert all(len(shape) == 3 and shape[1] == 1 for shape in probe.shapes_run)  # only decode ran compiled
        encoder = VisionEncoder(str(checkpoint), probe.plan)
        assert not encoder.compiled and encoder._tower == encoder._tower_impl  # the tower runs eager
    finally:
        compiled.engine.seal(False)
        compiled.service.shutdown()
        eager.service.shutdown()


def test_auto_threads_one_for_narrow_models():
    before = torch.get_num_threads()
    try:
        auto = ServingConfig.from_strings({})
        assert apply_threads(auto.device, 64) == 1  # the tiny checkpoint: ops too small to split
        assert apply_threads(auto.device, 1024) == TORCH_DEFAULT_THREADS == torch.get_num_threads()  # torch's default again
        assert apply_threads(ServingConfig.from_strings({"num_threads": "3"}).device, 64) == 3  # explicit wins
    finally:
        torch.set_num_threads(before)


# Run in a fresh interpreter (malloc settings are process-wide): a serving thread gathers KV-sized
# blocks that are all alive at once, as a decode step does layer after layer, and reports the page
# faults of the repeats.
_FAULTS_SCRIPT = """
import resource, sys, threading, torch
if sys.argv[1] == "kept":
    from spyre_backend.device.host_memory import keep_freed_memory
    assert keep_freed_memory()
pools = [torch.randn(200, 16384) for _ in range(8)]  # 13 MB each, rows of 64 KB
rows = torch.arange(1, 97)  # a 6 MB gather from each
def step():
    return [pool.index_select(0, rows) for pool in pools]
def run(out):
    for _ in range(3):  # glibc's own thresholds adapt a little over the first steps
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
out = []
thread = threading.Thread(target=run, args=(out,))
thread.start()
thread.join()
print(out[0])
"""


def test_freed_memory_is_reused_without_page_faults():
    import platform
    import subprocess
    import sys

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("the allocator settings are glibc's")

    def faults(mode: str) -> int:
        done = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT, mode], capture_output=True, text=True,
                              timeout=120, check=True)
        return int(done.stdout.split()[-1])

    default, kept = faults("default"), faults("kept")
    pages = 5 * 8 * 96 * 64 * 1024 // 4096  # what the repeats write
    assert default > pages // 10, (default, pages)  # glibc's defaults still map many blocks afresh
    assert kept < default // 10, (kept, default)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
def test_fused_decode_attention_equals_the_gathered_form(heads, kv_heads):
    """The decode form inductor fuses computes what the gather + SDPA form does: grouped heads,
    ragged contexts (the mask hides each row's unwritten tail and padding blocks)."""
    torch.manual_seed(0)
    batch, head_dim, block_size, blocks = 3, 16, 8, 20
    key_pool, value_pool = (torch.randn(blocks, block_size, kv_heads, head_dim) for _ in range(2))
    block_table = torch.tensor([[3, 7, 1, 0], [5, 0, 0, 0], [9, 2, 11, 4]])  # 0: the padding block
    positions = torch.tensor([20, 3, 31])
    mask = (torch.arange(4 * block_size).view(1, 1, 1, -1) <= positions.view(-1, 1, 1, 1))
    query = torch.randn(batch, 1, heads, head_dim)
    args = (query, key_pool, value_pool, heads, kv_heads, 0.0, head_dim ** -0.5)
    want = attention._compute(*args, block_table=block_table, mask=mask)
    got = attention._compute_fused_decode(*args, block_table=block_table, mask=mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
