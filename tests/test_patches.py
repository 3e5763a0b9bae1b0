"""Patches: the reference layout, lossless round trips, and the uint8 conversion."""

import mlx.core as mx
import numpy as np
from conftest import load_case

from hidream_mlx.families.o1.patches import patchify, to_uint8, unpatchify


def test_patch_index_is_channel_then_row_then_column():
    image = np.zeros((3, 64, 96), np.float32)
    image[2, 32 + 5, 64 + 7] = 1.0  # channel 2, patch row 1, patch col 2, py 5, px 7
    patches = patchify(image)
    assert patches.shape == (6, 3072)
    assert np.argwhere(patches).tolist() == [[1 * 3 + 2, 2 * 1024 + 5 * 32 + 7]]


def test_round_trip_is_exact_for_numpy_and_mlx():
    rng = np.random.default_rng(0)
    image = rng.standard_normal((1, 3, 96, 160)).astype(np.float32)
    np.testing.assert_array_equal(unpatchify(patchify(image), 96, 160), image)
    np.testing.assert_array_equal(np.array(unpatchify(patchify(mx.array(image)), 96, 160)), image)


def test_final_image_conversion_matches_the_recorded_images():
    for name in ("dev_sampling.npz", "full_sampling.npz"):
        data = load_case(name)
        h, w, _ = data["image"].shape
        image = to_uint8(unpatchify(data["z"][-1][0], h, w))
        np.testing.assert_array_equal(image, data["image"])
