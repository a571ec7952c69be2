"""LLaVA-Next with a SigLIP tower and a Granite LLM: Granite Vision. Every fact about it is here.

The vision side runs FMS's LlavaNext loaded with ``vision_only=True`` (tower, projector,
image_newline and the token embeddings); the LLM's side is its ``language_model``.
"""

from __future__ import annotations

import copy
import io

import torch

from spyre_backend.models.merge import merge_image_features
from spyre_backend.models.registry import register
from spyre_backend.models.spec import ModelSpec


def _field(key: str) -> property:
    return property(lambda view: view._section[key])


class _View:
    """One section of config.json, each value read where it is asked for (a key the code never
    asks for may be missing from a config that transformers saved as a diff)."""

    def __init__(self, config: dict, section: str):
        self._config, self._name = config, section

    @property
    def _section(self) -> dict:
        return self._config[self._name]


class TextConfig(_View):
    """The Granite LLM (config.json "text_config")."""

    hidden_size = _field("hidden_size")
    num_layers = _field("num_hidden_layers")
    num_heads = _field("num_attention_heads")
    intermediate_size = _field("intermediate_size")
    vocab_size = _field("vocab_size")

    @property
    def logits_scaling(self) -> float:
        """Granite divides its logits by this (transformers' LlavaNext leaves it out)."""
        return float(self._section.get("logits_scaling", 1.0))

    @property
    def kv_heads(self) -> int:
        return self._section.get("num_key_value_heads") or self.num_heads

    @property
    def head_dim(self) -> int:
        return self._section.get("head_dim") or self.hidden_size // self.num_heads

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """K and V of one token in every layer."""
        return 2 * self.num_layers * self.kv_heads * self.head_dim * dtype.itemsize


class VisionConfig(_View):
    """The SigLIP tower (config.json "vision_config") and the layers the projector takes."""

    hidden_size = _field("hidden_size")
    num_layers = _field("num_hidden_layers")
    intermediate_size = _field("intermediate_size")
    image_size = _field("image_size")  # the side of one square crop, in pixels
    patch_size = _field("patch_size")

    @property
    def patches_per_crop(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """Tower layers whose outputs are concatenated into the projector's input."""
        layers = self._config["vision_feature_layer"]
        return (layers,) if isinstance(layers, int) else tuple(layers)


@register
class LlavaNext(ModelSpec):
    architecture = "LlavaNextForConditionalGeneration"
    vision_weights = ("vision_tower.", "multi_modal_projector.", "image_newline")
    vision_model_weights = vision_weights + ("language_model.model.embed_tokens.",)

    def __init__(self, config: dict):
        super().__init__(config)
        self.text = TextConfig(config, "text_config")
        self.vision = VisionConfig(config, "vision_config")

    @property
    def image_token_id(self) -> int:
        return int(self._config["image_token_index"])

    @property
    def max_crops_per_image(self) -> int:
        # the base crop and a tile per crop-size square of the largest anyres grid ((height, width)
        # pinpoints): an image exactly a pinpoint's size selects that pinpoint
        crop = self.vision.image_size
        return max(1 + (h // crop) * (w // crop) for h, w in self._config["image_grid_pinpoints"])

    @property
    def declared_dtypes(self) -> tuple[str, ...]:
        # transformers writes "dtype", older versions "torch_dtype", at the top or in text_config
        sections = (self._config, self._config.get("text_config") or {})
        return tuple(s[key] for s in sections for key in ("dtype", "torch_dtype") if s.get(key) is not None)

    # -- the language model ------------------------------------------------------------------------
    def load_language_model(self, checkpoint: str, dtype: torch.dtype, device_type: str) -> torch.nn.Module:
        from fms.models import get_model

        full = get_model(architecture="hf_pretrained", model_path=checkpoint, data_type=dtype,
                         device_type=device_type)
        return full.language_model.eval()  # the tower is dropped: it lives in the vision_encoder model

    # -- the vision model ----------------------------------------------------------------------
    def load_vision_model(self, checkpoint: str, dtype: torch.dtype, device_type: str) -> torch.nn.Module:
        from fms.models import get_model  # here, not at the top: reading a config needs no FMS

        model = get_model(architecture="hf_pretrained", model_path=checkpoint, data_type=dtype,
                          device_type=device_type, vision_only=True).eval()
        # SigLIP's attention-pooling head is no part of LlavaNext: its features are hidden states of
        # several layers. FMS builds the head whatever the checkpoint holds (left uninitialised
        # where, as granite-vision-3.3's, it has none) and runs it in the tower's forward; a server
        # that fed it the multi-layer features broke (vLLM #32299). Dropped: encode_crops runs the
        # headless tower.
        model.vision_tower.head = None
        return model

    def crops_per_image(self, model: torch.nn.Module, image_size: torch.Tensor) -> int:
        return model.image_size_to_num_patches(image_size, model.config.image_grid_pinpoints, self.vision.image_size)

    def encode_crops(self, model: torch.nn.Module, crops: torch.Tensor) -> torch.Tensor:
        """Projected multi-layer features of every crop."""
        config = model.config
        _, hidden_states = model.vision_tower.base_model(crops, output_hidden_states=True)  # no pooling head
        layers = config.vision_feature_layer
        layers = [layers] if isinstance(layers, int) else layers
        selected = torch.cat([hidden_states[i] for i in layers], dim=-1)
        if config.vision_feature_select_strategy == "default":
            selected = selected[:, 1:]  # drop CLS (SigLIP has none: Granite Vision uses "full")
        return model.multi_modal_projector(selected)

    def pack_image(self, model: torch.nn.Module, crop_features: torch.Tensor, image_size: torch.Tensor) -> torch.Tensor:
        """The base crop's features, then the grid's unpadded, each row ended by image_newline."""
        return model.pack_image_features([crop_features], image_size[None], image_newline=model.image_newline)

    # -- the LLM's side ------------------------------------------------------------------------
    merge = staticmethod(merge_image_features)

    @staticmethod
    def warmup_request() -> tuple[str, list[bytes]]:
        """A real encoded image through the real processor (its content does not matter, its path does)."""
        from PIL import Image, ImageDraw

        image = Image.new("RGB", (200, 150), "white")
        ImageDraw.Draw(image).polygon([(100, 20), (30, 130), (170, 130)], fill="green")
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return "What is in the image?", [buf.getvalue()]

    # -- rewriting a checkpoint ----------------------------------------------------------------
    def text_attention_weight(self, name: str) -> str | None:
        if "language_model" not in name or ".self_attn." not in name:
            return None
        for projection in "qkvo":
            if name.endswith(f"{projection}_proj.weight"):
                return projection
        return "bias" if name.endswith("bias") else None

    def with_text_head_dim(self, head_dim: int) -> dict:
        config = copy.deepcopy(self._config)
        config["text_config"]["head_dim"] = head_dim
        return config
