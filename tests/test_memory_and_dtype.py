"""Memory at load (issue 17): the checkpoint's dtype by default, the KV pool sized from the memory
left, a refusal before loading when a model cannot fit, the launcher telling how a stub died, bf16
linears on a CPU without bf16 arithmetic, and the 2b-shaped checkpoint builder's pieces. No server."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time

import pytest
import torch
from safetensors import safe_open

from spyre_backend import DEFAULT_CHECKPOINT
from spyre_backend.config import CacheConfig, ConfigError, DeviceConfig, ServingConfig
from spyre_backend.device import checkpoint_dtype
from spyre_backend.device import (CPU_COMPILE_MAX_PARAMS, cpu_linear, default_compiled_steps, memory, plan_for, resolve,
                                  torch_dtype)
from spyre_backend.engine import model_runner
from spyre_backend.models import get_spec
from spyre_backend.server.stub_watch import StubWatch
from tools.tiny_checkpoint import random_checkpoint
from tools.tiny_checkpoint.save import save_weights
from tools.tiny_checkpoint.tokenizer import TOKENIZER_VOCAB, build_tokenizer

GiB = 2**30


@pytest.fixture
def bf16_checkpoint(tmp_path):
    """The tiny checkpoint's files with a config that says bfloat16."""
    out = tmp_path / "bf16"
    shutil.copytree(DEFAULT_CHECKPOINT, out)
    config = json.loads((out / "config.json").read_text())
    config["dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_auto_dtype_follows_the_checkpoint_and_an_explicit_one_wins(bf16_checkpoint):
    assert checkpoint_dtype(str(DEFAULT_CHECKPOINT)) == "float32"  # says none: float32
    assert checkpoint_dtype(str(bf16_checkpoint)) == "bfloat16"
    assert DeviceConfig().dtype == "auto"
    assert torch_dtype(DeviceConfig(), str(bf16_checkpoint)) == torch.bfloat16
    assert torch_dtype(DeviceConfig(dtype="float32"), str(bf16_checkpoint)) == torch.float32
    assert plan_for(ServingConfig.from_strings({"device": "cpu"}).device, str(bf16_checkpoint)).dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="dtype"):
        ServingConfig.from_strings({"dtype": "float8"})


def test_the_model_spec_reads_the_checkpoint_config(bf16_checkpoint):
    spec = get_spec(DEFAULT_CHECKPOINT)
    text, vision = spec.text, spec.vision
    assert (text.hidden_size, text.num_layers, text.num_heads, text.kv_heads, text.head_dim, text.vocab_size) \
        == (64, 4, 4, 2, 16, 512)
    assert text.kv_bytes_per_token(torch.bfloat16) == 2 * 4 * 2 * 16 * 2  # K and V, 4 layers, 2 kv heads of 16
    assert (vision.hidden_size, vision.image_size, vision.patch_size, vision.patches_per_crop) == (32, 56, 14, 16)
    assert vision.feature_layers == (-24, -20, -12, -1)
    assert (spec.image_token_id, spec.max_crops_per_image) == (4, 7)  # the 112x168 grid: a base crop and 2x3 tiles
    assert spec.declared_dtypes == () and get_spec(bf16_checkpoint).declared_dtypes == ("bfloat16",)
    assert [spec.text_attention_weight(name) for name in (
        "language_model.model.layers.0.self_attn.k_proj.weight", "language_model.model.layers.0.self_attn.o_proj.bias",
        "language_model.model.layers.0.mlp.up_proj.weight", "vision_tower.encoder.layers.0.self_attn.q_proj.weight",
    )] == ["k", "bias", None, None]


def test_the_kv_pool_takes_a_share_of_what_is_left_and_no_more_than_max_running_contexts():
    cache = CacheConfig(block_size=64, max_context=4096)  # 64 blocks a context
    per_token = 1024  # 64 KiB a block
    full = 16 * 64 + 1
    assert cache.kv_blocks(per_token, max_running=16) == full  # memory unknown
    assert cache.kv_blocks(per_token, 16, available_bytes=100 * GiB) == full  # plenty: capped
    # 1 GiB available, half of it: 8192 blocks of 64 KiB would fit, so still capped; with 64 MiB: 512
    assert cache.kv_blocks(per_token, 16, available_bytes=64 * 2**20) == 512
    with pytest.raises(ConfigError, match="max_context.*kv_memory_fraction|kv_memory_fraction.*max_context"):
        cache.kv_blocks(per_token, 16, available_bytes=4 * 2**20)  # 32 blocks: not one context
    assert CacheConfig(num_kv_blocks=7).kv_blocks(per_token, 16, available_bytes=1) == 7  # explicit wins
    config = ServingConfig.from_strings({"kv_memory_fraction": "0.25"})
    assert config.cache.kv_memory_fraction == 0.25
    for bad in ("0", "1.5", "half"):
        with pytest.raises(ConfigError, match="kv_memory_fraction"):
            ServingConfig.from_strings({"kv_memory_fraction": bad})


def test_weight_sizes_come_from_the_safetensors_headers():
    with safe_open(str(DEFAULT_CHECKPOINT / "model.safetensors"), "pt") as f:
        elements = {k: f.get_tensor(k).numel() for k in f.keys()}
    assert memory.tensor_counts(DEFAULT_CHECKPOINT) == elements
    assert memory.weight_bytes(DEFAULT_CHECKPOINT, torch.bfloat16) == 2 * sum(elements.values())
    vision = sum(n for k, n in elements.items() if k.startswith(("vision_tower.", "multi_modal_projector.")))
    assert memory.weight_bytes(DEFAULT_CHECKPOINT, torch.float32, ("vision_tower.", "multi_modal_projector.")) \
        == 4 * vision


def test_a_model_that_cannot_fit_is_refused_before_anything_loads(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: GiB)  # less than the runtime alone
    from spyre_backend.models.llava_next import LlavaNext

    monkeypatch.setattr(LlavaNext, "load_language_model", lambda *a, **k: pytest.fail("loaded anyway"))
    from spyre_backend.device import resolve

    with pytest.raises(memory.InsufficientMemory) as refused:
        model_runner.ModelRunner(str(DEFAULT_CHECKPOINT), plan=resolve("cpu", "eager", torch.float32),
                                 spec=get_spec(DEFAULT_CHECKPOINT), num_kv_blocks=0, block_size=64,
                                 max_context=4096, prefill_chunk=512, decode_batch_sizes=[1])
    message = str(refused.value)
    assert "granite_llm needs" in message and "1.0 GiB is available" in message
    assert "dtype=bfloat16" in message and "max_context" in message
    # the same estimate passes where the memory is there
    memory.decoder_estimate(DEFAULT_CHECKPOINT, torch.float32, get_spec(DEFAULT_CHECKPOINT), 4160).check(64 * GiB)


def test_the_launcher_says_a_stub_was_killed_and_by_which_signal():
    watch = StubWatch()
    stub = subprocess.Popen(["sleep", "60"])  # our child: a zombie until waited for, like a stub of tritonserver's
    try:
        watch.poll({"granite_llm": stub.pid})
        assert watch.seen[stub.pid][0] == "granite_llm" and not watch.deaths
        stub.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not watch.deaths and time.monotonic() < deadline:
            watch.poll({})  # gone from the live stubs
            time.sleep(0.05)
        assert "the granite_llm stub (pid %d) was killed by SIGKILL" % stub.pid in watch.report()
    finally:
        stub.kill()
        stub.wait()


def test_large_models_compile_only_their_decode_steps_by_default_on_the_cpu():
    assert default_compiled_steps("cpu", CPU_COMPILE_MAX_PARAMS) == "decode"
    assert default_compiled_steps("cpu", CPU_COMPILE_MAX_PARAMS - 1) == "all"
    assert default_compiled_steps("cuda", CPU_COMPILE_MAX_PARAMS) == "all"
    large = resolve("cpu", None, torch.bfloat16, model_params=CPU_COMPILE_MAX_PARAMS)
    assert large.compiled_steps == "decode" and not large.compiles_all_steps
    assert large.compile_backend == ("inductor" if shutil.which("g++") or shutil.which("c++") else "eager")
    assert resolve("cpu", "eager", torch.bfloat16, model_params=CPU_COMPILE_MAX_PARAMS).compiles_all_steps  # nothing compiles
    assert resolve("cpu", None, torch.float32, compiled_steps="all", model_params=CPU_COMPILE_MAX_PARAMS).compiles_all_steps
    with pytest.raises(ConfigError, match="'compiled_steps'"):
        ServingConfig.from_strings({"compiled_steps": "prefill"})


def test_bf16_linears_without_bf16_arithmetic_compute_many_rows_in_fp32(monkeypatch):
    """On a CPU without bf16 arithmetic (monkeypatched here) a matmul of UPCAST_MIN_ROWS rows or
    more runs in fp32 on a converted weight; fewer rows stay bf16 (the decode kernel or torch)."""
    torch.manual_seed(0)
    monkeypatch.setattr(cpu_linear, "has_native_bf16", lambda: False)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.Linear(8, 8)).to(torch.bfloat16)
    reference = [m.weight.float() for m in model]
    assert cpu_linear.cpu_linears(model, torch.bfloat16) == 1  # the small one stays
    assert isinstance(model[0], cpu_linear.CpuLinear) and type(model[1]) is torch.nn.Linear
    upcasts = []
    real_linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, w, b=None: upcasts.append(w.dtype) or real_linear(x, w, b))
    for rows in (1, 16, cpu_linear.UPCAST_MIN_ROWS):
        upcasts.clear()
        x = torch.randn(rows, 512).to(torch.bfloat16)
        want = real_linear(x.float(), reference[0], model[0].bias.float())
        got = model[0](x)
        assert got.dtype == torch.bfloat16 and got.shape == (rows, 1024)
        torch.testing.assert_close(got.float(), want, atol=0.05, rtol=0.02)
        assert (upcasts == [torch.float32]) == (rows >= cpu_linear.UPCAST_MIN_ROWS)
    compiled = torch.compile(model[0], backend="eager", fullgraph=True)  # an opaque op for dynamo
    x = torch.randn(64, 512).to(torch.bfloat16)
    torch.testing.assert_close(compiled(x), model[0](x))


def test_the_published_tokenizer_layout_puts_image_at_49155_and_no_text_encodes_to_the_filler():
    tokenizer = build_tokenizer(image_token_id=49155)
    assert len(tokenizer) == 49156
    assert tokenizer.convert_tokens_to_ids("<image>") == 49155
    assert tokenizer.convert_tokens_to_ids("<|end_of_text|>") == 0
    ids = tokenizer("Describe <image> the picture, please: 7 + 5 = 12").input_ids
    assert 49155 in ids and max(i for i in ids if i != 49155) < TOKENIZER_VOCAB
    assert tokenizer.decode(ids) == "Describe <image> the picture, please: 7 + 5 = 12"
    tiny = build_tokenizer()  # the shipped layout is unchanged
    assert len(tiny) == TOKENIZER_VOCAB and tiny.convert_tokens_to_ids("<image>") == 4


def test_the_2b_preset_has_the_published_shapes():
    preset = random_checkpoint.PRESETS["granite-vision-3.2-2b"]
    pinpoints = preset["pinpoints"]
    assert len(pinpoints) == 27 and len({tuple(p) for p in pinpoints}) == 27
    assert all(h % 384 == 0 and w % 384 == 0 and h * w <= 384 * 3840 for h, w in pinpoints)
    args = random_checkpoint.parser().parse_args(["--out", "x", "--preset", "granite-vision-3.2-2b"])
    stamp = random_checkpoint.build_args(args)
    assert stamp["dtype"] == "bfloat16" and stamp["text_layers"] == 40 and stamp["vision_hidden"] == 1152
    assert (stamp["text_hidden"], stamp["text_heads"], stamp["text_kv_heads"], stamp["vocab"]) == (2048, 32, 8, 49156)
    # the mid-size benchmark folders keep their stamp (no rebuild)
    mid = random_checkpoint.build_args(random_checkpoint.parser().parse_args(["--out", "x"]))
    assert set(mid) == set(random_checkpoint.SHAPE_ARGS)


def test_weights_are_saved_in_shards_with_an_index_in_the_checkpoint_dtype(tmp_path):
    from transformers import LlavaNextForConditionalGeneration

    model = LlavaNextForConditionalGeneration.from_pretrained(DEFAULT_CHECKPOINT)
    save_weights(model, tmp_path, torch.bfloat16, shard_bytes=2**19)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == {s.name for s in shards}
    with safe_open(str(DEFAULT_CHECKPOINT / "model.safetensors"), "pt") as f:
        published = {k: f.get_tensor(k) for k in f.keys()}
    assert set(index["weight_map"]) == set(published)
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                assert t.dtype == torch.bfloat16
                torch.testing.assert_close(t, published[key].to(torch.bfloat16))


def test_the_gpu_check_refuses_clearly_without_cuda():
    from pathlib import Path

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: scripts/gpu_check.sh would run the whole check (minutes)")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(["bash", str(root / "scripts/gpu_check.sh")], capture_output=True, text=True, timeout=120,
                          cwd=root)
    assert done.returncode == 2, done
    assert "sees no CUDA device" in done.stderr and "needs a CUDA GPU" in done.stderr
