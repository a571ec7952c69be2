"""Every served model's input and output tensors, the ensemble's steps and the finish reasons.

A generation request reaches ``granite_llm`` through the ``granite_vision`` front and the
``granite_vision_ensemble`` (preprocess -> vision_encoder -> granite_llm): the generation inputs
and outputs below are declared by all three, and every ``config.pbtxt`` block is generated from here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Tensor:
    name: str
    data_type: str  # Triton's: BOOL, INT32, INT64, UINT64, FP32, BYTES (TYPE_STRING in config.pbtxt)
    dims: tuple[int, ...]  # -1: any size
    optional: bool = False


# Triton data type -> numpy dtype name (BYTES: Python bytes objects)
NUMPY_DTYPES = {"BOOL": "bool", "INT32": "int32", "INT64": "int64", "UINT64": "uint64", "FP32": "float32",
                "BYTES": "object"}


def _optional(name: str, data_type: str, dims: tuple[int, ...] = (1,)) -> Tensor:
    return Tensor(name, data_type, dims, optional=True)


TEXT_INPUT = Tensor("text_input", "BYTES", (1,))
IMAGE = _optional("image", "BYTES", (-1,))  # encoded bytes, base64 or a data: URI, one per image
DOCUMENT = _optional("document", "BYTES", (-1,))  # PDFs (bytes, base64 or a data: URI); each <document> tag is one
MM_PROCESSOR_KWARGS = _optional("mm_processor_kwargs", "BYTES")  # JSON media options (preprocess/options.py)
# one per image / document ("" for none): what names it in later requests, which may then send it empty
IMAGE_UUID = _optional("image_uuid", "BYTES", (-1,))
DOCUMENT_UUID = _optional("document_uuid", "BYTES", (-1,))
# a tenant's (vLLM's cache_salt): every cache a request reads (processed images, encoder features,
# prefix-cache blocks) is shared only among requests with the same salt
CACHE_SALT = _optional("cache_salt", "BYTES")
APPLY_CHAT_TEMPLATE = _optional("apply_chat_template", "BOOL")
STOP = _optional("stop", "BOOL")  # stop the sequence's turn in progress (granite_llm; preprocess skips it)

# the optional inputs every generation entry point accepts
GENERATION_INPUTS: list[Tensor] = [
    _optional("max_tokens", "INT32"),
    _optional("stream", "BOOL"),
    _optional("sampling_parameters", "BYTES"),  # vLLM-style JSON
    _optional("exclude_input_in_output", "BOOL"),
    STOP,
    # TRT-LLM-style separate sampling inputs (they override sampling_parameters)
    _optional("temperature", "FP32"),
    _optional("top_k", "INT32"),
    _optional("top_p", "FP32"),
    _optional("min_p", "FP32"),
    _optional("random_seed", "UINT64"),
    _optional("min_length", "INT32"),
    _optional("stop_words", "BYTES", (-1,)),
    _optional("repetition_penalty", "FP32"),
    _optional("presence_penalty", "FP32"),
    _optional("frequency_penalty", "FP32"),
]

GENERATION_OUTPUTS: list[Tensor] = [
    Tensor("text_output", "BYTES", (-1,)),
    Tensor("finish_reason", "BYTES", (-1,)),  # a FinishReason value on the last response, else ""
    Tensor("num_input_tokens", "INT32", (1,)),
    Tensor("num_output_tokens", "INT32", (1,)),
    Tensor("num_cached_tokens", "INT32", (1,)),  # prompt tokens served from the prefix cache (vLLM's cached_tokens)
    Tensor("num_image_tokens", "INT32", (1,)),  # of the prompt's tokens, image placeholders (OpenAI's image_tokens)
    Tensor("logprobs", "BYTES", (-1,)),  # JSON, when sampling_parameters asked for logprobs
]

# what preprocess hands the vision encoder and granite_llm
INPUT_IDS = Tensor("input_ids", "INT64", (-1,))  # the prompt's tokens, image placeholders expanded
PIXEL_VALUES = Tensor("pixel_values", "FP32", (-1, -1, 3, -1, -1))  # [images, crops, channels, height, width]
IMAGE_SIZES = Tensor("image_sizes", "INT64", (-1, 2))  # [images, (height, width)]
IMAGE_FEATURES = Tensor("image_features", "FP32", (-1, -1))  # every image's features packed in order


@dataclass(frozen=True)
class Model:
    inputs: list[Tensor]
    outputs: list[Tensor]


_MEDIA = [IMAGE, DOCUMENT, MM_PROCESSOR_KWARGS, IMAGE_UUID, DOCUMENT_UUID, CACHE_SALT]
_FRONT = Model([TEXT_INPUT, *_MEDIA, APPLY_CHAT_TEMPLATE, *GENERATION_INPUTS], GENERATION_OUTPUTS)
ENSEMBLE = "granite_vision_ensemble"
MODELS: dict[str, Model] = {
    "preprocess": Model([TEXT_INPUT, *_MEDIA, APPLY_CHAT_TEMPLATE, STOP], [INPUT_IDS, PIXEL_VALUES, IMAGE_SIZES]),
    "vision_encoder": Model([PIXEL_VALUES, IMAGE_SIZES, CACHE_SALT], [IMAGE_FEATURES]),
    # text_input is optional here: a stop request carries none
    "granite_llm": Model([INPUT_IDS, IMAGE_FEATURES, replace(TEXT_INPUT, optional=True), CACHE_SALT,
                          *GENERATION_INPUTS], GENERATION_OUTPUTS),
    "granite_vision": _FRONT,
    ENSEMBLE: _FRONT,
}
# the ensemble's models in order; each step reads the ensemble's inputs and earlier steps' outputs by name
ENSEMBLE_STEPS = ("preprocess", "vision_encoder", "granite_llm")


class FinishReason(str, enum.Enum):
    STOP = "stop"  # eos, stop string or stop token
    LENGTH = "length"  # max_tokens
    CANCELLED = "cancelled"  # client cancel, disconnect or a stop request
    TIMEOUT = "timeout"  # the per-request wall-clock limit
    ERROR = "error"


# TRT-LLM backend input names -> SamplingParams field names (the same meaning, separate optional
# tensors); a few are aliases that no config.pbtxt declares
TRTLLM_INPUTS = {
    "temperature": "temperature", "top_k": "top_k", "runtime_top_k": "top_k", "top_p": "top_p",
    "runtime_top_p": "top_p", "min_p": "min_p", "random_seed": "seed", "min_length": "min_tokens",
    "min_tokens": "min_tokens", "stop_words": "stop", "repetition_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
}
# the separate sampling inputs the configs declare
SAMPLING_INPUT_NAMES = [t.name for t in GENERATION_INPUTS if t.name in TRTLLM_INPUTS]
