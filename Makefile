# The README's two commands: `make serve` and `make test`. Both set up first (idempotent).
VENV := .venv
PY := $(VENV)/bin/python
CHECKPOINT ?= checkpoints/tiny-granite-vision
ARGS ?=

.PHONY: setup serve test test-full-size soak bench checkpoint clean

setup:
	@bash scripts/setup.sh

serve: setup
	$(PY) -m spyre_backend.server.launcher --checkpoint $(CHECKPOINT) $(ARGS)

test: setup
	$(PY) -m pytest -q tests --ignore=tests/full_size $(ARGS)

# Exactness at full size, outside `make test` (~15 minutes, ~14 GB): builds or reuses the
# 2b-shaped random checkpoint, then fp32 transformers against the served fp32 model.
FULL_SIZE_CHECKPOINT ?= results/checkpoints/granite-vision-3.2-2b
test-full-size: setup
	$(PY) -m tools.tiny_checkpoint.random_checkpoint --preset granite-vision-3.2-2b --out $(FULL_SIZE_CHECKPOINT)
	FULL_SIZE_CHECKPOINT=$(FULL_SIZE_CHECKPOINT) $(PY) -m pytest -q -s tests/full_size $(ARGS)

# A soak outside `make test` (MINUTES, STREAMS); the cancellation storm is part of `make test`.
MINUTES ?= 10
STREAMS ?= 32
soak: setup
	$(PY) scripts/soak.py --minutes $(MINUTES) --streams $(STREAMS)

# Benchmark outside `make test`: tiny and mid-size checkpoints through transformers, the engine and
# Triton (Python client and perf_analyzer) at concurrency 1, 4, 16; results/bench-<time>/.
# QUICK=1: tiny checkpoint only, fewer requests. FULL=1: the 2b shape against vLLM CPU and llama.cpp
# (bench/phases/full.py; hours, ~20 GB of peers under results/peer/). More options: ARGS="--help".
bench: setup
	$(PY) -m bench $(if $(QUICK),--quick) $(if $(FULL),--checkpoints full) $(ARGS)

# Rebuilds (retrains) the shipped tiny checkpoint from its script, with a fixed seed.
checkpoint: setup
	$(PY) -m tools.tiny_checkpoint --out $(CHECKPOINT)

clean:
	rm -rf .triton .pytest_cache

# The GPU check (docs/full-size.md, tools/gpu_check): here, the wheels the lent GPU machine lacks into
# .whl/, the size check and the one device call to make; there, `bash scripts/gpu_check.sh --out DIR`.
.PHONY: gpu-check
gpu-check: setup
	bash scripts/gpu_check.sh prepare
