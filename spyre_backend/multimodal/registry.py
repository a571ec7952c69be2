"""Architecture name (``architectures[0]`` of a HF config.json) -> its multimodal utilities."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch


@dataclass(frozen=True)
class MultimodalSpec:
    architecture: str
    # the text (LLM) and vision parts of the HF config.json dict
    unwrap_config: Callable[[dict], tuple[dict, dict]]
    image_token_id: Callable[[dict], int]
    # token_ids [b, s], embeds [b, s, h], features [b, n, h] | None -> merged embeds
    merge: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, int], torch.Tensor]
    # (question, [encoded image bytes]) that exercises the real image path at warmup, and the
    # image sizes (width, height) that reach every crop count the vision tower can be given
    warmup_request: Callable[[], tuple[str, list[bytes]]]
    warmup_image_sizes: Callable[[dict], list[tuple[int, int]]]


_SPECS: dict[str, MultimodalSpec] = {}


def register(spec: MultimodalSpec) -> MultimodalSpec:
    _SPECS[spec.architecture] = spec
    return spec


def get_spec(checkpoint: str | Path) -> MultimodalSpec:
    config = json.loads((Path(checkpoint) / "config.json").read_text())
    architecture = (config.get("architectures") or [config.get("model_type", "?")])[0]
    _load_builtin()
    if architecture not in _SPECS:
        raise ValueError(f"unsupported architecture {architecture!r}; supported: {sorted(_SPECS)}")
    return _SPECS[architecture]


def read_config(checkpoint: str | Path) -> dict:
    return json.loads((Path(checkpoint) / "config.json").read_text())


def _load_builtin() -> None:
    from spyre_backend.multimodal import llava_next  # noqa: F401  (registers itself)
