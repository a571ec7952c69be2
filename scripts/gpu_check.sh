#!/usr/bin/env bash
# The GPU check of issue 17, under 8 minutes on one CUDA GPU: build or reuse the 2b-shaped
# checkpoint, check the served fp32 tokens against transformers on the GPU (tests/full_size), then
# serve it in bf16 and report TTFT, tokens/s at concurrency 1 and 16 and the prefill and vision
# fraction of the GPU's bf16 roofline (results/gpu-check.json). Refuses at once without CUDA.
#   bash scripts/gpu_check.sh [CHECKPOINT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec "$PY" scripts/gpu_check.py "$@"
