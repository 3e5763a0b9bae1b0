"""config.json: the stock qwen3_vl layout is read; broken values are named."""

import copy
import json

import pytest
from conftest import FIXTURES

from hidream_mlx.families.o1.config import ConfigError, ModelConfig

RAW = json.loads((FIXTURES / "config.json").read_text())


def with_text(**changes):
    data = copy.deepcopy(RAW)
    data["text_config"].update(changes)
    return data


def test_reads_text_and_vision_settings_and_ignores_unknown_keys():
    data = copy.deepcopy(RAW)
    data["text_config"]["some_future_key"] = 1
    cfg = ModelConfig.from_dict(data)
    text = RAW["text_config"]
    assert cfg.text.hidden_size == text["hidden_size"]
    assert cfg.text.num_key_value_heads == text["num_key_value_heads"]
    assert cfg.text.mrope_section == tuple(text["rope_scaling"]["mrope_section"])
    assert cfg.text.rope_theta == text["rope_theta"]
    assert cfg.vision.deepstack_visual_indexes == tuple(RAW["vision_config"]["deepstack_visual_indexes"])
    assert cfg.image_token_id == RAW["image_token_id"]


@pytest.mark.parametrize("changes, message", [
    ({"hidden_size": None}, "text_config.hidden_size is missing"),
    ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer"),
    ({"num_key_value_heads": 3}, "must be a multiple of num_key_value_heads"),
    ({"rope_scaling": {"mrope_section": [1, 2, 2]}}, "must sum to head_dim/2"),
    ({"rope_scaling": {}}, "mrope_section is missing"),
    ({"rms_norm_eps": -1}, "rms_norm_eps must be a positive number"),
])
def test_nonsensical_values_are_rejected_with_the_key_named(changes, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(with_text(**changes))


def test_other_model_types_are_rejected():
    with pytest.raises(ConfigError, match="expected 'qwen3_vl'"):
        ModelConfig.from_dict({**RAW, "model_type": "llama"})


def test_unreadable_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        ModelConfig.from_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_file(tmp_path / "config.json")
