"""HiDream-E1 source sizing: E1.1's resize_image at image_size = sqrt(budget) (halving, the
sixteen-multiple candidates, BICUBIC resize and a centred crop), E1-Full's exact resize, and the
transformer's max_seq rule."""

import numpy as np
import pytest
from PIL import Image

from e1_support import e1_1_budget, e1_full_size, golden, pixels_per_token
from hidream_mlx.families.i1.e1.sizes import (BUDGET, EXACT, EditSizeError, budget_image_size, edit_max_seq,
                                                resize_plan, resize_source, restore_source_size)


def test_the_fixture_source_resizes_to_both_recorded_pipeline_images():
    latents = golden("image_latents")
    source = Image.fromarray(latents["source_image"])
    np.testing.assert_array_equal(np.asarray(resize_source(source, BUDGET, *e1_1_budget())),
                                  latents["e1_1.resized_image"])
    np.testing.assert_array_equal(np.asarray(resize_source(source, EXACT, *e1_full_size())),
                                  latents["e1_full.resized_image"])


def test_a_source_twice_the_budget_side_is_halved_then_rows_are_cropped_from_the_centre():
    # 700x300 at 128^2: halved once (min side 300 >= 256) to 350x150; k = sqrt(16384/52500);
    # 195.5 -> 192 and 83.8 -> 80 whichever rounding; s1 = 350/192 < s2 = 150/80, so the width
    # fits: resize to 192 x round(150 / s1) = 82, crop rows from (82 - 80) // 2 = 1.
    plan = resize_plan(BUDGET, (700, 300), 128, 128)
    assert (plan.halvings, plan.halved) == (1, (350, 150))
    assert (plan.resized, plan.crop, plan.size) == ((192, 82), (0, 1, 192, 81), (192, 80))


def test_a_tall_source_keeps_its_aspect_within_the_budget():
    # 90x200 at 96^2: k = sqrt(9216/18000); 64.4 -> 64, 143.1 -> 128; resize to 64 x 142, crop from 7.
    plan = resize_plan(BUDGET, (90, 200), 96, 96)
    assert (plan.halvings, plan.resized, plan.crop, plan.size) == (0, (64, 142), (0, 7, 64, 135), (64, 128))


def test_when_the_height_fits_tighter_columns_are_cropped():
    # 250x100 at 128^2: 202.4 -> 192, 80.95 -> 80; s1 = 250/192 >= s2 = 100/80: resize to
    # round(250 / 1.25) = 200 x 80, crop columns from (200 - 192) // 2 = 4.
    plan = resize_plan(BUDGET, (250, 100), 128, 128)
    assert (plan.resized, plan.crop, plan.size) == ((200, 80), (4, 0, 196, 80), (192, 80))


def test_resize_source_follows_its_plan_halving_with_box_then_bicubic_then_crop():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (300, 700, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    halved = image.resize((350, 150), resample=Image.BOX)
    expected = halved.resize((192, 82), resample=Image.BICUBIC).crop((0, 1, 192, 81))
    np.testing.assert_array_equal(np.asarray(resize_source(image, BUDGET, 128, 128)), np.asarray(expected))


def test_the_budget_side_is_the_square_root_of_width_times_height():
    assert budget_image_size(1024, 1024) == 1024 and isinstance(budget_image_size(1024, 1024), int)
    assert budget_image_size(1280, 768) == pytest.approx((1280 * 768) ** 0.5)
    wide = resize_plan(BUDGET, (1280, 768), 1280, 768)
    assert wide.size[0] * wide.size[1] <= 1280 * 768 and wide.size[0] % 16 == 0 == wide.size[1] % 16


def test_e1_full_resizes_to_exactly_the_request_whatever_the_aspect():
    plan = resize_plan(EXACT, (300, 100), 96, 160)
    assert (plan.size, plan.halvings, plan.crop) == ((96, 160), 0, (0, 0, 96, 160))


def test_max_seq_is_twice_the_patch_tokens_of_the_request_area():
    assert edit_max_seq(1024, 1024) == 8192 and edit_max_seq(768, 768) == 4608
    assert edit_max_seq(*e1_1_budget(), pixels_per_token()) == int(golden("e1_1_sampling")["max_seq"])
    assert edit_max_seq(*e1_full_size(), pixels_per_token()) == int(golden("e1_full_sampling")["max_seq"])


@pytest.mark.parametrize("source", [(700, 300), (90, 200), (250, 100), (3000, 2000), (160, 160)])
def test_every_resized_source_fits_the_max_seq_of_its_request(source):
    for width, height in ((128, 128), (96, 160), (1024, 1024)):
        w, h = resize_plan(BUDGET, source, width, height).size
        assert 2 * (w // 16) * (h // 16) <= edit_max_seq(width, height)


@pytest.mark.parametrize("rule,size,message", [
    (EXACT, (100, 96), "multiple of 16"),
    (BUDGET, (8, 8), "budget below"),
    (BUDGET, (0, 64), "positive"),
])
def test_sizes_the_rules_cannot_use_are_refused(rule, size, message):
    with pytest.raises(EditSizeError, match=message):
        resize_plan(rule, (160, 160), *size)


def test_an_aspect_too_extreme_for_the_budget_is_refused_not_divided_by_zero():
    with pytest.raises(EditSizeError, match="fits no image"):
        resize_plan(BUDGET, (20, 762), 96, 96)


def test_keep_source_size_resizes_the_edit_back_to_the_source():
    edited = Image.fromarray(np.zeros((80, 192, 3), np.uint8))
    assert restore_source_size(edited, (700, 300)).size == (700, 300)
    assert restore_source_size(edited, (192, 80)) is edited
