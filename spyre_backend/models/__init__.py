"""Every fact about a model architecture, one file per architecture (as FMS keeps its models).

``get_spec(checkpoint)`` reads the checkpoint's config.json and returns its architecture's
``ModelSpec``: the text and vision shapes, the image token, the dtype the checkpoint was saved in,
which weights belong to which model, the vision tower's call, the merge of image features and a
real warmup input. Nothing outside this package reads a config.json dict or calls into an
architecture's model internals. Adding a model means adding one file that registers its spec.
"""

from spyre_backend.models.merge import ImageFeatureMismatch, merge_image_features
from spyre_backend.models.registry import get_spec, read_config, register, spec_from_config
from spyre_backend.models.spec import ModelSpec

__all__ = ["ImageFeatureMismatch", "ModelSpec", "get_spec", "merge_image_features", "read_config", "register",
           "spec_from_config"]
