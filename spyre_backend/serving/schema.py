"""The Triton schema of a generation request, written once.

The same generation inputs and outputs appear in three ``config.pbtxt`` files (``granite_llm``,
the ``granite_vision`` front and ``granite_vision_ensemble``) and in the ensemble's step that
feeds ``granite_llm``; ``tests/test_model_configs.py`` checks every one of those places against
this module, and ``triton_io`` reads the separate sampling inputs by these names.
"""

from __future__ import annotations

from spyre_backend.engine.sampling_params import TRTLLM_INPUTS

# (name, Triton data type, dims) of the optional inputs every generation entry point accepts
GENERATION_INPUTS: list[tuple[str, str, list[int]]] = [
    ("max_tokens", "TYPE_INT32", [1]),
    ("stream", "TYPE_BOOL", [1]),
    ("sampling_parameters", "TYPE_STRING", [1]),
    ("exclude_input_in_output", "TYPE_BOOL", [1]),
    ("stop", "TYPE_BOOL", [1]),
    # TRT-LLM-style separate sampling inputs (they override sampling_parameters)
    ("temperature", "TYPE_FP32", [1]),
    ("top_k", "TYPE_INT32", [1]),
    ("top_p", "TYPE_FP32", [1]),
    ("min_p", "TYPE_FP32", [1]),
    ("random_seed", "TYPE_UINT64", [1]),
    ("min_length", "TYPE_INT32", [1]),
    ("stop_words", "TYPE_STRING", [-1]),
    ("repetition_penalty", "TYPE_FP32", [1]),
    ("presence_penalty", "TYPE_FP32", [1]),
    ("frequency_penalty", "TYPE_FP32", [1]),
]

GENERATION_OUTPUTS: list[tuple[str, str, list[int]]] = [
    ("text_output", "TYPE_STRING", [-1]),
    ("finish_reason", "TYPE_STRING", [-1]),
    ("num_input_tokens", "TYPE_INT32", [1]),
    ("num_output_tokens", "TYPE_INT32", [1]),
    ("num_cached_tokens", "TYPE_INT32", [1]),  # prompt tokens served from the prefix cache (vLLM's cached_tokens)
    ("logprobs", "TYPE_STRING", [-1]),
]

# the separate sampling inputs declared in the configs (TRTLLM_INPUTS also takes a few aliases)
SAMPLING_INPUT_NAMES = [name for name, _, _ in GENERATION_INPUTS if name in TRTLLM_INPUTS]


def pbtxt_lines(entries: list[tuple[str, str, list[int]]], optional: bool) -> list[str]:
    """The entries as config.pbtxt ``input``/``output`` lines (what the configs hold)."""
    suffix = " optional: true" if optional else ""
    return [f'{{ name: "{n}" data_type: {t} dims: [ {", ".join(map(str, d))} ]{suffix} }}' for n, t, d in entries]
