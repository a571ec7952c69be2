# The README's two commands: `make serve` and `make test`. Both set up first (idempotent).
VENV := .venv
PY := $(VENV)/bin/python
CHECKPOINT ?= checkpoints/tiny-granite-vision
ARGS ?=

.PHONY: setup serve test stress soak checkpoint clean

setup:
	@bash scripts/setup.sh

serve: setup
	$(PY) -m spyre_backend.server.launcher --checkpoint $(CHECKPOINT) $(ARGS)

test: setup
	$(PY) -m pytest -q tests $(ARGS)

# Load tests outside `make test`: the cancellation storm, and a soak (MINUTES, STREAMS).
stress: setup
	$(PY) -m pytest -q tests -m stress $(ARGS)

MINUTES ?= 10
STREAMS ?= 32
soak: setup
	$(PY) scripts/soak.py --minutes $(MINUTES) --streams $(STREAMS)

# Rebuilds (retrains) the shipped tiny checkpoint from its script, with a fixed seed.
checkpoint: setup
	$(PY) -m spyre_backend.tiny.build_checkpoint --out $(CHECKPOINT)

clean:
	rm -rf .triton .pytest_cache
