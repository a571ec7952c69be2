"""The batched merge of image features into token embeddings."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: merging calls tensor methods
    import torch


class ImageFeatureMismatch(ValueError):
    pass


def merge_image_features(token_ids: torch.Tensor, embeds: torch.Tensor,
                         image_features: torch.Tensor | None, image_token_id: int) -> torch.Tensor:
    """Write each row's image features over that row's image placeholder positions.

    token_ids [batch, seq], embeds [batch, seq, hidden], image_features [batch, n_features, hidden]
    (or None for text-only). Every row is merged (FMS's own merge handles batch row 0 only).
    """
    placeholders = token_ids == image_token_id
    counts = placeholders.sum(dim=1)
    n_features = 0 if image_features is None else image_features.shape[1]
    for row, count in enumerate(counts.tolist()):
        if count != n_features:
            raise ImageFeatureMismatch(
                f"prompt row {row} has {count} image placeholder tokens but the vision encoder "
                f"returned {n_features} features")
    if n_features == 0:
        return embeds
    merged = embeds.clone()
    merged[placeholders] = image_features.reshape(-1, image_features.shape[-1]).to(embeds.dtype)
    return merged
