"""Exactness at full size (issue 17): the 2b-shaped checkpoint served through the real tritonserver
in fp32 gives transformers' greedy tokens, and its first-step logprobs match transformers' within
1e-3, for one image prompt and one text prompt. Minutes of CPU and ~14 GB: outside `make test`,
run by `make test-full-size` (which builds or reuses the checkpoint first).

The served logprobs are the log-softmax of the logits after logits_scaling (FMS's and vLLM's
Granite; transformers' LlavaNext leaves it out, so the reference divides its logits by it), before
any penalty or ban. Agreeing within 1e-3 on the top 20 says the logits agree within 1e-3 up to
the softmax's shift, and the normaliser agrees too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spyre_backend.server.child_process import free_port
from spyre_backend.server.triton_process import ServerOptions, TritonServer
from testkit.images import shape_png
from testkit.metrics import read_metrics
from testkit.streaming import grpc_stream

ROOT = Path(__file__).resolve().parents[2]
CHECKPOINT = Path(os.environ.get("FULL_SIZE_CHECKPOINT", ROOT / "results/checkpoints/granite-vision-3.2-2b"))
MAX_NEW_TOKENS = 8
TOLERANCE = 1e-3
PROMPTS = [
    {"question": "What is in the image?", "image": shape_png("triangle", "green", "white", size=(384, 288))},
    {"question": "Write one sentence about the sea.", "image": None},
]

pytestmark = pytest.mark.skipif(not (CHECKPOINT / "config.json").exists(),
                                reason=f"no full-size checkpoint at {CHECKPOINT} (make test-full-size builds it)")


@pytest.fixture(scope="module")
def want(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("reference") / "reference.json"
    request = {"max_new_tokens": MAX_NEW_TOKENS,
               "prompts": [{"question": p["question"], "images": [p["image"].hex()] if p["image"] else []}
                           for p in PROMPTS]}
    subprocess.run([sys.executable, "-m", "tests.full_size.reference", str(CHECKPOINT), str(out)], cwd=ROOT,
                   input=json.dumps(request), text=True, check=True, timeout=1800)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def full_size_server(want, tmp_path_factory):
    """Started after the reference process has exited (their fp32 models would not both fit)."""
    log = tmp_path_factory.mktemp("triton") / "server.log"
    options = ServerOptions(checkpoint=CHECKPOINT, http_port=free_port(), grpc_port=free_port(),
                            metrics_port=free_port(), extra_env={"SPYRE_DTYPE": "float32"})
    started = time.monotonic()
    server = TritonServer(options, log_path=log).start(timeout_s=1800)
    server.ready_after_s = time.monotonic() - started
    yield server
    server.stop()
    print(f"log: {log}")


def resident(server) -> dict[str, dict[str, float]]:
    out = {}
    for model, pid in server.stub_pids().items():
        status = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                      if ":\t" in line)
        out[model] = {k: round(int(status[k].split()[0]) / 2**20, 2) for k in ("VmRSS", "VmHWM")}  # GiB
    return out


def test_full_size_fp32_tokens_and_first_logprobs_equal_transformers(full_size_server, want):
    server = full_size_server
    figures = {"checkpoint": str(CHECKPOINT), "dtype": "float32", "ready_after_s": round(server.ready_after_s, 1),
               "requests": []}
    for prompt, ref in zip(PROMPTS, want):
        inputs = {"text_input": prompt["question"], "max_tokens": MAX_NEW_TOKENS, "apply_chat_template": True,
                  "stream": True, "sampling_parameters": json.dumps({"temperature": 0, "logprobs": 20})}
        if prompt["image"]:
            inputs["image"] = [prompt["image"]]
        before = read_metrics(server.metrics_url)
        started = time.monotonic()
        got = grpc_stream(server.grpc_url, inputs, timeout=1800)
        seconds = time.monotonic() - started
        after = read_metrics(server.metrics_url)
        assert "error" not in got, got["error"]
        steps = [entry for response in got["logprobs"] for entry in response]
        served_ids = [s["token_id"] for s in steps]
        assert got["num_input_tokens"] == ref["num_input_tokens"]
        assert served_ids == ref["token_ids"], (served_ids, ref["token_ids"])
        first = steps[0]
        reference = ref["first_logprobs"]
        worst = max(abs(reference[t["token_id"]] - t["logprob"]) for t in first["top"] + [first])
        assert worst <= TOLERANCE, f"first-step logprobs differ by {worst:.2e}"
        assert {t["token_id"] for t in first["top"]} == set(ref["top_ids"])

        def grew(name):
            return after.get(name, 0.0) - before.get(name, 0.0)

        figures["requests"].append({
            "prompt_tokens": ref["num_input_tokens"], "generated": len(served_ids), "seconds": round(seconds, 1),
            "vision_s": round(grew('nv_inference_compute_infer_duration_us{model="vision_encoder",version="1"}') / 1e6, 1),
            "ttft_in_granite_llm_s": round(grew("spyre_time_to_first_token_seconds_sum"), 1),
            "decode_s_per_token": round(grew("spyre_time_per_output_token_seconds_sum"), 3),
            "max_logprob_difference": worst, "reference_seconds": round(ref["seconds"], 1),
        })
    figures["resident_gib"] = resident(server)
    out = ROOT / "results" / "full-size-float32.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
