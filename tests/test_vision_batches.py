"""How an image's crops are split into the vision tower's static batch sizes."""

from __future__ import annotations

import pytest
import torch

from spyre_backend.preprocess.processor import Preprocessor
from spyre_backend.vision.encoder import VisionEncoder, auto_crop_batch, crop_batches
from testkit.images import shape_png


@pytest.mark.parametrize("n, max_batch, expected", [
    (1, 128, [1]), (2, 128, [2]), (3, 128, [4]), (7, 128, [8]),  # one padding crop at most: one run
    (5, 128, [4, 1]), (6, 128, [4, 2]), (11, 16, [8, 4]), (13, 16, [8, 4, 1]),  # else no padding at all
    (5, 2, [2, 2, 1]), (11, 2, [2, 2, 2, 2, 2, 1]), (8, 1, [1] * 8),  # capped by max_crop_batch
])
def test_crop_batches(n, max_batch, expected):
    batches = crop_batches(n, max_batch)
    assert batches == expected
    assert sum(batches) - n <= 1 and all(b <= max_batch and b & (b - 1) == 0 for b in batches)


def test_auto_crop_batch_fills_about_2048_patch_rows():
    assert auto_crop_batch(729) == 2  # 384 px SigLIP crops (Granite Vision, the mid-size checkpoint)
    assert auto_crop_batch(576) == 2
    assert auto_crop_batch(16) == 128  # the tiny checkpoint's 56 px crops
    assert auto_crop_batch(5000) == 1


def test_max_crop_batch_is_a_power_of_two_never_above_the_setting(checkpoint):
    assert VisionEncoder(str(checkpoint), max_crop_batch=3).max_crop_batch == 2
    assert VisionEncoder(str(checkpoint), max_crop_batch=4).max_crop_batch == 4


def test_split_runs_give_the_features_of_one_run(checkpoint):
    # an image of several crops (the tiny grid tiles 200x150 into a base crop and 6 tiles)
    prompt = Preprocessor(str(checkpoint))("What is it?", [shape_png("square", "red", "white", (200, 150))],
                                           apply_chat_template=True)
    pixels, sizes = torch.from_numpy(prompt.pixel_values), torch.from_numpy(prompt.image_sizes)
    whole = VisionEncoder(str(checkpoint))
    split = VisionEncoder(str(checkpoint), max_crop_batch=2)
    assert whole.max_crop_batch == 128 and split.max_crop_batch == 2
    one_run, in_pieces = whole.encode(pixels, sizes), split.encode(pixels, sizes)
    assert sorted(whole.crop_batches_run) == [8] and sorted(split.crop_batches_run) == [1, 2]
    assert in_pieces.shape == one_run.shape
    torch.testing.assert_close(in_pieces, one_run, rtol=1e-4, atol=1e-5)  # same crops, other GEMM sizes
