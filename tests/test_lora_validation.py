"""A LoRA file or setting that cannot run is refused in one line naming the file and the key (or the
option), before any weight loads, on float, ``-q`` and converted models alike."""

import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import FIXTURES
from test_lora import TARGETS, fresh, lora_tensors, write_lora

from hidream_mlx.cli import main
from hidream_mlx.families.o1.lora_targets import check_loras, model_targets
from hidream_mlx.weights.lora import LoRAError, apply_lora, checkpoint_targets, read_lora, updates_for_checkpoint
from hidream_mlx.weights.lora_specs import LoRASpec, parse_lora_options, specs_from_json
from hidream_mlx.weights.loading import checkpoint_index
from hidream_mlx.families.o1.source import ModelSource

MODULE = TARGETS[0]


def kohya_file(tmp_path, A, B, alpha=None, name="bad.safetensors"):
    key = "lora_unet_" + MODULE.replace(".", "_")
    data = {f"{key}.lora_down.weight": mx.array(A), f"{key}.lora_up.weight": mx.array(B)}
    if alpha is not None:
        data[f"{key}.alpha"] = mx.array(alpha)
    path = tmp_path / name
    mx.save_safetensors(str(path), data)
    return path, key


def shape():
    return dict(fresh().named_modules())[MODULE].weight.shape


def rank_zero(tmp_path):
    out, inp = shape()
    return kohya_file(tmp_path, np.zeros((0, inp), np.float32), np.zeros((out, 0), np.float32), 4.0)


@pytest.mark.parametrize("how", ["merged", "side path (-q)", "baked into a conversion", "checked before loading"])
def test_a_rank_zero_lora_is_refused_naming_the_file_and_key_wherever_it_is_read(tmp_path, how):
    path, key = rank_zero(tmp_path)
    with pytest.raises(LoRAError) as err:
        if how == "merged":
            apply_lora(fresh(), LoRASpec(path))
        elif how == "side path (-q)":
            model = fresh()
            import mlx.nn as nn  # lazy: only this case quantizes

            nn.quantize(model, group_size=32, bits=8, class_predicate=lambda p, m: p == MODULE)
            apply_lora(model, LoRASpec(path))
        elif how == "baked into a conversion":
            updates_for_checkpoint([LoRASpec(path)], checkpoint_targets(checkpoint_index(FIXTURES)))
        else:
            check_loras(ModelSource.resolve(FIXTURES), [LoRASpec(path)])
    message = str(err.value)
    assert message.startswith(str(path)) and f"{key}.lora_down.weight has rank 0" in message and "\n" not in message


def test_the_model_skeleton_gives_the_same_targets_as_the_loaded_model():
    from hidream_mlx.weights.lora import layer_shape, linear_targets  # lazy: only this test compares

    loaded = {p: layer_shape(m) for p, m in linear_targets(fresh()).items()}
    assert model_targets(ModelSource.resolve(FIXTURES)) == loaded


@pytest.mark.parametrize("alpha, needle", [
    (np.array([4.0, 8.0], np.float32), "must hold one number (alpha), got shape (2,)"),
    (np.array(float("nan"), np.float32), "alpha must be a finite number"),
    (np.array(True), "alpha is a number"),
])
def test_an_alpha_that_is_not_one_finite_number_is_refused(tmp_path, alpha, needle):
    out, inp = shape()
    path, key = kohya_file(tmp_path, np.ones((2, inp), np.float32), np.ones((out, 2), np.float32), alpha)
    with pytest.raises(LoRAError, match="^" + str(path).replace(".", r"\.")) as err:
        read_lora(path, model_targets(ModelSource.resolve(FIXTURES)))
    assert f"key {key}.alpha" in str(err.value) and needle in str(err.value)


def test_integer_or_non_finite_weights_are_refused_naming_the_key(tmp_path):
    out, inp = shape()
    targets = model_targets(ModelSource.resolve(FIXTURES))
    path, key = kohya_file(tmp_path, np.ones((2, inp), np.int32), np.ones((out, 2), np.float32), 2.0)
    with pytest.raises(LoRAError, match=rf"key {key}\.lora_down\.weight holds int32 values; LoRA weights are floating"):
        read_lora(path, targets)
    B = np.ones((out, 2), np.float32)
    B[1, 1] = np.inf
    path, key = kohya_file(tmp_path, np.ones((2, inp), np.float32), B, 2.0, "inf.safetensors")
    with pytest.raises(LoRAError, match=rf"key {key}\.lora_up\.weight holds NaN or inf values"):
        read_lora(path, targets)


@pytest.mark.parametrize("config, needle", [
    ({"lora_alpha": "8"}, "lora_alpha must be a finite number, got '8'"),
    ({"lora_alpha": True}, "lora_alpha must be a finite number, got True"),
    ({"lora_alpha": 8, "alpha_pattern": {"mlp.down_proj": "two"}}, "alpha_pattern['mlp.down_proj'] must be a finite"),
    ({"lora_alpha": 8, "alpha_pattern": {"(": 2}}, "alpha_pattern key '(' is not a regular expression"),
    ({"lora_alpha": 8, "alpha_pattern": [2]}, "alpha_pattern must be an object"),
    ({"lora_alpha": 8, "use_rslora": "yes"}, "use_rslora must be true or false"),
    ([1, 2], "not a JSON object"),
])
def test_a_peft_adapter_config_is_checked_naming_the_file_and_key(tmp_path, config, needle):
    path = write_lora(tmp_path, lora_tensors(fresh(), targets=TARGETS[:2]), "peft")
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(LoRAError) as err:
        apply_lora(fresh(), LoRASpec(path))
    assert str(err.value).startswith(str(tmp_path / "adapter_config.json")) and needle in str(err.value)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -1e6])
def test_lora_scales_are_range_checked_like_every_other_number(scale):
    with pytest.raises(LoRAError, match="^--lora-scale must be"):
        parse_lora_options(["a.safetensors"], [scale])
    with pytest.raises(LoRAError, match=r"^item\.loras\[0\]\.scale must be"):
        specs_from_json([{"path": "a.safetensors", "scale": scale}], "item")


GENERATE = ["generate", "--model", str(FIXTURES), "--prompt", "a red fox", "--no-snap", "--width", "256",
            "--height", "256", "--seed", "3", "--recipe", "dev", "--steps", "2", "--dtype", "float32"]


@pytest.mark.parametrize("extra", [[], ["-q", "8"]])
def test_generate_refuses_a_rank_zero_lora_in_one_line_before_loading(tmp_path, extra):
    path, key = rank_zero(tmp_path)
    out = tmp_path / "o.png"
    result = CliRunner().invoke(main, [*GENERATE, *extra, "--lora", str(path), "-o", str(out)])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and lines == [f"error: {path}: key {key}.lora_down.weight has rank 0 "
                                               f"(shape (0, {shape()[1]})): an empty update; the file is broken"]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]


@pytest.mark.parametrize("scale", ["nan", "inf", "-1e300"])
def test_generate_refuses_a_non_finite_lora_scale_naming_it_before_loading(tmp_path, scale):
    path = write_lora(tmp_path / "l", lora_tensors(fresh()), "kohya_unet")
    result = CliRunner().invoke(main, [*GENERATE, "--lora", str(path), "--lora-scale", scale,
                                       "-o", str(tmp_path / "o.png")])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: --lora-scale must be")
    assert "--guidance" not in result.output and not (tmp_path / "o.png").exists()


def test_a_lora_path_that_is_not_a_regular_file_is_refused_without_blocking(tmp_path):
    import os  # lazy: only this test makes a FIFO

    fifo = tmp_path / "style.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(LoRAError, match="style.safetensors: LoRA file is not a regular file"):
        check_loras(ModelSource.resolve(FIXTURES), [LoRASpec(fifo)])
