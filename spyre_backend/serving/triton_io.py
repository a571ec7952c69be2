"""Reading Triton request inputs into Python values and building responses.

The ``pb_utils`` module exists only inside the Python-backend stub, so it is passed in by the
model adapters instead of imported here; everything else in the package stays Triton-free.
"""

from __future__ import annotations

import numpy as np

from spyre_backend.engine.sampling_params import InvalidRequest


def tensor(pb_utils, request, name: str) -> np.ndarray | None:
    t = pb_utils.get_input_tensor_by_name(request, name)
    return None if t is None else t.as_numpy()


def scalar(array: np.ndarray | None, name: str):
    if array is None:
        return None
    if array.size != 1:
        raise InvalidRequest(f"input {name!r} must hold exactly one value, got shape {list(array.shape)}")
    return array.reshape(-1)[0]


def optional_text(pb_utils, request, name: str) -> str | None:
    value = scalar(tensor(pb_utils, request, name), name)
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequest(f"input {name!r} is not valid UTF-8") from None
    return str(value)


def optional_bool(pb_utils, request, name: str, default: bool) -> bool:
    value = scalar(tensor(pb_utils, request, name), name)
    return default if value is None else bool(value)


def optional_int(pb_utils, request, name: str) -> int | None:
    value = scalar(tensor(pb_utils, request, name), name)
    return None if value is None else int(value)


def image_list(pb_utils, request, name: str = "image") -> list[bytes]:
    array = tensor(pb_utils, request, name)
    if array is None:
        return []
    return [bytes(x) if isinstance(x, (bytes, bytearray)) else str(x).encode() for x in array.reshape(-1)]


def error_response(pb_utils, message: str):
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))


def text_response(pb_utils, text: str, finish_reason: str, num_input: int, num_output: int):
    return pb_utils.InferenceResponse(output_tensors=[
        pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_)),
        pb_utils.Tensor("finish_reason", np.array([finish_reason.encode()], dtype=np.object_)),
        pb_utils.Tensor("num_input_tokens", np.array([num_input], dtype=np.int32)),
        pb_utils.Tensor("num_output_tokens", np.array([num_output], dtype=np.int32)),
    ])
