"""What the serving code may ask of a model architecture; each architecture file implements it."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:  # annotations only: reading a config loads no torch
    import torch


class ModelSpec:
    """One checkpoint's architecture, made from its config.json dict (``get_spec``).

    Config views, each value read from config.json where it is asked for:
    - ``text``: the LLM: ``hidden_size``, ``num_layers``, ``num_heads``, ``kv_heads``, ``head_dim``,
      ``intermediate_size``, ``vocab_size``, ``kv_bytes_per_token(dtype)``;
    - ``vision``: the tower: ``hidden_size``, ``num_layers``, ``intermediate_size``, ``image_size``
      (a crop's side, pixels), ``patch_size``, ``patches_per_crop``, ``feature_layers``.
    """

    architecture: ClassVar[str]  # config.json's architectures[0]
    # prefixes of the checkpoint's tensor names: those only the vision encoder uses (the decoder's
    # load reads and drops them), and all those its vision-only model loads
    vision_weights: ClassVar[tuple[str, ...]]
    vision_model_weights: ClassVar[tuple[str, ...]]

    def __init__(self, config: dict):
        self._config = config  # read by the architecture's file only

    # -- facts ---------------------------------------------------------------------------------
    @property
    def image_token_id(self) -> int:
        raise NotImplementedError

    @property
    def max_crops_per_image(self) -> int:
        """The most crops one image can send through the vision tower."""
        raise NotImplementedError

    @property
    def declared_dtypes(self) -> tuple[str, ...]:
        """Every dtype the config says the weights were saved in, the one to believe first."""
        raise NotImplementedError

    # -- the language model ------------------------------------------------------------------------
    def load_language_model(self, checkpoint: str, dtype: torch.dtype, device_type: str) -> torch.nn.Module:
        """The FMS decoder that takes embeddings (``base_model``, ``head``), without the vision tower."""
        raise NotImplementedError

    # -- the vision model ----------------------------------------------------------------------
    def load_vision_model(self, checkpoint: str, dtype: torch.dtype, device_type: str) -> torch.nn.Module:
        """The vision tower and what packs its features, without the LLM's decoder layers."""
        raise NotImplementedError

    def crops_per_image(self, model: torch.nn.Module, image_size: torch.Tensor) -> int:
        """Real crops (no padding) the processor made of an image of ``image_size`` (height, width)."""
        raise NotImplementedError

    def encode_crops(self, model: torch.nn.Module, crops: torch.Tensor) -> torch.Tensor:
        """[n, 3, H, W] crops -> [n, patches, text hidden] features; crops never interact."""
        raise NotImplementedError

    def pack_image(self, model: torch.nn.Module, crop_features: torch.Tensor, image_size: torch.Tensor) -> torch.Tensor:
        """One image's crop features -> [its placeholder count, text hidden], in prompt order."""
        raise NotImplementedError

    # -- the LLM's side ------------------------------------------------------------------------
    @staticmethod
    def merge(token_ids: torch.Tensor, embeds: torch.Tensor, image_features: torch.Tensor | None,
              image_token_id: int) -> torch.Tensor:
        """token_ids [b, s], embeds [b, s, h], features [b, n, h] | None -> merged embeds."""
        raise NotImplementedError

    @staticmethod
    def warmup_request() -> tuple[str, list[bytes]]:
        """(question, [encoded image bytes]) that exercises the real image path at warmup."""
        raise NotImplementedError

    # -- rewriting a checkpoint (the vLLM peer's head padding) ----------------------------------
    def text_attention_weight(self, name: str) -> str | None:
        """"q", "k", "v" or "o" for the weight of one of the LLM's attention projections, "bias"
        for one of their biases, None for any other tensor of the checkpoint."""
        raise NotImplementedError

    def with_text_head_dim(self, head_dim: int) -> dict:
        """A copy of the config.json dict whose LLM has attention heads of ``head_dim``."""
        raise NotImplementedError
