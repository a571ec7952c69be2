"""Every config.pbtxt place that repeats the generation schema matches spyre_backend/protocol, which
generates them (python -m spyre_backend.protocol.pbtxt --write)."""

from __future__ import annotations

import re

import pytest

from spyre_backend import MODEL_REPOSITORY
from spyre_backend.protocol import GENERATION_INPUTS, GENERATION_OUTPUTS, MODELS, SAMPLING_INPUT_NAMES, TRTLLM_INPUTS
from spyre_backend.protocol import pbtxt

ENTRY = re.compile(r'\{\s*name:\s*"(\w+)"\s*data_type:\s*(\w+)\s*dims:\s*\[([^\]]*)\]\s*(optional:\s*true)?\s*\}')


def entries(text: str, section: str) -> dict[str, tuple[str, list[int], bool]]:
    block = re.search(rf"^{section}\s*\[(.*?)^\]", text, re.S | re.M).group(1)
    return {m[1]: (m[2], [int(x) for x in m[3].replace(",", " ").split()], bool(m[4])) for m in ENTRY.finditer(block)}


def pbtxt_type(data_type: str) -> str:
    return "TYPE_STRING" if data_type == "BYTES" else f"TYPE_{data_type}"


@pytest.mark.parametrize("model", ["granite_llm", "granite_vision", "granite_vision_ensemble"])
def test_generation_inputs_and_outputs_match_the_schema(model):
    text = (MODEL_REPOSITORY / model / "config.pbtxt").read_text()
    inputs, outputs = entries(text, "input"), entries(text, "output")
    for t in GENERATION_INPUTS:
        assert inputs.get(t.name) == (pbtxt_type(t.data_type), list(t.dims), True), f"{model}: input {t.name}"
    for t in GENERATION_OUTPUTS:
        assert outputs.get(t.name) == (pbtxt_type(t.data_type), list(t.dims), False), f"{model}: output {t.name}"
    assert set(outputs) == {t.name for t in GENERATION_OUTPUTS}


def test_the_ensemble_passes_every_generation_input_and_output_to_and_from_the_llm():
    text = (MODEL_REPOSITORY / "granite_vision_ensemble" / "config.pbtxt").read_text()
    step = text[text.index('model_name: "granite_llm"'):]
    inputs = dict(re.findall(r'input_map\s*\{\s*key:\s*"(\w+)"\s*value:\s*"(\w+)"', step))
    outputs = dict(re.findall(r'output_map\s*\{\s*key:\s*"(\w+)"\s*value:\s*"(\w+)"', step))
    assert all(inputs.get(t.name) == t.name for t in GENERATION_INPUTS)
    assert all(outputs.get(t.name) == t.name for t in GENERATION_OUTPUTS)


def test_every_declared_sampling_input_is_read():
    assert set(SAMPLING_INPUT_NAMES) <= set(TRTLLM_INPUTS)
    assert len(SAMPLING_INPUT_NAMES) == 10
    assert pbtxt.entry(GENERATION_INPUTS[0]) == '{ name: "max_tokens" data_type: TYPE_INT32 dims: [ 1 ] optional: true }'


@pytest.mark.parametrize("model", list(MODELS))
def test_every_config_pbtxt_is_what_the_schema_generates(model):
    """Fails when a config.pbtxt and spyre_backend/protocol differ: run
    python -m spyre_backend.protocol.pbtxt --write (after changing the schema, never the pbtxt)."""
    text = pbtxt.config_path(model).read_text()
    assert text == pbtxt.rewritten(text, model), f"{model}/config.pbtxt differs from the schema"
    inputs, outputs = entries(text, "input"), entries(text, "output")
    assert inputs == {t.name: (pbtxt_type(t.data_type), list(t.dims), t.optional) for t in MODELS[model].inputs}
    assert outputs == {t.name: (pbtxt_type(t.data_type), list(t.dims), t.optional) for t in MODELS[model].outputs}


def test_the_check_finds_a_hand_edited_config(tmp_path):
    for model in MODELS:
        (tmp_path / model).mkdir()
        (tmp_path / model / "config.pbtxt").write_text(pbtxt.config_path(model).read_text())
    assert pbtxt.stale(tmp_path) == []
    edited = tmp_path / "granite_llm" / "config.pbtxt"
    edited.write_text(edited.read_text().replace('"top_k" data_type: TYPE_INT32', '"top_k" data_type: TYPE_INT64'))
    assert pbtxt.stale(tmp_path) == ["granite_llm"]


def test_the_ensemble_steps_feed_each_model_from_the_ones_before():
    text = (MODEL_REPOSITORY / "granite_vision_ensemble" / "config.pbtxt").read_text()
    steps = re.findall(r'model_name:\s*"(\w+)"(.*?)\n    \}', text, re.S)
    assert [name for name, _ in steps] == ["preprocess", "vision_encoder", "granite_llm"]
    maps = {name: dict(re.findall(r'input_map\s*\{\s*key:\s*"(\w+)"\s*value:\s*"(\w+)"', body)) for name, body in steps}
    assert maps["vision_encoder"] == {"pixel_values": "_pixel_values", "image_sizes": "_image_sizes",
                                      "cache_salt": "cache_salt"}
    assert maps["granite_llm"]["input_ids"] == "_input_ids" and maps["granite_llm"]["image_features"] == "_image_features"
    assert maps["granite_llm"]["cache_salt"] == "cache_salt"
    assert maps["preprocess"] == {n: n for n in ("text_input", "image", "document", "mm_processor_kwargs", "image_uuid",
                                                 "document_uuid", "cache_salt", "apply_chat_template", "stop")}


def test_a_text_response_holds_the_generation_outputs_in_their_declared_types():
    from spyre_backend.serving import triton_io

    class FakePbUtils:  # the stub's module: tensors and responses as plain values
        Tensor = staticmethod(lambda name, array: (name, array))
        InferenceResponse = staticmethod(lambda output_tensors: output_tensors)

    tensors = dict(triton_io.text_response(FakePbUtils, "hé", "stop", 3, 2, logprobs=[{"t": 1}], num_cached=1))
    assert list(tensors) == [t.name for t in GENERATION_OUTPUTS]
    assert {n: a.dtype.name for n, a in tensors.items()} == {
        "text_output": "object", "finish_reason": "object", "num_input_tokens": "int32", "num_output_tokens": "int32",
        "num_cached_tokens": "int32", "num_image_tokens": "int32", "logprobs": "object"}
    assert tensors["text_output"][0] == "hé".encode() and tensors["logprobs"][0] == b'[{"t": 1}]'
    assert list(dict(triton_io.text_response(FakePbUtils, "", "", 0, 0, names=["finish_reason"]))) == ["finish_reason"]


def test_config_and_protocol_import_neither_torch_nor_tritonclient():
    """Pure data: the light processes (the granite_vision front, the OpenAI front, clients) read
    them without loading torch; only protocol.client needs tritonclient, when called."""
    import subprocess
    import sys

    code = ("import sys, spyre_backend.config, spyre_backend.protocol, spyre_backend.protocol.pbtxt, "
            "spyre_backend.protocol.client; "
            "print(sorted(m for m in ('torch', 'tritonclient', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['numpy']"  # protocol.client builds numpy arrays


def test_a_model_config_names_only_the_parameters_it_changes(monkeypatch):
    """Parameters absent from a config.pbtxt take config.py's defaults; one equal to its default is
    a second home of the same fact."""
    from spyre_backend.config import ServingConfig, pbtxt_parameters

    known = ServingConfig.parameters()
    for name in known:
        monkeypatch.delenv(f"SPYRE_{name.upper()}", raising=False)

    def value(config, name):
        return getattr(getattr(config, known[name]) if known[name] else config, name)

    defaults = ServingConfig()
    for model in MODELS:
        path = pbtxt.config_path(model)
        config = ServingConfig.from_pbtxt(path)
        for name in pbtxt_parameters(path):
            assert name in known, f"{model}: unknown parameter {name}"
            assert value(config, name) != value(defaults, name), f"{model}: {name} repeats its default"
    served = ServingConfig.from_pbtxt(pbtxt.config_path("granite_llm"), checkpoint="/some/checkpoint")
    assert served.checkpoint == "/some/checkpoint" and served.cache == defaults.cache


def test_client_inputs_are_typed_by_the_schema():
    import numpy as np

    from spyre_backend.protocol.client import infer_inputs

    sent = infer_inputs({"text_input": "hi", "image": [b"a", b"b"], "max_tokens": 8, "stream": True, "temperature": 0.5,
                         "random_seed": 7, "stop_words": ["x", "y"], "top_k": np.array([1.5], dtype=np.float32),
                         "bogus": 3})
    assert {t.name(): (t.datatype(), t.shape()) for t in sent} == {
        "text_input": ("BYTES", [1]), "image": ("BYTES", [2]), "max_tokens": ("INT32", [1]), "stream": ("BOOL", [1]),
        "temperature": ("FP32", [1]), "random_seed": ("UINT64", [1]), "stop_words": ("BYTES", [2]),
        "top_k": ("FP32", [1]),  # an array goes as it is: a wrong type on purpose
        "bogus": ("INT32", [1])}  # no model declares it: typed from the value


def test_clients_read_the_finish_reason_and_counts_by_the_schema():
    import numpy as np

    from spyre_backend.protocol.client import finish_and_counts

    class Result:  # tritonclient's InferResult, as far as it is read
        outputs = {"finish_reason": np.array([b"length"], dtype=object), "num_input_tokens": np.array([5], np.int32),
                   "num_output_tokens": np.array([3], np.int32), "num_cached_tokens": np.array([2], np.int32),
                   "num_image_tokens": np.array([7], np.int32)}

        def as_numpy(self, name):
            return self.outputs[name]

    assert finish_and_counts(Result()) == {"finish_reason": "length", "num_input_tokens": 5, "num_output_tokens": 3,
                                           "num_cached_tokens": 2, "num_image_tokens": 7}
