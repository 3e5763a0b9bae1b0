"""HiDream-I1 quantization: which layers, the converted pipeline folder, and the round trip.

The block linears (attention of both streams, routed and shared experts, text FFN, adaLN) are
quantized; the MoE gate, norms, embedders, caption projections and the final layer are not;
a layer whose input width the group size does not divide stays float and is named. A folder
written by ``quantize`` loads with no flags and holds the same weights as ``-q`` at load.
"""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

from hidream_mlx.cli import main
from hidream_mlx.families import family_of
from hidream_mlx.families.i1.source import I1
from hidream_mlx.families.i1.weights import component_index, load_transformer, load_transformer_planned
from hidream_mlx.weights.loading import ModelLoadError
from hidream_mlx.families.i1.convert import convert_i1, transformer_plan
from hidream_mlx.quant.output import is_conversion_output
from hidream_mlx.quant.plans import I1_LAYERS, index_matrices, resolve_plan, unquantized_layers
from hidream_mlx.quant.recipes import GROUP_SIZES, QuantRecipe, get_quant_recipe
from i1_support import FIXTURES, golden

FLAT = get_quant_recipe("flat")
# Relative RMS error of call1's output against the float reference, measured on i1-tiny:
# 8 bits 0.0073, 6 bits 0.024, 4 bits 0.095 (group 32; random weights, float32 activations).
TOLERANCE = {8: 0.03, 4: 0.25}


def matrices():
    return index_matrices(component_index(FIXTURES / "transformer"))


def fine_group() -> int:
    """The largest group size that divides every block linear's input width (the fixture's dims)."""
    widths = {w for p, w in matrices().items() if I1_LAYERS.default(p)}
    fitting = [g for g in GROUP_SIZES if all(w % g == 0 for w in widths)]
    return max(fitting) if fitting else min(GROUP_SIZES)


def coarse_group() -> int:
    """A group size that leaves some block linear indivisible (the largest supported)."""
    return max(GROUP_SIZES)


def call1(model):
    g = golden("transformer_forward.npz")
    args = [mx.array(g[f"call1.{k}"]) for k in ("hidden_states", "timesteps", "encoder_hidden_states_t5",
                                                "encoder_hidden_states_llama3", "pooled_embeds")]
    return np.asarray(model(*args), dtype=np.float64), g["call1.output"].astype(np.float64)


def relative_error(model) -> float:
    out, ref = call1(model)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def quantized_paths(model) -> set[str]:
    return {p for p, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The fixture pipeline converted at 8 and 4 bits (fine group) and at 4 bits (coarse group)."""
    root = tmp_path_factory.mktemp("i1q")
    out = {}
    for bits, group in ((8, fine_group()), (4, fine_group()), (4, coarse_group())):
        out[bits, group] = convert_i1(str(FIXTURES), root / f"q{bits}g{group}", FLAT, bits=bits, group_size=group)
    return out


def test_the_plan_quantizes_block_linears_and_keeps_gate_norms_embedders_and_final_layer():
    plan = transformer_plan(component_index(FIXTURES / "transformer"), FLAT, 8, fine_group())
    quantized = {p for p, s in plan.layers.items() if s is not None}
    assert quantized and all(I1_LAYERS.default(p) for p in quantized)
    kinds = {p.split(".block.")[1].split(".")[0] for p in quantized}
    assert {"attn1", "ff_i", "adaLN_modulation"} <= kinds
    assert any(".ff_i.experts." in p for p in quantized) and any(".shared_experts." in p for p in quantized)
    assert any(".to_q_t" in p for p in quantized) and any(".ff_t." in p for p in quantized)
    kept = {p for p, s in plan.layers.items() if s is None}
    assert any(p.endswith("ff_i.gate") for p in kept)
    for prefix in ("caption_projection.", "x_embedder.", "t_embedder.", "p_embedder.", "final_layer."):
        assert any(p.startswith(prefix) for p in kept) and not any(p.startswith(prefix) for p in quantized)
    widths = matrices()
    assert plan.indivisible == sorted(p for p in widths if I1_LAYERS.default(p) and widths[p] % fine_group())


def test_a_recipe_pattern_may_quantize_the_caption_projections_but_never_the_gate():
    recipe = QuantRecipe.from_dict({"bits": 4, "overrides": [
        {"pattern": "caption_projection.*", "bits": 8}, {"pattern": "*.ff_i.gate", "bits": 8}]})
    group = min(GROUP_SIZES)
    plan = resolve_plan(recipe, matrices(), None, None, group, I1_LAYERS)
    captions = {p: s for p, s in plan.layers.items() if p.startswith("caption_projection.")}
    widths = matrices()
    assert all((s is not None and s.bits == 8) == (widths[p] % group == 0) for p, s in captions.items())
    assert all(s is None for p, s in plan.layers.items() if p.endswith("ff_i.gate"))
    assert [o.pattern for o in plan.unused_overrides] == ["*.ff_i.gate"]


def test_layers_the_group_size_does_not_divide_stay_float_and_are_named(converted, tmp_path):
    group = coarse_group()
    widths = matrices()
    expected = sorted(p for p, w in widths.items() if I1_LAYERS.default(p) and w % group)
    assert unquantized_layers(component_index(FIXTURES / "transformer"), "i1", 4, group) == expected
    conversion = converted[4, group]
    assert sorted(conversion.plan.indivisible) == expected
    block = conversion.config["quantization"]
    assert all(block[p] == "bf16" for p in expected)
    model = load_transformer(conversion.output / "transformer")
    quantized = quantized_paths(model)
    assert quantized == {p for p, w in widths.items() if I1_LAYERS.default(p) and w % group == 0}
    if expected:  # the notice names them on the command line
        result = CliRunner().invoke(main, ["quantize", "--model", str(FIXTURES), "--bits", "4", "--group-size",
                                           str(group), "--out", str(tmp_path / "cli")])
        assert result.exit_code == 0, result.output
        assert f"group size {group} does not divide the input width of {len(expected)} layer(s)" in result.output
        assert expected[0] in result.output


@pytest.mark.parametrize("bits", [8, 4])
def test_a_converted_pipeline_loads_with_no_flags_and_stays_close_to_the_float_output(converted, bits):
    conversion = converted[bits, fine_group()]
    model, plan = load_transformer_planned(conversion.output / "transformer")
    assert plan.stored and plan.description["bits"] == bits
    assert quantized_paths(model) == {p for p, s in conversion.plan.layers.items() if s is not None}
    error = relative_error(model)
    assert 0 < error < TOLERANCE[bits]
    if bits == 4:
        assert error > relative_error(load_transformer(converted[8, fine_group()].output / "transformer"))


@pytest.mark.parametrize("bits", [8, 4])
def test_q_at_load_gives_the_weights_of_the_converted_folder(converted, bits):
    group = fine_group()
    from_folder = dict(tree_flatten(load_transformer(converted[bits, group].output / "transformer",
                                                     lazy=False).parameters()))
    at_load = dict(tree_flatten(load_transformer(FIXTURES / "transformer", bits=bits, group_size=group,
                                                 lazy=False).parameters()))
    assert sorted(from_folder) == sorted(at_load)
    for name, value in at_load.items():
        assert value.dtype == from_folder[name].dtype, name
        np.testing.assert_array_equal(np.array(value), np.array(from_folder[name]), err_msg=name)


def test_the_other_components_are_carried_over_as_real_files(converted):
    out = converted[8, fine_group()].output
    assert family_of(out).name == I1 and is_conversion_output(out)
    assert (out / "model_index.json").read_bytes() == (FIXTURES / "model_index.json").read_bytes()
    for component in ("vae", "text_encoder", "tokenizer_3"):
        for src in (FIXTURES / component).iterdir():
            dst = out / component / src.name
            assert not dst.is_symlink() and dst.read_bytes() == src.read_bytes()
    config = json.loads((out / "transformer" / "config.json").read_text())
    source = json.loads((FIXTURES / "transformer" / "config.json").read_text())
    assert {k: config[k] for k in source} == source
    assert config["hidream"]["family"] == "i1" and config["hidream"]["quantize_recipe"] == "flat"


def test_a_quantized_folder_refuses_other_bits(converted):
    with pytest.raises(ModelLoadError, match="already quantized to 8 bits"):
        load_transformer(converted[8, fine_group()].output / "transformer", bits=4)


def test_output_rules_hold_for_pipelines(converted, tmp_path):
    runner = CliRunner()
    inside = runner.invoke(main, ["quantize", "--model", str(FIXTURES), "--bits", "8", "--out",
                                  str(FIXTURES / "q8")])
    assert inside.exit_code != 0 and "may not be, contain or lie inside the source" in inside.output
    assert not (FIXTURES / "q8").exists()
    out = tmp_path / "q"
    args = ["quantize", "--model", str(FIXTURES), "--bits", "8", "--group-size", str(fine_group()), "--out", str(out)]
    assert runner.invoke(main, args).exit_code == 0
    again = runner.invoke(main, args)
    assert again.exit_code != 0 and "already exists" in again.output
    assert runner.invoke(main, [*args, "--overwrite"]).exit_code == 0
    (out / "vae" / "notes.txt").write_text("mine")
    refused = runner.invoke(main, [*args, "--overwrite"])
    assert refused.exit_code != 0 and "replaces only a folder written by hidream-mlx quantize" in refused.output
    assert (out / "vae" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("flag", ["--no-vision", "--quantize-embeddings", "--report"])
def test_o1_only_flags_are_refused_for_pipelines_in_one_line(tmp_path, flag):
    result = CliRunner().invoke(main, ["quantize", "--model", str(FIXTURES), "--bits", "8", "--out",
                                       str(tmp_path / "q"), flag])
    assert result.exit_code != 0 and f"{flag}: not available for HiDream-I1" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "q").exists()
