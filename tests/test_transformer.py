"""The MLX transformer equals the reference forward pass, layer by layer (float32)."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import load_case

from hidream_mlx.families.o1.positions import rope_tables
from hidream_mlx.families.o1.replay import predict_recorded, prefix_length
from hidream_mlx.families.o1.transformer import generation_mask

FORWARD = load_case("forward_t2i.npz")
CASES = sorted({k.split(".")[0] for k in FORWARD.files})
TOL = dict(atol=1e-4, rtol=1e-4)


def inputs(case):
    return {k: FORWARD[f"{case}.{k}"] for k in ("input_ids", "position_ids", "token_types", "vinputs", "timestep")}


@pytest.mark.parametrize("case", CASES)
def test_rope_tables_match(tiny_model, case):
    cos, sin = rope_tables(tiny_model.config.text, FORWARD[f"{case}.position_ids"][:, 0])
    np.testing.assert_allclose(np.array(cos), FORWARD[f"{case}.rope_cos"][0], **TOL)
    np.testing.assert_allclose(np.array(sin), FORWARD[f"{case}.rope_sin"][0], **TOL)


@pytest.mark.parametrize("case", CASES)
def test_timestep_and_patch_embeddings_match(tiny_model, case):
    x = inputs(case)
    emb = np.array(tiny_model.embed_generation(mx.array(x["timestep"]), mx.array(x["vinputs"])))
    np.testing.assert_allclose(emb[:, 0], FORWARD[f"{case}.t_emb"], **TOL)
    np.testing.assert_allclose(emb[:, 1:], FORWARD[f"{case}.x_emb"], **TOL)


@pytest.mark.parametrize("case", CASES)
def test_attention_mask_is_causal_text_and_full_generation(case):
    ids, total = FORWARD[f"{case}.input_ids"], FORWARD[f"{case}.position_ids"].shape[-1]
    mask = np.array(generation_mask(ids.shape[1] - 1, total))
    np.testing.assert_array_equal(mask, FORWARD[f"{case}.attn_mask_4d"].astype(bool))


@pytest.mark.parametrize("case", CASES)
def test_every_layer_of_the_full_sequence_pass_matches(tiny_model, case):
    x = inputs(case)
    out, hidden = tiny_model.forward(mx.array(x["input_ids"]), x["position_ids"][:, 0], mx.array(x["timestep"]),
                                     mx.array(x["vinputs"]), return_hidden=True)
    for i, h in enumerate(hidden):
        np.testing.assert_allclose(np.array(h), FORWARD[f"{case}.hidden_after_layer{i}"], **TOL,
                                   err_msg=f"hidden state after decoder layer {i}")
    np.testing.assert_allclose(np.array(out), FORWARD[f"{case}.x_pred"], **TOL)


@pytest.mark.parametrize("case", CASES)
def test_prefix_cached_path_gives_the_reference_x_pred(tiny_model, case):
    x_pred = predict_recorded(tiny_model, **inputs(case))
    assert x_pred.shape == FORWARD[f"{case}.x_pred"].shape
    np.testing.assert_allclose(x_pred, FORWARD[f"{case}.x_pred"], **TOL)


def test_prefix_cache_is_reused_across_timesteps(tiny_model):
    """One cache, many steps: each equals a fresh full-sequence pass at that timestep."""
    x = inputs(CASES[0])
    ids, pos = x["input_ids"], x["position_ids"][:, 0]
    n = prefix_length(x["token_types"])
    cache = tiny_model.encode_prefix(mx.array(ids[:, :n]), pos[:, :n])
    for t in (0.9, 0.5, 0.1):
        cached = tiny_model.denoise(cache, mx.array([t]), mx.array(x["vinputs"]), pos[:, n:])
        full = tiny_model.forward(mx.array(ids), pos, mx.array([t]), mx.array(x["vinputs"]))
        np.testing.assert_allclose(np.array(cached), np.array(full), atol=1e-5, rtol=1e-5)


def test_bfloat16_weights_stay_close_to_float32(fixtures_dir):
    from hidream_mlx.families.o1.loading import load_model

    model = load_model(fixtures_dir, dtype=mx.bfloat16)
    assert model.language_model.layers[0].mlp.up_proj.weight.dtype == mx.bfloat16
    x_pred = predict_recorded(model, **inputs(CASES[0]))
    ref = FORWARD[f"{CASES[0]}.x_pred"]
    assert x_pred.dtype == np.float32
    assert np.abs(x_pred - ref).max() < 0.05 * np.abs(ref).max()


@pytest.mark.parametrize("heads, kv_heads, head_dim, section, grid", [
    (6, 3, 32, [6, 5, 5], (3, 5)),
    (8, 8, 8, [2, 1, 1], (4, 2)),
])
def test_other_dims_give_the_same_x_pred_through_cache_and_full_pass(heads, kv_heads, head_dim, section, grid):
    """Nothing is tuned to the fixture dims: any head layout, MRoPE split and non-square grid."""
    from hidream_mlx.families.o1.config import ModelConfig
    from hidream_mlx.families.o1.positions import t2i_positions
    from hidream_mlx.families.o1.synthetic import synthetic_prompt_ids
    from hidream_mlx.families.o1.transformer import HiDreamO1

    text = dict(hidden_size=heads * head_dim, num_hidden_layers=2, num_attention_heads=heads,
                num_key_value_heads=kv_heads, head_dim=head_dim, intermediate_size=96, vocab_size=151936,
                rope_scaling={"mrope_section": section, "mrope_interleaved": True})
    model = HiDreamO1(ModelConfig.from_dict({"model_type": "qwen3_vl", "text_config": text}))
    ids = synthetic_prompt_ids(11)
    positions = t2i_positions(len(ids), *grid)
    patches = mx.random.normal((1, grid[0] * grid[1], 3072), key=mx.random.key(0))
    full = model.forward(mx.array(ids[None]), positions, mx.array([0.4]), patches)
    n = len(ids) - 1
    cache = model.encode_prefix(mx.array(ids[None, :n]), positions[:, :n])
    cached = model.denoise(cache, mx.array([0.4]), patches, positions[:, n:])
    assert cached.shape == (1, grid[0] * grid[1], 3072)
    np.testing.assert_allclose(np.array(cached), np.array(full), atol=1e-4, rtol=1e-4)
