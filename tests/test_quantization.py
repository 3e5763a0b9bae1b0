"""Recipes, plans, the config.json quantization block, and quantizing at load time."""

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import FIXTURES, forward_cases, load_case

from hidream_mlx.families.o1.engine import Engine
from hidream_mlx.quant.plans import decoder_layer_index, load_plan, plan_from_description, resolve_plan
from hidream_mlx.quant.recipes import BUILTIN_RECIPES, KEEP, LayerSetting, Override, QuantRecipe, get_quant_recipe
from hidream_mlx.families.o1.replay import predict_recorded

RECIPE_DIR = Path(__file__).resolve().parent.parent / "quantize" / "recipes"
LAYERS = 36
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def real_matrices(layers: int = LAYERS) -> dict[str, int]:
    """Module path -> input width for the real model's weight matrices."""
    widths = {"q_proj": 4096, "k_proj": 4096, "v_proj": 4096, "o_proj": 4096, "gate_proj": 4096,
              "up_proj": 4096, "down_proj": 12288}
    out = {f"language_model.layers.{i}.{'self_attn' if p in ATTN else 'mlp'}.{p}": w
           for i in range(layers) for p, w in widths.items()}
    out.update({"language_model.embed_tokens": 4096, "x_embedder.proj1": 3072, "x_embedder.proj2": 1024,
                "t_embedder1.mlp.0": 256, "t_embedder1.mlp.2": 4096, "final_layer2.linear": 4096})
    return out


def test_flat_plan_quantizes_only_decoder_linears():
    plan = resolve_plan(get_quant_recipe("flat"), real_matrices(), LAYERS, bits=4)
    quantized = [p for p, s in plan.layers.items() if s is not None]
    assert len(quantized) == LAYERS * 7
    assert all(p.startswith("language_model.layers.") for p in quantized)
    for kept in ("language_model.embed_tokens", "x_embedder.proj1", "x_embedder.proj2", "t_embedder1.mlp.0",
                 "t_embedder1.mlp.2", "final_layer2.linear"):
        assert plan.layers[kept] is None
    block = plan.description()
    assert block["mode"] == "affine" and block["bits"] == 4 and block["group_size"] == 64
    assert block["x_embedder.proj1"] == KEEP and block["language_model.embed_tokens"] == KEEP


def test_q4_selective_keeps_first_and_last_two_layers_at_8_bits():
    plan = resolve_plan(get_quant_recipe("q4-selective"), real_matrices(), LAYERS)
    for i in range(LAYERS):
        bits = {plan.layers[f"language_model.layers.{i}.mlp.{p}"].bits for p in MLP}
        assert bits == ({8} if i in (0, 1, 34, 35) else {4}), i
    block = plan.description()
    assert block["language_model.layers.35.self_attn.q_proj"] == {"bits": 8, "group_size": 64}
    assert "language_model.layers.2.self_attn.q_proj" not in block  # default layers have no entry


def test_overrides_first_match_wins_glob_regex_and_layers():
    recipe = QuantRecipe.from_dict({"name": "mix", "bits": 4, "overrides": [
        {"pattern": "*.layers.3.self_attn.q_proj", "bits": "bf16"},
        {"pattern": "*.self_attn.*", "bits": 8},
        {"pattern": r"re:language_model\.layers\.(5|6)\.mlp\..*", "bits": 6, "group_size": 32},
        {"layers": [-1], "pattern": "*.down_proj", "bits": 6},
    ]})
    plan = resolve_plan(recipe, real_matrices(), LAYERS)
    layer = lambda i, p: plan.layers[f"language_model.layers.{i}.{'self_attn' if p in ATTN else 'mlp'}.{p}"]  # noqa: E731
    assert layer(3, "q_proj") is None
    assert layer(3, "k_proj") == LayerSetting(8, 64)
    assert layer(5, "up_proj") == LayerSetting(6, 32)
    assert layer(35, "down_proj") == LayerSetting(6, 64) and layer(35, "up_proj") == LayerSetting(4, 64)
    assert layer(7, "gate_proj") == LayerSetting(4, 64)
    assert plan.description()["language_model.layers.3.self_attn.q_proj"] == KEEP


def test_override_cannot_quantize_the_pixel_shims():
    recipe = QuantRecipe.from_dict({"bits": 4, "overrides": [{"pattern": "x_embedder.*", "bits": 8}]})
    plan = resolve_plan(recipe, real_matrices(), LAYERS)
    assert plan.layers["x_embedder.proj1"] is None
    assert any("matches no decoder linear" in n for n in plan.notices())


def test_indivisible_group_size_keeps_layer_in_bf16_with_notice():
    matrices = {"language_model.layers.0.mlp.up_proj": 64, "language_model.layers.0.mlp.down_proj": 128}
    plan = resolve_plan(get_quant_recipe("flat"), matrices, 1, bits=4, group_size=128)
    assert plan.layers["language_model.layers.0.mlp.up_proj"] is None
    assert plan.layers["language_model.layers.0.mlp.down_proj"] == LayerSetting(4, 128)
    assert plan.indivisible == ["language_model.layers.0.mlp.up_proj"]
    assert "language_model.layers.0.mlp.up_proj" in plan.notices()[0]


@pytest.mark.parametrize("kwargs, message", [
    (dict(bits=7), "unsupported bits 7"),
    (dict(bits=1), "unsupported bits 1"),
    (dict(bits=4, group_size=48), "unsupported group size 48"),
    (dict(), "needs --bits"),
])
def test_bad_bits_and_group_size(kwargs, message):
    with pytest.raises(ValueError, match=message):
        resolve_plan(get_quant_recipe("flat"), real_matrices(2), 2, **kwargs)


def test_recipe_with_fixed_bits_refuses_other_bits():
    with pytest.raises(ValueError, match="q4-selective is 4-bit; drop --bits 8"):
        resolve_plan(get_quant_recipe("q4-selective"), real_matrices(), LAYERS, bits=8)


@pytest.mark.parametrize("data, message", [
    ({"overrides": [{"pattern": "*", "bits": 7}]}, "unsupported bits 7"),
    ({"quantize_embeddings": "yes"}, "quantize_embeddings must be true or false"),
    ({"overrides": [{"bits": 8}]}, "give 'pattern'"),
    ({"overrides": [{"pattern": "re:(", "bits": 8}]}, "bad regex"),
    ({"overrides": [{"pattern": "*", "bit": 8}]}, "unknown key 'bit'"),
    ({"overrides": [{"layers": "0", "bits": 8}]}, "list of integers"),
    ({"overrides": ["*"]}, "each override is an object"),
    ({"groupsize": 64}, "unknown key 'groupsize'"),
])
def test_bad_recipe_files(data, message):
    with pytest.raises(ValueError, match=message):
        QuantRecipe.from_dict(data)


def test_unknown_recipe_name():
    with pytest.raises(ValueError, match="unknown quantization recipe 'q3'"):
        get_quant_recipe("q3")


def test_shipped_recipe_files_parse_and_match_the_builtins():
    files = sorted(RECIPE_DIR.glob("*.json"))
    assert {f.stem for f in files} >= set(BUILTIN_RECIPES)
    for f in files:
        recipe = QuantRecipe.from_file(f)
        assert recipe.name == f.stem
        resolve_plan(recipe, real_matrices(), LAYERS, bits=None if recipe.bits else 4)
        if f.stem in BUILTIN_RECIPES:
            assert recipe == BUILTIN_RECIPES[f.stem]


def test_recipe_round_trips_through_dict():
    recipe = QuantRecipe.from_file(RECIPE_DIR / "q4-attn8.json")
    assert QuantRecipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe


def test_description_reads_back_to_the_same_plan():
    plan = resolve_plan(QuantRecipe.from_file(RECIPE_DIR / "q4-attn8.json"), real_matrices(), LAYERS)
    block = json.loads(json.dumps(plan.description()))
    assert plan_from_description(block, real_matrices()) == plan.layers


def test_description_without_group_size_is_refused():
    with pytest.raises(ValueError, match="group_size is missing"):
        plan_from_description({"bits": 4}, real_matrices(1))


def forward_inputs(prefix=None):
    prefix = prefix or forward_cases()[0]
    case = load_case("forward_t2i.npz")
    return {k: case[f"{prefix}.{k}"] for k in ("input_ids", "position_ids", "token_types", "vinputs", "timestep")}


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_on_load_touches_only_decoder_linears(bits, tiny_model):
    engine = Engine.load(str(FIXTURES), dtype="float32", quantize_bits=bits)
    model = engine.model
    for layer in model.language_model.layers:
        for m in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.down_proj):
            assert isinstance(m, nn.QuantizedLinear) and m.bits == bits and m.group_size == 64
    for m in (model.x_embedder.proj1, model.x_embedder.proj2, model.t_embedder1.mlp[0], model.final_layer2.linear):
        assert type(m) is nn.Linear and m.weight.dtype == mx.float32
    assert type(model.language_model.embed_tokens) is nn.Embedding
    assert engine.quantization["bits"] == bits and engine.quantization["x_embedder.proj1"] == KEEP
    x = predict_recorded(model, **forward_inputs())
    ref = predict_recorded(tiny_model, **forward_inputs())
    err = np.linalg.norm(x - ref) / np.linalg.norm(ref)
    assert 0 < err < (2e-2 if bits == 8 else 1e-1)


def test_load_plan_refuses_other_bits_on_a_quantized_folder(tiny_model):
    stored = {"mode": "affine", "bits": 4, "group_size": 64}
    with pytest.raises(ValueError, match="already quantized to 4 bits; drop -q or convert from the original"):
        load_plan(tiny_model, stored, 6)
    assert load_plan(tiny_model, stored, 4).description["bits"] == 4
    assert load_plan(tiny_model, stored).stored
    assert load_plan(tiny_model) is None


def test_quantize_on_load_rejects_unsupported_bits(tiny_model):
    with pytest.raises(ValueError, match="unsupported bits 7"):
        load_plan(tiny_model, bits=7)


def test_override_dataclass_matches_negative_layer_indices():
    rule = Override(8, layers=(-1,))
    assert rule.matches("language_model.layers.35.mlp.up_proj", 36, decoder_layer_index)
    assert not rule.matches("language_model.layers.34.mlp.up_proj", 36, decoder_layer_index)
    assert not rule.matches("x_embedder.proj1", 36, decoder_layer_index)
