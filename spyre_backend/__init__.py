"""Granite Vision served Spyre-style: static shapes, paged KV on the device, compiled at warmup.

The package does all the work; the Triton models in ``model_repository/`` are thin adapters.
"""

import logging
from pathlib import Path

# transformers imports torchao (installed for ``quantization: int8``) in every process that loads a
# model; on a CPU build of torch it warns at import about its CUDA kernels and about a torch pytree
# deprecation: nothing this package uses, four lines of alarm in every log
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CHECKPOINT = PROJECT_ROOT / "checkpoints" / "tiny-granite-vision"
MODEL_REPOSITORY = PROJECT_ROOT / "model_repository"
