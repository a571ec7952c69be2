"""The `full` bench phase's own parts, without a server: its table and targets from made-up rounds,
llama.cpp's request body and stream parsing, the checkpoint split its converters read, the
workload's image size, and the process-tree memory sampler."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from bench import llama_cpp_peer, roofline
from bench.loadgen import LlamaCppTarget
from bench.phases import full
from bench.process_memory import PeakMemory, tree_rss_bytes
from bench.workload import Workload
from spyre_backend import DEFAULT_CHECKPOINT


def _summary(tps: float, ttft_ms: float, itl_ms: float) -> dict:
    return {"tokens_per_s": tps, "ttft_ms": {"p50": ttft_ms}, "itl_ms": {"p50": itl_ms}}


def _round(ttft_ms: float, itl_ms: float, tps4: float, itl4_ms: float, prompt_tokens: int | None = None) -> dict:
    one = _summary(16 / (ttft_ms + 15 * itl_ms) * 1e3, ttft_ms, itl_ms)
    if prompt_tokens:
        one["prompt_tokens"] = prompt_tokens
    return {"ready_s": 10.0, "peak_rss_gib": 8.0,
            "workloads": {"image": {1: one, 4: _summary(tps4, 4 * ttft_ms, itl4_ms)}, "page": {1: one}}}


MACHINE = {"matmul_gflops": 1000.0, "bandwidth_gbs": 20.0}


def _result() -> dict:
    servers = ["ours-bf16", "ours-int8", "vllm-fp32-t2", "vllm-bf16-t2", "llama-f16", "llama-q8_0"]
    rounds = {
        "ours-bf16": [_round(50_000, 200, 0.30, 900), _round(52_000, 190, 0.28, 950)],
        "ours-int8": [_round(50_000, 120, 0.30, 900)],
        "vllm-fp32-t2": [_round(60_000, 340, 0.25, 500)],
        "vllm-bf16-t2": [],  # failed to start: no rows, no effect on the bests
        "llama-f16": [_round(30_000, 210, 0.40, 400, prompt_tokens=775)],
        "llama-q8_0": [_round(34_000, 135, 0.40, 300, prompt_tokens=775)],
    }
    result = {"servers": servers, "rounds": rounds, "prompt_tokens": {"image": 1364, "page": 2990},
              "crops": {"image": 3, "page": 5}, "failed": {"vllm-bf16-t2": ["RuntimeError('not ready')"]}}
    shape = roofline.ModelShape.from_config(json.loads((DEFAULT_CHECKPOINT / "config.json").read_text()))
    result["table"] = full.table(result, shape, MACHINE)
    return result


def test_full_table_takes_each_servers_best_round_and_llama_cpps_own_prompt_length():
    rows = {(r["workload"], r["level"], r["server"]): r for r in _result()["table"]}
    ours = rows[("image", 1, "ours-bf16")]
    assert ours["ttft_p50"] == [50_000, 52_000] and ours["ttft_p50_best"] == 50_000
    assert ours["itl_p50_best"] == 190 and ours["prompt_tokens"] == 1364
    assert ours["ttft_per_prompt_token_ms"] == pytest.approx(50_000 / 1364)
    assert 0 < ours["decode_of_bandwidth"] and 0 < ours["first_token_of_compute_limit"]
    llama = rows[("image", 1, "llama-f16")]
    assert llama["prompt_tokens"] == 775 and "first_token_of_compute_limit" not in llama
    assert ("image", 4, "ours-bf16") in rows and "decode_of_bandwidth" not in rows[("image", 4, "ours-bf16")]
    assert not any(key[2] == "vllm-bf16-t2" for key in rows)


def test_full_targets_compare_with_the_right_peer():
    met = {t["name"]: (round(t["value"], 3), t["met"]) for t in full.targets(_result())}
    assert met["ours-bf16 ITL p50, c=1 / llama.cpp f16's"] == (round(190 / 210, 3), False)
    assert met["ours-bf16 TTFT p50, c=1 / vLLM's best dtype"] == (round(50_000 / 60_000, 3), True)
    assert met["ours-bf16 tokens/s, c=4 / vLLM's best"] == (round(0.30 / 0.25, 3), True)
    assert met["ours-bf16 ITL p50, c=4 / vLLM's best"] == (round(900 / 500, 3), False)
    assert met["ours-int8 ITL p50, c=1 / llama.cpp q8_0's"] == (round(120 / 135, 3), True)


def test_full_markdown_names_every_row_and_the_failures():
    result = _result()
    text = "\n".join(full.markdown(result))
    assert text.count("| image, 1 |") == 5 and "vllm-bf16-t2 failed" in text


def test_llama_cpp_request_asks_for_exact_lengths_and_per_token_timings():
    target = LlamaCppTarget("127.0.0.1:1", Workload(16, (384, 288)))
    body = json.loads(target.body(3))
    assert body["ignore_eos"] is True and body["timings_per_token"] is True and "min_tokens" not in body
    assert body["max_tokens"] == 16 and body["temperature"] == 0
    assert body["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")


def test_workload_image_size():
    import io

    from PIL import Image

    assert Image.open(io.BytesIO(Workload(16, (576, 768)).image(0))).size == (576, 768)
    assert Image.open(io.BytesIO(Workload(16).image(0))).size == (200, 150)


def test_split_checkpoint_for_llama_cpp_converters(checkpoint, tmp_path):
    from safetensors import safe_open

    llm, vision = llama_cpp_peer.split_checkpoint(checkpoint, tmp_path)
    config = json.loads((checkpoint / "config.json").read_text())
    llm_config = json.loads((llm / "config.json").read_text())
    assert llm_config["architectures"] == ["GraniteForCausalLM"]
    assert llm_config["hidden_size"] == config["text_config"]["hidden_size"]
    with safe_open(str(llm / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and all(k.startswith(("model.", "lm_head.")) for k in keys)
    tower = torch.load(vision / "pytorch_model.bin")
    assert tower and all(k.startswith("vision_model.") and v.dtype == torch.float32 for k, v in tower.items())
    projector = torch.load(vision / "llava.projector")
    assert set(projector) == {"image_newline", "multi_modal_projector.linear_1.weight",
                              "multi_modal_projector.linear_1.bias", "multi_modal_projector.linear_2.weight",
                              "multi_modal_projector.linear_2.bias"}
    vision_config = json.loads((vision / "config.json").read_text())
    assert vision_config["vision_feature_layer"] == config["vision_feature_layer"]
    assert vision_config["image_grid_pinpoints"] == config["image_grid_pinpoints"]
    assert (llm / "tokenizer.json").exists()


def test_peak_memory_counts_children():
    child = subprocess.Popen([sys.executable, "-c", "b = bytearray(200 * 2**20); import time; time.sleep(30)"])
    try:
        sampler = PeakMemory(lambda: os.getpid(), interval_s=0.05)
        deadline = time.monotonic() + 20
        while tree_rss_bytes(child.pid) < 150 * 2 ** 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        peak = sampler.stop()
    finally:
        child.kill()
        child.wait()
    assert peak * 2 ** 30 >= tree_rss_bytes(os.getpid()) + 150 * 2 ** 20


def test_a_run_stopped_early_is_reported_from_its_full_json(tmp_path, capsys):
    """full.json is written after every server's round with the machine's limits in it:
    ``python -m bench.phases.full`` renders its table and targets without measuring anything."""
    result = _result()
    del result["table"]
    result.update(checkpoint=str(DEFAULT_CHECKPOINT), machine=MACHINE)
    result["rounds"]["ours-bf16"] = result["rounds"]["ours-bf16"][:1]  # stopped during round 2
    path = tmp_path / "full.json"
    path.write_text(json.dumps(result))
    full.main([str(path)])
    out = capsys.readouterr().out
    assert "| image, 1 | ours-bf16 |" in out and "| image, 4 | llama-q8_0 |" in out
    assert "- ours-bf16 ITL p50, c=1 / llama.cpp f16's: 0.95 (target <= 0.9, missed)" in out
