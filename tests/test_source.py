"""ModelSource: one resolution per checkpoint, whatever its layout."""

import json
import shutil

import numpy as np
import pytest
from conftest import FIXTURES

from hidream_mlx.weights.loading import ModelLoadError
from hidream_mlx.families.o1.config import ModelConfig
from hidream_mlx.families.o1.source import CONVERTED, OFFICIAL, SINGLE_FILE, ModelSource

SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json",
              "preprocessor_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt")


def side_folder(tmp_path):
    folder = tmp_path / "side"
    folder.mkdir()
    for name in SIDE_FILES:
        if (FIXTURES / name).is_file():
            shutil.copy(FIXTURES / name, folder / name)
    return folder


def test_a_folder_resolves_once_with_config_index_tokenizer_and_name():
    source = ModelSource.resolve(str(FIXTURES))
    assert ModelSource.resolve(str(FIXTURES)) is source
    assert ModelSource.resolve(source) is source
    assert source.layout == OFFICIAL and source.quantization is None
    assert source.config == ModelConfig.from_file(FIXTURES / "config.json")
    assert source.name == FIXTURES.name and source.tokenizer_dir == FIXTURES
    embed = source.index["model.language_model.embed_tokens.weight"]
    assert embed.shape == (source.config.text.vocab_size, source.config.text.hidden_size)
    assert source.fingerprint.startswith("sha256:")


def test_the_fingerprint_follows_the_config(tmp_path):
    copy = tmp_path / "m"
    shutil.copytree(FIXTURES, copy, ignore=shutil.ignore_patterns("*.npz"))
    before = ModelSource.resolve(str(copy))
    data = json.loads((copy / "config.json").read_text())
    data["hidream"] = {"recipe": "dev", "variant": "x"}
    data["quantization"] = {"bits": 8, "group_size": 64}
    (copy / "config.json").write_text(json.dumps(data))
    after = ModelSource.resolve(str(copy))
    assert after is not before and after.fingerprint != before.fingerprint
    assert after.layout == CONVERTED and after.stored["recipe"] == "dev"


def test_a_single_file_release_infers_its_dimensions_and_takes_the_side_files_from_tokenizer(tmp_path):
    weights = tmp_path / "hidream_o1_image_dev_bf16.safetensors"
    shutil.copy(FIXTURES / "model.safetensors", weights)
    source = ModelSource.resolve(str(weights), tokenizer=str(side_folder(tmp_path)))
    official = ModelConfig.from_file(FIXTURES / "config.json")
    assert source.layout == SINGLE_FILE and source.variant == "dev"
    assert source.config.text == official.text and source.config.vision == official.vision
    assert any("dimensions read from the tensor shapes" in n for n in source.notes)
    assert any("variant dev from the file name" in n for n in source.notes)


def test_side_files_of_another_model_are_refused(tmp_path):
    weights = tmp_path / "o1_dev.safetensors"
    shutil.copy(FIXTURES / "model.safetensors", weights)
    side = side_folder(tmp_path)
    data = json.loads((side / "config.json").read_text())
    data["text_config"]["hidden_size"] *= 2
    (side / "config.json").write_text(json.dumps(data))
    with pytest.raises(ModelLoadError, match="text_config.hidden_size .* but the tensors say"):
        ModelSource.resolve(str(weights), tokenizer=str(side))


def test_a_single_file_checkpoint_loads_the_same_weights_as_its_folder(tmp_path):
    from hidream_mlx.families.o1.engine import Engine

    weights = tmp_path / "o1_dev.safetensors"
    shutil.copy(FIXTURES / "model.safetensors", weights)
    single = Engine.load(ModelSource.resolve(str(weights), tokenizer=str(side_folder(tmp_path))), dtype="float32")
    folder = Engine.load(str(FIXTURES), dtype="float32")
    a = single.model.language_model.norm.weight
    np.testing.assert_array_equal(np.array(a), np.array(folder.model.language_model.norm.weight))
    assert single.default_recipe == "dev"


def test_q_on_a_single_file_checkpoint_quantizes_as_on_its_folder(tmp_path):
    from mlx.utils import tree_flatten

    from hidream_mlx.families.o1.engine import Engine

    weights = tmp_path / "o1_dev.safetensors"
    shutil.copy(FIXTURES / "model.safetensors", weights)
    single = Engine.load(ModelSource.resolve(str(weights), tokenizer=str(side_folder(tmp_path))),
                         dtype="float32", quantize_bits=8)
    folder = Engine.load(str(FIXTURES), dtype="float32", quantize_bits=8)
    assert single.quantization == folder.quantization and single.quantization["bits"] == 8
    ours, theirs = dict(tree_flatten(single.model.parameters())), dict(tree_flatten(folder.model.parameters()))
    assert sorted(ours) == sorted(theirs) and any(name.endswith(".scales") for name in ours)
    for name, value in ours.items():
        np.testing.assert_array_equal(np.array(value), np.array(theirs[name]), err_msg=name)


def test_a_changed_chat_template_stops_the_load(tmp_path):
    copy = tmp_path / "m"
    shutil.copytree(FIXTURES, copy, ignore=shutil.ignore_patterns("*.npz"))
    template = (copy / "chat_template.jinja").read_text()
    (copy / "chat_template.jinja").write_text(template.replace("'<|im_end|>\\n'", "'<|im_end|>\\n\\n'"))
    with pytest.raises(ValueError, match="chat template renders a different conversation"):
        ModelSource.resolve(str(copy))


def test_a_missing_folder_and_a_non_safetensors_file_are_named(tmp_path):
    with pytest.raises(ModelLoadError, match="no such folder"):
        ModelSource.resolve(str(tmp_path / "nope"))
    pickle = tmp_path / "model.bin"
    pickle.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="is a file"):
        ModelSource.resolve(str(pickle))
