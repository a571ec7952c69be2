"""FMS (what we serve) and transformers (the oracle) agree on the same checkpoint and inputs."""

from __future__ import annotations

import torch
from fms.models import get_model

from testkit.images import shape_png


@torch.no_grad()
def test_prefill_logits_agree(checkpoint, reference):
    fms_model = get_model(architecture="hf_pretrained", model_path=str(checkpoint), data_type=torch.float32).eval()
    images = [shape_png("triangle", "green", "white", (200, 150)), shape_png("circle", "red", "blue", (50, 300))]
    inputs = reference.inputs(reference.chat_prompt("What is in the second image?", 2), images)
    hf_logits = reference.model(**inputs).logits[0]

    features = fms_model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
    features = fms_model.pack_image_features(features, inputs["image_sizes"], image_newline=fms_model.image_newline)
    ids = inputs["input_ids"]
    embeds = fms_model.language_model.base_model.embedding(ids)
    embeds[ids == fms_model.config.image_token_index] = features
    fms_logits = fms_model(embeds)[0]

    scaling = fms_model.config.text_config.logits_scaling
    assert scaling != 1.0  # the checkpoint exercises Granite's logits scaling
    # transformers' LlavaNext does not divide by logits_scaling; FMS (like Granite itself) does
    torch.testing.assert_close(fms_logits * scaling, hf_logits, atol=1e-4, rtol=0)
    assert torch.equal(fms_logits.argmax(-1), hf_logits.argmax(-1))
