"""Architecture name (``architectures[0]`` of a HF config.json) -> its ModelSpec class."""

from __future__ import annotations

import json
from pathlib import Path

from spyre_backend.models.spec import ModelSpec

_SPECS: dict[str, type[ModelSpec]] = {}


def register(spec: type[ModelSpec]) -> type[ModelSpec]:
    _SPECS[spec.architecture] = spec
    return spec


def read_config(checkpoint: str | Path) -> dict:
    return json.loads((Path(checkpoint) / "config.json").read_text())


def spec_from_config(config: dict) -> ModelSpec:
    """The spec of the architecture a config.json dict names; ValueError where none is registered."""
    architecture = (config.get("architectures") or [config.get("model_type", "?")])[0]
    _load_builtin()
    if architecture not in _SPECS:
        raise ValueError(f"unsupported architecture {architecture!r}; supported: {sorted(_SPECS)}")
    return _SPECS[architecture](config)


def get_spec(checkpoint: str | Path) -> ModelSpec:
    """The spec of a checkpoint (its config.json read now: a rewritten config is seen)."""
    return spec_from_config(read_config(checkpoint))


def _load_builtin() -> None:
    from spyre_backend.models import llava_next  # noqa: F401  (registers itself)
