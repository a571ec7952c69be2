"""The body of scripts/gpu_check.sh (see there)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, by name as torch reports it
BF16_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}
CONCURRENCY = (1, 16)
MAX_TOKENS = 64


def refuse_without_cuda() -> str:
    import torch

    if not torch.cuda.is_available():
        print(f"gpu_check: torch {torch.__version__} sees no CUDA device (CUDA build: {torch.version.cuda}); "
              "this check needs a CUDA GPU. On the CPU, `make test-full-size` checks the same exactness.",
              file=sys.stderr)
        sys.exit(2)
    return torch.cuda.get_device_name(0)


def peak_for(name: str) -> float | None:
    return next((peak for key, peak in BF16_PEAKS.items() if key in name), None)


def main(argv: list[str]) -> int:
    gpu = refuse_without_cuda()
    checkpoint = Path(argv[0] if argv else ROOT / "results/checkpoints/granite-vision-3.2-2b")
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "tools.tiny_checkpoint.random_checkpoint", "--preset",
                    "granite-vision-3.2-2b", "--out", str(checkpoint)], cwd=ROOT, check=True)
    exact = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "tests/full_size"], cwd=ROOT,
                           env={**os.environ, "FULL_SIZE_CHECKPOINT": str(checkpoint)}).returncode == 0
    figures = {"gpu": gpu, "checkpoint": str(checkpoint), "exact_fp32_tokens": exact, **performance(checkpoint, gpu),
               "wall_s": round(time.monotonic() - started, 1)}
    out = ROOT / "results" / "gpu-check.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    return 0 if exact else 1


def performance(checkpoint: Path, gpu: str) -> dict:
    from spyre_backend.device import memory
    from spyre_backend.server.child_process import free_port
    from spyre_backend.server.triton_process import ServerOptions, TritonServer
    from testkit.images import shape_png
    from testkit.metrics import read_metrics
    from testkit.streaming import grpc_stream

    options = ServerOptions(checkpoint=checkpoint, http_port=free_port(), grpc_port=free_port(),
                            metrics_port=free_port(), extra_env={"SPYRE_DEVICE": "cuda"})
    server = TritonServer(options, log_path=ROOT / "results" / "gpu-check-server.log").start(timeout_s=900)
    try:
        colours = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]

        def ask(i: int, max_tokens: int = MAX_TOKENS) -> dict:
            image = shape_png("circle", colours[i % 8], colours[(i // 8 + 1) % 8], size=(384 + i, 288))  # its own
            return grpc_stream(server.grpc_url, {
                "text_input": "Describe the image.", "image": [image], "max_tokens": max_tokens,
                "apply_chat_template": True, "stream": True,
                "sampling_parameters": json.dumps({"temperature": 0, "ignore_eos": True})}, timeout=600)

        ask(1000, 2)  # first request after ready
        before = read_metrics(server.metrics_url)
        t0 = time.monotonic()
        single = ask(1001, 1)
        ttft_s = time.monotonic() - t0
        after = read_metrics(server.metrics_url)
        vision_s = (after['nv_inference_compute_infer_duration_us{model="vision_encoder",version="1"}']
                    - before['nv_inference_compute_infer_duration_us{model="vision_encoder",version="1"}']) / 1e6
        prefill_s = after["spyre_time_to_first_token_seconds_sum"] - before["spyre_time_to_first_token_seconds_sum"]
        rates = {}
        for level in CONCURRENCY:
            results, threads = [], []
            t0 = time.monotonic()
            for i in range(level):
                threads.append(threading.Thread(target=lambda i=i: results.append(ask(2000 + level * 100 + i))))
                threads[-1].start()
            for t in threads:
                t.join()
            wall = time.monotonic() - t0
            assert all("error" not in r for r in results), [r.get("error") for r in results]
            rates[f"tokens_per_s_c{level}"] = round(sum(r["num_output_tokens"] for r in results) / wall, 1)
    finally:
        server.stop()
    counts = memory.tensor_counts(checkpoint)
    vision_params = sum(n for k, n in counts.items() if k.startswith(("vision_tower.", "multi_modal_projector.")))
    decoder_params = sum(n for k, n in counts.items() if k.startswith("language_model.")) - 49156 * 2048  # no embedding
    prompt_tokens = single["num_input_tokens"]
    crops = 2  # a 384x288 image: the base crop and one 384 px tile
    peak = peak_for(gpu)
    prefill_flops = 2 * decoder_params * prompt_tokens
    vision_flops = 2 * vision_params * 729 * crops
    return {
        "prompt_tokens": prompt_tokens, "ttft_s": round(ttft_s, 3), "vision_s": round(vision_s, 3),
        "prefill_s": round(prefill_s, 3), **rates, "bf16_peak_flops": peak,
        "prefill_roofline_fraction": round(prefill_flops / prefill_s / peak, 3) if peak and prefill_s else None,
        "vision_roofline_fraction": round(vision_flops / vision_s / peak, 3) if peak and vision_s else None,
    }


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
