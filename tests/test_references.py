"""Reference images on the prompt side, against the official pipeline's recorded values."""

import dataclasses
import json

import numpy as np
import pytest
from conftest import FIXTURES
from PIL import Image
from tokenizers import Tokenizer

from hidream_mlx.families.o1 import layout, vision_processor
from hidream_mlx.families.o1 import references as refs
from hidream_mlx.families.o1.config import ModelConfig


@pytest.fixture(scope="module")
def utils():
    return np.load(FIXTURES / "utils.npz")


@pytest.fixture(scope="module")
def edit():
    return np.load(FIXTURES / "edit_forward.npz")


@pytest.fixture(scope="module")
def meta():
    return json.loads((FIXTURES / "manifest.json").read_text())["files"]["_meta"]["edit"]


@pytest.fixture(scope="module")
def config():
    return ModelConfig.from_file(FIXTURES / "config.json")


@pytest.fixture(scope="module")
def processor():
    return vision_processor.ImageProcessorConfig.from_file(FIXTURES / "preprocessor_config.json")


@pytest.fixture(scope="module")
def prepared(meta, processor):
    return refs.prepare_references([FIXTURES / meta["ref_png"]], meta["height"], meta["width"], processor)


def _ids(config):
    return dict(image_token_id=config.image_token_id, vision_start_token_id=config.vision_start_token_id)


# --- sizes


def test_resize_reference_sizes(utils):
    for (w, h, max_size, patch), expected in zip(utils["resize_pilimage.in"], utils["resize_pilimage.out_wh"]):
        resized = refs.resize_reference(Image.new("RGB", (int(w), int(h))), int(max_size), int(patch))
        assert resized.size == tuple(expected)


@pytest.mark.parametrize("size, max_size, expected", [
    ((1159, 517), 256, (384, 160)),  # the rounded width wins over the floored one
    ((1502, 1333), 512, (544, 480)),
    ((1600, 1000), 2048, (2560, 1600)),
])
def test_resize_reference_picks_the_largest_rounded_candidate_as_the_official_code(size, max_size, expected):
    # Expected sizes come from the official resize_pilimage (models/utils.py), run on these inputs.
    assert refs.resize_reference(Image.new("RGB", size), max_size).size == expected


def test_resize_reference_pixels(utils):
    resized = refs.resize_reference(Image.open(FIXTURES / "edit_ref.png").convert("RGB"), 64, 32)
    np.testing.assert_array_equal(np.asarray(resized), utils["resize_pilimage.example_128x96_to_64.pixels"])


def test_condition_dimensions(utils):
    for (max_size, ratio), expected in zip(utils["calculate_dimensions.in"], utils["calculate_dimensions.out_wh"]):
        assert refs.condition_dimensions(max_size, ratio) == tuple(expected)


@pytest.mark.parametrize(
    "count, ref_side, cond_side",
    [(1, 2048, 384), (2, 1536, 384), (3, 1024, 384), (4, 1024, 384), (5, 768, 288), (8, 768, 288), (9, 512, 192), (10, 512, 192)],
)
def test_sizes_shrink_as_references_add_up(count, ref_side, cond_side):
    assert refs.reference_max_size(count, 1440, 2048) == ref_side
    assert refs.condition_image_size(count) == cond_side


def test_small_condition_images_are_upscaled_to_min_pixels(processor):
    """With 9-10 refs the ~192^2 conditioning image is below the checkpoint's min_pixels (256^2):
    smart_resize grows it to 256^2."""
    processor = dataclasses.replace(processor, min_pixels=256 * 256)
    pixels, grid = vision_processor.vision_inputs([Image.new("RGB", (192, 192), (10, 200, 30))], processor)
    factor = processor.patch_size * processor.merge_size
    side = -(-256 // factor) * factor // processor.patch_size
    assert grid.tolist() == [[1, side, side]]
    assert pixels.shape == (side * side, 3 * processor.temporal_patch_size * processor.patch_size**2)


# --- conditioning copy, ref patches, prompt


def test_processor_output_equals_reference(prepared, edit):
    np.testing.assert_array_equal(prepared.image_grid_thw, edit["image_grid_thw"])
    assert prepared.pixel_values.dtype == np.float32
    np.testing.assert_array_equal(prepared.pixel_values, edit["pixel_values"])


def test_ref_patches(prepared, edit):
    np.testing.assert_allclose(prepared.ref_patches, edit["ref_patches"][0], atol=1e-6, rtol=0)
    assert sum(r * c for r, c in prepared.ref_grids) == edit["ref_patches"].shape[1]


def test_prompt_text_and_ids(prepared, meta, edit):
    assert refs.edit_prompt_text(meta["prompt"], [1]) == meta["template"] + "<|boi_token|><|tms_token|>"
    text = refs.edit_prompt_text(meta["prompt"], prepared.token_counts)
    tokenizer = Tokenizer.from_file(str(FIXTURES / "tokenizer.json"))
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    np.testing.assert_array_equal(ids, edit["input_ids"][0])


# --- positions


def test_rope_index_t2i(utils, config):
    positions, delta = refs.rope_index(utils["rope_t2i.input_ids_pad"], [[1, 2, 3]], [1], **_ids(config))
    np.testing.assert_array_equal(positions, utils["rope_t2i.position_ids"][:, 0])
    assert delta == utils["rope_t2i.delta"].item()


def test_rope_index_edit(utils, config):
    positions, delta = refs.rope_index(
        utils["rope_edit.input_ids_pad"], utils["rope_edit.image_grid_thw"], [0, 1, 1], **_ids(config)
    )
    np.testing.assert_array_equal(positions, utils["rope_edit.position_ids"][:, 0])
    assert delta == utils["rope_edit.delta"].item()


def test_edit_sequence_positions_and_types(prepared, meta, edit, config):
    seq = refs.edit_sequence(
        edit["input_ids"][0],
        prepared.image_grid_thw,
        (meta["height"], meta["width"]),
        prepared.ref_grids,
        spatial_merge_size=config.vision.spatial_merge_size,
        **_ids(config),
    )
    np.testing.assert_array_equal(seq.position_ids, edit["position_ids"][:, 0])
    np.testing.assert_array_equal(seq.token_types, edit["token_types"][0])
    assert seq.text_len == edit["input_ids"].shape[1]
    assert seq.num_target + seq.num_ref == edit["vinputs"].shape[1]
    assert seq.num_ref == edit["ref_patches"].shape[1]
    assert seq.vinput_mask.sum() == seq.num_target + seq.num_ref and seq.vinput_mask[seq.text_len :].all()


def test_edit_sequence_rejects_prompt_without_matching_pads(prepared, meta, edit, config):
    ids = np.delete(edit["input_ids"][0], 5)
    with pytest.raises(ValueError, match="image_pad"):
        refs.edit_sequence(ids, prepared.image_grid_thw, (64, 64), prepared.ref_grids, spatial_merge_size=2, **_ids(config))


def test_many_references_with_layout(processor, config):
    """3 refs + a layout image: 4 refs in all, positions continue after the target."""
    images = [Image.new("RGB", size, color) for size, color in [((300, 200), "red"), ((100, 400), "blue"), ((256, 256), "green")]]
    boxes = [[0.1, 0.4, 0.1, 0.5], {"bbox": [0.5, 0.9, 0.2, 0.8], "text": "a cat"}, [10, 30, 60, 90]]
    prepared = refs.prepare_references(images, 512, 768, processor, layout_boxes=json.dumps(boxes))
    max_size = refs.reference_max_size(4, 512, 768)
    assert len(prepared.resized_refs) == len(prepared.image_grid_thw) == 4
    assert all(r.width % 32 == 0 and r.height % 32 == 0 and r.width * r.height <= max_size**2 for r in prepared.resized_refs)
    tokens = refs.edit_prompt_text("p", prepared.token_counts)
    ids = Tokenizer.from_file(str(FIXTURES / "tokenizer.json")).encode(tokens, add_special_tokens=False).ids
    seq = refs.edit_sequence(ids, prepared.image_grid_thw, (512, 768), prepared.ref_grids, spatial_merge_size=2, **_ids(config))
    target = seq.position_ids[:, seq.text_len : seq.text_len + seq.num_target]
    ref_part = seq.position_ids[:, seq.text_len + seq.num_target :]
    assert target[:, 0].tolist() == [4096, 4096, 4096]
    assert ref_part.shape[1] == len(prepared.ref_patches) and ref_part.min() == target.max() + 1


# --- layout


def test_layout_boxes_relative_and_percent_agree():
    relative = layout.parse_layout_boxes([[0.1, 0.5, 0.2, 0.6]], 200, 100)
    percent = layout.parse_layout_boxes({"bboxes": [{"box": [10, 50, 20, 60], "label": "x"}]}, 200, 100)
    assert relative[0].bbox == percent[0].bbox == (20, 20, 100, 60)
    assert percent[0].text == "x"


def test_layout_boxes_above_100_are_pixels_of_the_target_as_in_the_official_pipeline():
    lines = []
    boxes = layout.parse_layout_boxes([[0, 512, 128, 384], [0.1, 0.5, 0.2, 0.6]], 1024, 768, note=lines.append)
    assert boxes[0].bbox == (0, 128, 512, 384)  # (x1, y1, x2, y2): the values as given, in pixels
    assert boxes[1].bbox == (102, 154, 512, 461)  # the relative box next to it is still relative
    assert len(lines) == 1 and "layout box 0" in lines[0] and "pixels" in lines[0]


def test_percent_boxes_are_noted_so_a_small_pixel_box_is_not_misread_silently():
    lines = []
    boxes = layout.parse_layout_boxes([[0, 64, 0, 64]], 1024, 1024, note=lines.append)
    assert boxes[0].bbox == (0, 0, 655, 655)
    assert len(lines) == 1 and "percent" in lines[0] and "0..655" in lines[0]


def test_the_unit_is_decided_by_the_largest_absolute_value():
    # |-50| > 1, so the official rule reads the whole box as percent: x -50%..0.5%, y 0%..1%.
    lines = []
    got = layout.parse_layout_boxes([[-50, 0.5, 0, 1]], 256, 256, note=lines.append)[0].bbox
    assert got == (0, 0, 1, 3) and "percent" in lines[0] and "clamped" in lines[0]


def test_a_relative_box_reaching_outside_is_clamped_and_noted():
    lines = []
    got = layout.parse_layout_boxes([[-0.25, 0.5, 0.5, 1.0]], 256, 128, note=lines.append)[0].bbox
    assert got == (0, 64, 128, 127)
    assert len(lines) == 1 and "clamped into the 256x128 image" in lines[0] and "x 0..128, y 64..127" in lines[0]


def test_pixel_boxes_beyond_the_image_are_clamped_to_its_last_pixel():
    lines = []
    got = layout.parse_layout_boxes([[-150, 3000, 10, 200]], 256, 256, note=lines.append)[0].bbox
    assert got == (0, 10, 255, 200) and "pixels" in lines[0] and "clamped" in lines[0]


def test_a_box_inside_the_image_in_relative_units_prints_nothing():
    lines = []
    layout.parse_layout_boxes([[0.0, 1.0, 0.0, 1.0]], 256, 256, note=lines.append)
    assert lines == []


def test_an_empty_layout_list_still_adds_the_black_layout_image(processor):
    lines = []
    assert layout.parse_layout_boxes("[]", 256, 256, note=lines.append) == []
    assert len(lines) == 1 and "no boxes" in lines[0]
    ref = Image.new("RGB", (256, 256), (200, 200, 200))
    prepared = refs.prepare_references([ref, ref], 256, 256, processor, layout_boxes="[]")
    assert len(prepared.resized_refs) == 3  # two framed references plus the layout image, as officially
    assert np.asarray(prepared.resized_refs[-1]).max() == 0
    framed = np.asarray(prepared.resized_refs[0])
    assert tuple(framed[0, 0]) == layout.LAYOUT_COLORS[0] and tuple(np.asarray(prepared.resized_refs[1])[0, 0]) \
        == layout.LAYOUT_COLORS[1]


def test_layout_drawing_colours_largest_boxes_first():
    boxes = layout.parse_layout_boxes([[0.0, 0.1, 0.0, 0.1]] * 5 + [[0.2, 0.9, 0.2, 0.9]], 320, 320)
    image, colors = layout.draw_layout(boxes, 320, 320)
    assert colors[5] == layout.LAYOUT_COLORS[0] and colors[4] is None
    assert image.getpixel(boxes[5].bbox[:2]) == layout.LAYOUT_COLORS[0]
    assert image.getpixel((160, 160)) == (0, 0, 0)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("not json [", "valid JSON"),
        ("{}", "must be a list"),
        ([[0.1, 0.2, 0.3]], "4 numbers"),
        ([["a", 0.2, 0.3, 0.4]], "4 numbers"),
        ([[0.5, 0.5, 0.1, 0.4]], "empty"),
        ([[-0.5, -0.1, 0.1, 0.4]], "empty"),  # clamped to nothing, as the official pipeline refuses too
        ([[300, 400, 10, 200]], "empty"),  # pixels entirely right of a 256 px wide image
        ([{"text": "no box"}], "missing 'bbox'"),
    ],
)
def test_malformed_layout_boxes_raise_one_line(spec, message):
    with pytest.raises(ValueError, match=message) as info:
        layout.parse_layout_boxes(spec, 256, 256)
    assert "\n" not in str(info.value)


# --- input validation


def test_too_many_references():
    with pytest.raises(ValueError, match="at most 10"):
        refs.load_reference_images([Image.new("RGB", (32, 32))] * 11)


def test_unreadable_references(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        refs.load_reference_images([tmp_path / "missing.png"])
    bogus = tmp_path / "notes.png"
    bogus.write_text("this is not an image")
    with pytest.raises(ValueError, match="not a readable image"):
        refs.load_reference_images([bogus])
