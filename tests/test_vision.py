"""The Qwen3-VL vision tower against the official forward (edit_forward.npz)."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import FIXTURES
from mlx.utils import tree_flatten

from hidream_mlx.families.o1.config import ModelConfig
from hidream_mlx.families.o1.vision import VisionTower, load_vision_tower


@pytest.fixture(scope="module")
def edit():
    return np.load(FIXTURES / "edit_forward.npz")


@pytest.fixture(scope="module")
def tower():
    return load_vision_tower(FIXTURES, dtype=mx.float32)


def test_outputs_match_reference(tower, edit):
    embeds, deepstack = tower(mx.array(edit["pixel_values"]), edit["image_grid_thw"])
    np.testing.assert_allclose(np.array(embeds), edit["cond_image_embeds"], atol=1e-4, rtol=0)
    config = ModelConfig.from_file(FIXTURES / "config.json").vision
    assert len(deepstack) == len(config.deepstack_visual_indexes)
    for j, feature in enumerate(deepstack):
        np.testing.assert_allclose(np.array(feature), edit[f"cond_deepstack_{j}"], atol=1e-4, rtol=0)


def test_images_attend_only_within_themselves(tower, edit):
    """Two images in one call give what each gives alone (the reference's cu_seqlens)."""
    first_pixels, first_grid = mx.array(edit["pixel_values"]), np.asarray(edit["image_grid_thw"])
    merge = tower.config.spatial_merge_size
    second_grid = np.array([[1, 2 * merge, 3 * merge]])
    rows = int(second_grid.prod())
    second_pixels = mx.array(np.random.default_rng(0).uniform(-1, 1, (rows, first_pixels.shape[1])).astype(np.float32))

    both, both_deep = tower(mx.concatenate([first_pixels, second_pixels]), np.concatenate([first_grid, second_grid]))
    alone = [tower(first_pixels, first_grid), tower(second_pixels, second_grid)]
    np.testing.assert_allclose(np.array(both), np.concatenate([np.array(a[0]) for a in alone]), atol=1e-5)
    for j, feature in enumerate(both_deep):
        expected = np.concatenate([np.array(a[1][j]) for a in alone])
        np.testing.assert_allclose(np.array(feature), expected, atol=1e-5)
    assert both.shape == (len(first_pixels) // merge**2 + rows // merge**2, tower.config.out_hidden_size)


def test_rejects_pixel_values_that_do_not_match_the_grid(tower, edit):
    pixels = mx.array(edit["pixel_values"][:-4])
    with pytest.raises(ValueError, match="pixel_values must be"):
        tower(pixels, edit["image_grid_thw"])


def test_sanitize_strips_prefix_flattens_kernel_and_is_idempotent(tower):
    checkpoint = mx.load(str(FIXTURES / "model.safetensors"))
    once = tower.sanitize(checkpoint)
    assert set(once) == {name for name, _ in tree_flatten(tower.parameters())}
    assert once["patch_embed.proj.weight"].ndim == 2
    twice = tower.sanitize(once)
    assert set(twice) == set(once)
    assert all(twice[k].shape == once[k].shape for k in once)


def _write_sharded(folder: Path) -> None:
    """The fixture checkpoint re-saved as two shards with an index, like the official one."""
    weights = mx.load(str(FIXTURES / "model.safetensors"))
    names = sorted(weights)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for i, part in enumerate(halves):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        mx.save_safetensors(str(folder / shard), {k: weights[k] for k in part})
        weight_map.update({k: shard for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    shutil.copy(FIXTURES / "config.json", folder / "config.json")


def test_loads_from_sharded_checkpoint(tmp_path, tower):
    _write_sharded(tmp_path)
    sharded = load_vision_tower(tmp_path)
    expected = dict(tree_flatten(tower.parameters()))
    for name, value in tree_flatten(sharded.parameters()):
        np.testing.assert_array_equal(np.array(value), np.array(expected[name]))


def test_load_rejects_mismatched_shapes(tmp_path):
    config = json.loads((FIXTURES / "config.json").read_text())
    config["vision_config"]["intermediate_size"] *= 2
    (tmp_path / "config.json").write_text(json.dumps(config))
    shutil.copy(FIXTURES / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"mlp\.linear_fc\d\.(weight|bias) has shape .* config expects"):
        load_vision_tower(tmp_path)


def test_load_rejects_missing_tensors(tmp_path):
    weights = mx.load(str(FIXTURES / "model.safetensors"))
    del weights["model.visual.merger.norm.weight"]
    mx.save_safetensors(str(tmp_path / "model.safetensors"), weights)
    shutil.copy(FIXTURES / "config.json", tmp_path / "config.json")
    with pytest.raises(ValueError, match="missing"):
        load_vision_tower(tmp_path)


def test_bfloat16_tower_runs_close_to_float32(tower, edit):
    config = ModelConfig.from_file(FIXTURES / "config.json")
    half = load_vision_tower(FIXTURES, config, dtype=mx.bfloat16)
    assert isinstance(half, VisionTower)
    embeds, _ = half(mx.array(edit["pixel_values"]), edit["image_grid_thw"])
    assert embeds.dtype == mx.bfloat16
    reference = edit["cond_image_embeds"]
    error = np.abs(np.array(embeds.astype(mx.float32)) - reference).max()
    assert error < 0.05 * np.abs(reference).max()
