"""The request/response protocol of the served models, written once: pure data, no imports of the package.

``schema`` holds every model's input and output tensors (name, Triton data type, dims, optional),
the ensemble's steps, the finish reasons and the TRT-LLM-style sampling input names. Everything
else is derived from it: the ``input``/``output`` blocks and the ensemble's maps of every
``config.pbtxt`` (``pbtxt``: ``python -m spyre_backend.protocol.pbtxt --write``), and the
tritonclient inputs every client sends (``client``, the only module that needs tritonclient).
"""

from spyre_backend.protocol.schema import (  # noqa: F401
    ENSEMBLE, ENSEMBLE_STEPS, GENERATION_INPUTS, GENERATION_OUTPUTS, MODELS, NUMPY_DTYPES, SAMPLING_INPUT_NAMES,
    TRTLLM_INPUTS, FinishReason, Model, Tensor,
)
