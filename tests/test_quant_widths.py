"""Every MLX affine width (2, 3, 4, 5, 6, 8), the down_proj-protecting recipe, recipe files that
combine ideas, quantized embeddings, and the memory model's size for each width."""

import json
import warnings
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import FIXTURES, forward_cases, load_case
from test_quantization import LAYERS, MLP, real_matrices

from hidream_mlx.cli.quantize import quantize
from hidream_mlx.families.o1.replay import predict_recorded
from hidream_mlx.memory import quantized_bytes
from hidream_mlx.weights.loading import checkpoint_index
from hidream_mlx.families.o1.loading import load_model
from hidream_mlx.families.o1.convert import convert
from hidream_mlx.quant.plans import load_plan, resolve_plan
from hidream_mlx.quant.recipes import SUPPORTED_BITS, LayerSetting, QuantRecipe, bits_warning, get_quant_recipe

RECIPE_DIR = Path(__file__).resolve().parent.parent / "quantize" / "recipes"


def forward_inputs():
    case = load_case("forward_t2i.npz")
    prefix = forward_cases()[0]
    return {k: case[f"{prefix}.{k}"] for k in ("input_ids", "position_ids", "token_types", "vinputs", "timestep")}


def test_every_affine_width_is_supported_and_only_2_and_3_warn():
    assert SUPPORTED_BITS == (2, 3, 4, 5, 6, 8)
    for bits in SUPPORTED_BITS:
        plan = resolve_plan(get_quant_recipe("flat"), real_matrices(2), 2, bits=bits)
        assert plan.description()["bits"] == bits
        assert (bits_warning(bits) is not None) == (bits in (2, 3))
    assert "quality" in bits_warning(2)


def test_quantize_at_load_warns_below_4_bits(tiny_model):
    with pytest.warns(UserWarning, match="3-bit weights lose visible quality"):
        load_plan(tiny_model, bits=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_plan(tiny_model, bits=5)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_memory_model_size_equals_mlx_packed_bytes(bits):
    out, inp, group = 96, 256, 64
    packed, scales, biases = mx.quantize(mx.zeros((out, inp)), group_size=group, bits=bits)
    actual = packed.nbytes + scales.astype(mx.bfloat16).nbytes + biases.astype(mx.bfloat16).nbytes
    assert quantized_bytes(out * inp, bits, 2, group) == actual


def test_q4_down8_protects_every_down_proj_of_the_real_model():
    plan = resolve_plan(get_quant_recipe("q4-down8"), real_matrices(), LAYERS)
    block = plan.description()
    for i in range(LAYERS):
        for p in MLP:
            path = f"language_model.layers.{i}.mlp.{p}"
            assert plan.layers[path] == LayerSetting(8 if p == "down_proj" else 4, 64), path
        assert block[f"language_model.layers.{i}.mlp.down_proj"] == {"bits": 8, "group_size": 64}
        assert f"language_model.layers.{i}.self_attn.q_proj" not in block  # default 4-bit: not listed
    assert not plan.unused_overrides


def test_combined_recipe_file_protects_edges_and_down_proj():
    recipe = QuantRecipe.from_file(RECIPE_DIR / "q4-selective-down8.json")
    plan = resolve_plan(recipe, real_matrices(), LAYERS)
    for i in range(LAYERS):
        attn = plan.layers[f"language_model.layers.{i}.self_attn.q_proj"].bits
        down = plan.layers[f"language_model.layers.{i}.mlp.down_proj"].bits
        assert (attn, down) == ((8, 8) if i in (0, 1, 34, 35) else (4, 8)), i


def test_q4_down8_folder_names_each_protected_layer_and_loads(tmp_path):
    out = convert(str(FIXTURES), tmp_path / "q4d8", get_quant_recipe("q4-down8")).output
    config = json.loads((out / "config.json").read_text())
    q, layers = config["quantization"], config["text_config"]["num_hidden_layers"]
    assert config["hidream"]["quantize_recipe"] == "q4-down8" and q["bits"] == 4
    protected = {k for k, v in q.items() if isinstance(v, dict) and v["bits"] == 8}
    assert protected == {f"language_model.layers.{i}.mlp.down_proj" for i in range(layers)}
    model = load_model(out, dtype=mx.float32)
    for layer in model.language_model.layers:
        assert layer.mlp.down_proj.bits == 8 and layer.mlp.gate_proj.bits == 4


def test_quantized_embeddings_round_trip(tmp_path, tiny_model):
    result = CliRunner().invoke(quantize, ["--model", str(FIXTURES), "--bits", "4", "--quantize-embeddings",
                                           "-o", str(tmp_path / "qe")])
    assert result.exit_code == 0, result.output
    out = tmp_path / "qe"
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert q["language_model.embed_tokens"] == {"bits": 4, "group_size": 64}
    assert checkpoint_index(out)["model.language_model.embed_tokens.weight"].dtype == "U32"
    model = load_model(out, dtype=mx.float32)
    assert isinstance(model.language_model.embed_tokens, nn.QuantizedEmbedding)
    ref = predict_recorded(tiny_model, **forward_inputs())
    x = predict_recorded(model, **forward_inputs())
    plain = predict_recorded(load_model(convert(str(FIXTURES), tmp_path / "q", get_quant_recipe("flat"),
                                                bits=4).output, dtype=mx.float32), **forward_inputs())
    err, err_plain = (np.linalg.norm(a - ref) / np.linalg.norm(ref) for a in (x, plain))
    assert err_plain < err < 0.2, (err_plain, err)  # embeddings add their own rounding error


def test_embeddings_stay_float_by_default(tmp_path):
    out = convert(str(FIXTURES), tmp_path / "q", get_quant_recipe("flat"), bits=4).output
    assert type(load_model(out, dtype=mx.float32).language_model.embed_tokens) is nn.Embedding


def test_quantize_command_warns_for_low_bits(tmp_path):
    result = CliRunner().invoke(quantize, ["--model", str(FIXTURES), "--bits", "2", "-o", str(tmp_path / "q2")])
    assert result.exit_code == 0, result.output
    assert "warning: 2-bit weights lose visible quality" in result.output


@pytest.mark.parametrize("name, bits, embeddings", [("q4-down8", None, False), ("flat", 3, True),
                                                    ("flat", 5, False)])
def test_plan_sizes_from_dims_equal_the_bytes_on_disk(name, bits, embeddings, tmp_path):
    from dataclasses import replace

    from hidream_mlx.memory import plan_weight_sizes
    from hidream_mlx.families.o1.memory import skeleton_shapes
    from hidream_mlx.families.o1.loading import read_config

    recipe = replace(get_quant_recipe(name), quantize_embeddings=embeddings)
    conversion = convert(str(FIXTURES), tmp_path / "q", recipe, bits=bits, include_vision=False)
    shapes = [s for s in skeleton_shapes(read_config(FIXTURES)) if not s[0].startswith("lm_head")]
    predicted = sum(s.nbytes for s in plan_weight_sizes(shapes, conversion.plan.layers).values())
    assert predicted == conversion.total.nbytes
