"""The tiny checkpoint's architecture: granite-vision-3.2-2b's (SigLIP tower with 27 layers and
multi-layer features, gelu projector, image_newline, anyres pinpoints, Granite LM with GQA and
muP-style multipliers, tied embeddings), only small; other sizes for random_checkpoint."""

from __future__ import annotations

from transformers import GraniteConfig, LlavaNextConfig, LlavaNextProcessor, PreTrainedTokenizerFast, SiglipVisionConfig
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from .tokenizer import CHAT_TEMPLATE, IMAGE_TOKEN

# Crops of 56 px with 14 px patches give 4x4 = 16 features per crop.
CROP = 56
PATCH = 14
# (height, width) multiples of the crop, like the real model's 384-based list (which also starts
# with the 1x1 grid): enough variety that wide, tall and square images take different paths.
GRID_PINPOINTS = [
    [56, 56],
    [56, 112],
    [112, 56],
    [112, 112],
    [56, 168],
    [168, 56],
    [112, 168],
    [168, 112],
    [56, 224],
    [224, 56],
]
VISION_FEATURE_LAYERS = [-24, -20, -12, -1]  # as granite-vision-3.2-2b; needs >= 24 layers

# Granite's multipliers, all != 1 so every code path that applies them is exercised.
EMBEDDING_MULTIPLIER = 12.0
RESIDUAL_MULTIPLIER = 0.22
ATTENTION_MULTIPLIER = 0.0625  # 1/head_dim (muP-style, as Granite 2B: 1/64 for head_dim 64)
LOGITS_SCALING = 8.0


def scaled_pinpoints(crop: int) -> list[list[int]]:
    """GRID_PINPOINTS for another crop size (the same grids of crops)."""
    return [[h // CROP * crop, w // CROP * crop] for h, w in GRID_PINPOINTS]


def build_processor(tokenizer: PreTrainedTokenizerFast, crop: int = CROP,
                    pinpoints: list[list[int]] | None = None) -> LlavaNextProcessor:
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": crop},
        crop_size={"height": crop, "width": crop},
        image_grid_pinpoints=pinpoints or scaled_pinpoints(crop),
        image_mean=[0.5, 0.5, 0.5],  # SigLIP normalisation
        image_std=[0.5, 0.5, 0.5],
        do_pad=True,
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="full",  # SigLIP has no CLS token to drop
        num_additional_image_tokens=0,
        image_token=IMAGE_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )


def build_config(
    tokenizer: PreTrainedTokenizerFast, text_init_std: float = 0.02, vision_hidden: int = 32, vision_heads: int = 2,
    *, crop: int = CROP, text_hidden: int = 64, text_layers: int = 4, text_heads: int = 4, text_kv_heads: int = 2,
    attention_multiplier: float = ATTENTION_MULTIPLIER, vision_intermediate: int = 0, text_intermediate: int = 0,
    rope_theta: float = 10000.0, max_positions: int = 4096, pinpoints: list[list[int]] | None = None,
    vision_use_head: bool = True,
) -> LlavaNextConfig:
    """The shipped tiny shape by default; the keywords give other sizes of the same architecture
    (random_checkpoint.py builds a mid-size one for benchmarks, and the
    published 2b shape). Intermediate sizes of 0 mean 4x the width."""
    vocab_size = len(tokenizer)
    vision = SiglipVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_intermediate or 4 * vision_hidden,
        num_hidden_layers=27,
        num_attention_heads=vision_heads,
        image_size=crop,
        patch_size=PATCH,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
        vision_use_head=vision_use_head,  # SigLIP's pooling head: weights only, LlavaNext never uses it
    )
    text = GraniteConfig(
        vocab_size=vocab_size,
        hidden_size=text_hidden,
        intermediate_size=text_intermediate or 4 * text_hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        num_key_value_heads=text_kv_heads,
        hidden_act="silu",
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        rope_theta=rope_theta,
        embedding_multiplier=EMBEDDING_MULTIPLIER,
        residual_multiplier=RESIDUAL_MULTIPLIER,
        attention_multiplier=attention_multiplier,
        logits_scaling=LOGITS_SCALING,
        tie_word_embeddings=True,
        initializer_range=text_init_std,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_grid_pinpoints=pinpoints or scaled_pinpoints(crop),
        vision_feature_layer=VISION_FEATURE_LAYERS,
        vision_feature_select_strategy="full",
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=True,
    )
    config.architectures = ["LlavaNextForConditionalGeneration"]
    return config
