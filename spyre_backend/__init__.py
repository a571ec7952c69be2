"""Granite Vision served Spyre-style: static shapes, paged KV on the device, compiled at warmup.

The package does all the work; the Triton models in ``model_repository/`` are thin adapters.
"""

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CHECKPOINT = PROJECT_ROOT / "checkpoints" / "tiny-granite-vision"
MODEL_REPOSITORY = PROJECT_ROOT / "model_repository"
