"""Reading Triton request inputs into Python values and building responses.

The ``pb_utils`` module exists only inside the Python-backend stub, so it is passed in by the
model adapters instead of imported here; everything else in the package stays Triton-free.
"""

from __future__ import annotations

import json

import numpy as np

from spyre_backend.errors import InvalidRequest
from spyre_backend.protocol import GENERATION_OUTPUTS, NUMPY_DTYPES, TRTLLM_INPUTS, FinishReason


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


def text_list(pb_utils, request, name: str) -> tuple[str, ...]:
    """A BYTES [-1] input of UTF-8 strings (empty when absent)."""
    try:
        return tuple(b.decode("utf-8") for b in image_list(pb_utils, request, name))
    except UnicodeDecodeError:
        raise InvalidRequest(f"input {name!r} is not valid UTF-8") from None


def sampling_overrides(pb_utils, request) -> dict:
    """TRT-LLM-style separate sampling inputs that the request carries, as Python values."""
    values = {}
    for name in TRTLLM_INPUTS:
        array = tensor(pb_utils, request, name)
        if array is None:
            continue
        if name == "stop_words":
            values[name] = [w.decode("utf-8", "replace") if isinstance(w, bytes) else str(w) for w in array.reshape(-1)]
        else:
            value = scalar(array, name)
            values[name] = value.item() if hasattr(value, "item") else value
    return values


def sequence_flags(pb_utils, request) -> tuple[bool, bool]:
    flags = request.flags()
    return (bool(flags & pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START),
            bool(flags & pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END))


# A stream that fails after its first response ends with this finish reason and the error message
# as its text: Triton 2.51 loses an error response that follows other responses on its way from
# the ensemble to the granite_vision front (BLS), which then waited forever. The front turns it
# back into an error response for its client.
MIDSTREAM_ERROR = FinishReason.ERROR.value


def error_response(pb_utils, message: str):
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))


def text_response(pb_utils, text: str, finish_reason: str, num_input: int, num_output: int,
                  logprobs: list | None = None, names=None, num_cached: int = 0, num_image: int = 0):
    """A response with the standard outputs, or only ``names`` (the outputs the requester asked for:
    Triton 2.51's stub drops the others without holding the GIL, which can crash it)."""
    values = {
        "text_output": text.encode("utf-8"),
        "finish_reason": finish_reason.encode(),
        "num_input_tokens": num_input,
        "num_output_tokens": num_output,
        "num_cached_tokens": num_cached,
        "num_image_tokens": num_image,
        "logprobs": json.dumps(logprobs).encode() if logprobs is not None else b"",
    }
    return pb_utils.InferenceResponse(output_tensors=[
        pb_utils.Tensor(t.name, np.array([values[t.name]], dtype=NUMPY_DTYPES[t.data_type]))
        for t in GENERATION_OUTPUTS if not names or t.name in names])
