"""Loading: official layouts load; every broken folder fails with one line naming the culprit."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from conftest import FIXTURES

from hidream_mlx.weights.loading import ModelLoadError
from hidream_mlx.families.o1.loading import load_model
from hidream_mlx.weights.source import resolve_model_path

WEIGHTS = mx.load(str(FIXTURES / "model.safetensors"))


def make_folder(path, weights=None, shards=1):
    """A model folder with config and tokenizer, and ``weights`` split over ``shards`` files."""
    path.mkdir(exist_ok=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(FIXTURES / name, path / name)
    weights = dict(WEIGHTS if weights is None else weights)
    if shards == 1:
        mx.save_safetensors(str(path / "model.safetensors"), weights)
        return path
    names = sorted(weights)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: weights[n] for n in names[i::shards]}
        mx.save_safetensors(str(path / file), part)
        weight_map.update({n: file for n in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def test_sharded_checkpoint_loads_the_same_weights(tmp_path):
    single = load_model(FIXTURES, dtype=mx.float32)
    sharded = load_model(make_folder(tmp_path / "m", shards=3), dtype=mx.float32)
    a = single.language_model.layers[-1].mlp.down_proj.weight
    b = sharded.language_model.layers[-1].mlp.down_proj.weight
    np.testing.assert_array_equal(np.array(a), np.array(b))


def test_lm_head_and_vision_tower_are_not_loaded(tmp_path):
    weights = dict(WEIGHTS)
    weights["lm_head.weight"] = mx.zeros((8, 4))
    model = load_model(make_folder(tmp_path / "m", weights), dtype=mx.float32)
    assert not hasattr(model, "lm_head") and not hasattr(model, "visual")
    without_vision = {k: v for k, v in WEIGHTS.items() if ".visual." not in k}
    load_model(make_folder(tmp_path / "t2i", without_vision), dtype=mx.float32)


def test_weights_take_the_requested_dtype():
    assert load_model(FIXTURES, dtype=mx.float32).x_embedder.proj1.weight.dtype == mx.float32
    assert load_model(FIXTURES).x_embedder.proj1.weight.dtype == mx.bfloat16


def test_missing_tensor_is_named(tmp_path):
    weights = {k: v for k, v in WEIGHTS.items() if k != "model.language_model.norm.weight"}
    with pytest.raises(ModelLoadError, match=r"missing tensor model\.language_model\.norm\.weight"):
        load_model(make_folder(tmp_path / "m", weights))


def test_misshaped_tensor_is_named_with_both_shapes(tmp_path):
    weights = dict(WEIGHTS)
    name = "model.language_model.layers.0.mlp.up_proj.weight"
    rows, cols = weights[name].shape
    weights[name] = mx.zeros((rows + 1, cols))
    with pytest.raises(ModelLoadError, match=rf"{name} has shape \({rows + 1}, {cols}\), expected \({rows}, {cols}\)"):
        load_model(make_folder(tmp_path / "m", weights))


def test_unexpected_tensor_is_named(tmp_path):
    weights = dict(WEIGHTS)
    weights["model.language_model.layers.0.mlp.extra.weight"] = mx.zeros((2, 2))
    with pytest.raises(ModelLoadError, match=r"unexpected tensor model\.language_model\.layers\.0\.mlp\.extra\.weight"):
        load_model(make_folder(tmp_path / "m", weights))


def test_pickle_checkpoints_are_refused_without_being_opened(tmp_path):
    folder = make_folder(tmp_path / "m")
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 not to be unpickled")
    with pytest.raises(ModelLoadError, match="only pytorch_model.bin found; hidream-mlx loads safetensors only"):
        load_model(folder)


def test_truncated_shard_is_named(tmp_path):
    folder = make_folder(tmp_path / "m", shards=2)
    shard = folder / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(ModelLoadError, match="model-00002-of-00002.safetensors: truncated"):
        load_model(folder)


def test_garbage_file_is_named(tmp_path):
    folder = make_folder(tmp_path / "m")
    (folder / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="model.safetensors: not a safetensors file"):
        load_model(folder)


def test_shard_missing_from_disk_is_named(tmp_path):
    folder = make_folder(tmp_path / "m", shards=2)
    (folder / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="missing shard model-00001-of-00002.safetensors"):
        load_model(folder)


def test_model_argument_must_be_a_folder_or_repo_id(tmp_path):
    with pytest.raises(ModelLoadError, match="no such folder"):
        resolve_model_path(str(tmp_path / "nope"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="is a file"):
        resolve_model_path(str(tmp_path / "file.txt"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)


def test_repo_id_not_in_cache_fails_cleanly_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):
        resolve_model_path("HiDream-ai/HiDream-O1-Image-Dev")
