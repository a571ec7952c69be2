# The README's two commands: `make serve` and `make test`. Both set up first (idempotent).
VENV := .venv
PY := $(VENV)/bin/python
CHECKPOINT ?= checkpoints/tiny-granite-vision
ARGS ?=

.PHONY: setup serve test checkpoint clean

setup:
	@bash scripts/setup.sh

serve: setup
	$(PY) -m spyre_backend.server.launcher --checkpoint $(CHECKPOINT) $(ARGS)

test: setup
	$(PY) -m pytest -q tests $(ARGS)

# Rebuilds (retrains) the shipped tiny checkpoint from its script, with a fixed seed.
checkpoint: setup
	$(PY) -m spyre_backend.tiny.build_checkpoint --out $(CHECKPOINT)

clean:
	rm -rf .triton .pytest_cache
