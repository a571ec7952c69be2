"""llama.cpp's two converters, run with the two mends our checkpoints need (see
``../shared/notes/llama-cpp-peer.md``), without editing the vendored source:

    python -m bench.llama_cpp_mends llm    SRC  <convert_hf_to_gguf.py arguments>
    python -m bench.llama_cpp_mends mmproj SRC  <convert_image_encoder_to_gguf.py arguments>

- ``llm``: ``convert_hf_to_gguf.py`` names the BPE pre-tokenizer by hashing how the tokenizer splits
  a test string, and refuses one it does not know. Ours (the shipped tiny tokenizer and the random
  checkpoints') is plain byte-level BPE with GPT-2's split regex, which llama.cpp calls ``gpt-2``.
- ``mmproj``: the legacy image-encoder converter reads ``model.vision_model`` (transformers 4's
  ``SiglipVisionModel``); transformers 5 flattened that class, so the loaded model is wrapped in a
  module whose ``vision_model`` it is (the state dict's names then match too).
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path


def _is_gpt2_byte_level(tokenizer) -> bool:
    pre = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    return pre.get("type") == "ByteLevel" and pre.get("use_regex", True)


def run_llm(src: Path, argv: list[str]) -> None:
    sys.path[:0] = [str(src), str(src / "gguf-py")]
    from conversion import base  # the vendored converter's own package

    known = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return known(self, tokenizer)
        except NotImplementedError:
            if _is_gpt2_byte_level(tokenizer):
                return "gpt-2"
            raise

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = [str(src / "convert_hf_to_gguf.py"), *argv]
    runpy.run_path(sys.argv[0], run_name="__main__")


def run_mmproj(src: Path, argv: list[str]) -> None:
    sys.path[:0] = [str(src / "gguf-py")]
    import torch
    from transformers import SiglipVisionModel

    load = SiglipVisionModel.from_pretrained

    class WithVisionModel(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.vision_model = model.vision_model if hasattr(model, "vision_model") else model

    SiglipVisionModel.from_pretrained = lambda *a, **k: WithVisionModel(load(*a, **k))
    script = src / "tools" / "mtmd" / "legacy-models" / "convert_image_encoder_to_gguf.py"
    sys.argv = [str(script), *argv]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    kind, source, rest = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    {"llm": run_llm, "mmproj": run_mmproj}[kind](source, rest)
