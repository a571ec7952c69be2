"""Per-architecture multimodal utilities, looked up from a checkpoint's config.

Each supported architecture has one file here describing what the serving code needs to know
about it: how to unwrap its config, its image token, how image features are merged into the
token embeddings (every batch row), and a real multimodal warmup input. Adding a model means
adding one file and registering it below.
"""

from spyre_backend.multimodal.merge import ImageFeatureMismatch, merge_image_features
from spyre_backend.multimodal.registry import MultimodalSpec, get_spec, register

__all__ = ["ImageFeatureMismatch", "MultimodalSpec", "get_spec", "merge_image_features", "register"]
