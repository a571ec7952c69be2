"""Every config.pbtxt place that repeats the generation schema matches spyre_backend/serving/schema.py."""

from __future__ import annotations

import re

import pytest

from spyre_backend import MODEL_REPOSITORY
from spyre_backend.engine.sampling_params import TRTLLM_INPUTS
from spyre_backend.serving.schema import GENERATION_INPUTS, GENERATION_OUTPUTS, SAMPLING_INPUT_NAMES, pbtxt_lines

ENTRY = re.compile(r'\{\s*name:\s*"(\w+)"\s*data_type:\s*(\w+)\s*dims:\s*\[([^\]]*)\]\s*(optional:\s*true)?\s*\}')


def entries(text: str, section: str) -> dict[str, tuple[str, list[int], bool]]:
    block = re.search(rf"^{section}\s*\[(.*?)^\]", text, re.S | re.M).group(1)
    return {m[1]: (m[2], [int(x) for x in m[3].replace(",", " ").split()], bool(m[4])) for m in ENTRY.finditer(block)}


@pytest.mark.parametrize("model", ["granite_llm", "granite_vision", "granite_vision_ensemble"])
def test_generation_inputs_and_outputs_match_the_schema(model):
    text = (MODEL_REPOSITORY / model / "config.pbtxt").read_text()
    inputs, outputs = entries(text, "input"), entries(text, "output")
    for name, dtype, dims in GENERATION_INPUTS:
        assert inputs.get(name) == (dtype, dims, True), f"{model}: input {name}"
    for name, dtype, dims in GENERATION_OUTPUTS:
        assert outputs.get(name) == (dtype, dims, False), f"{model}: output {name}"
    assert set(outputs) == {n for n, _, _ in GENERATION_OUTPUTS}


def test_the_ensemble_passes_every_generation_input_and_output_to_and_from_the_llm():
    text = (MODEL_REPOSITORY / "granite_vision_ensemble" / "config.pbtxt").read_text()
    step = text[text.index('model_name: "granite_llm"'):]
    inputs = dict(re.findall(r'input_map\s*\{\s*key:\s*"(\w+)"\s*value:\s*"(\w+)"', step))
    outputs = dict(re.findall(r'output_map\s*\{\s*key:\s*"(\w+)"\s*value:\s*"(\w+)"', step))
    assert all(inputs.get(n) == n for n, _, _ in GENERATION_INPUTS)
    assert all(outputs.get(n) == n for n, _, _ in GENERATION_OUTPUTS)


def test_every_declared_sampling_input_is_read():
    assert set(SAMPLING_INPUT_NAMES) <= set(TRTLLM_INPUTS)
    assert len(SAMPLING_INPUT_NAMES) == 10
    assert pbtxt_lines(GENERATION_INPUTS[:1], True) == ['{ name: "max_tokens" data_type: TYPE_INT32 dims: [ 1 ] optional: true }']
