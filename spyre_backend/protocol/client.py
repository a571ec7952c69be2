"""What every client sends and reads: a request as tritonclient ``InferInput``s, each typed by the
schema, and the last response's finish reason and token counts.

Only clients import this module, and tritonclient is imported when it is called, so the package
stays importable without tritonclient.
"""

from __future__ import annotations

import numpy as np

from spyre_backend.protocol.schema import GENERATION_OUTPUTS, MODELS, NUMPY_DTYPES

# every input any model declares (a name means the same tensor in every model that has it)
_DECLARED = {t.name: t for model in MODELS.values() for t in model.inputs}
_UNDECLARED = {bool: np.bool_, int: np.int32, float: np.float32, bytes: np.object_}  # by the value's type
_COUNTS = [t.name for t in GENERATION_OUTPUTS if t.data_type == "INT32"]  # num_input_tokens, ...


def as_array(name: str, value) -> np.ndarray:
    """``value`` as the array the schema declares for input ``name``: one value, or a list where
    the input takes many (images, stop_words); str is sent UTF-8 encoded. A numpy array is sent as
    it is (to send a wrong type or shape on purpose); a name no model declares is typed from the value."""
    if isinstance(value, np.ndarray):
        return value
    values = [v.encode() if isinstance(v, str) else v for v in (value if isinstance(value, (list, tuple)) else [value])]
    declared = _DECLARED.get(name)
    if declared is not None:
        return np.array(values, dtype=NUMPY_DTYPES[declared.data_type])
    return np.array(values, dtype=_UNDECLARED.get(type(values[0])))


def infer_inputs(values: dict, client=None) -> list:
    """``values`` (input name -> value, see ``as_array``) as ``client``'s InferInputs
    (``tritonclient.grpc`` by default; ``tritonclient.http`` works the same)."""
    if client is None:
        import tritonclient.grpc as client
    from tritonclient.utils import np_to_triton_dtype

    inputs = []
    for name, value in values.items():
        array = as_array(name, value)
        tensor = client.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def finish_and_counts(result) -> dict:
    """A response's (tritonclient's InferResult) finish reason ("" until the last response) and its
    token counts, by their output names."""
    return {"finish_reason": result.as_numpy("finish_reason")[0].decode(),
            **{name: int(result.as_numpy(name)[0]) for name in _COUNTS}}
