"""Adapters that switch off (E1-Full's LoRA, off for the refine stage) and user LoRAs on the E1
transformers: an AdapterLinear computes W x + b + (alpha / r) B (A x) while enabled and exactly
W x + b when not; a user LoRA in an I1 layout changes the layer under the adapter and is undone
exactly; an E1.1 edit with a LoRA differs from one without, and switching it off gives the plain
edit back."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from e1_support import e1_1_budget, e1_full_size, user_layout
from hidream_mlx.families.i1.e1.engine import E1Engine
from hidream_mlx.families.i1.e1.replay import edit_transformer
from hidream_mlx.families.i1.e1.source import E1Source
from hidream_mlx.families.i1.e1.requests import E1Request as Request
from hidream_mlx.weights.lora import (I1_KEYS, AdapterLinear, LoRALayer, attach_adapter, linear_targets, replace_loras, set_adapters_enabled)
from hidream_mlx.weights.lora_specs import LoRASpec

TARGET = "double_stream_blocks.0.block.attn1.to_q"


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    return user_layout(tmp_path_factory.mktemp("e1"))


def test_an_adapter_adds_its_scaled_low_rank_path_and_switches_off_exactly():
    rng = np.random.default_rng(0)
    model = nn.Sequential(nn.Linear(6, 5))
    A, B = (mx.array(rng.normal(size=s).astype(np.float32)) for s in ((4, 6), (5, 4)))
    attach_adapter(model, {"layers.0": LoRALayer("k", A, B, alpha=8.0)}, mx.float32)
    x = mx.array(rng.normal(size=(3, 6)).astype(np.float32))
    base = model.layers[0].base(x)
    np.testing.assert_allclose(np.array(model(x)), np.array(base + 2.0 * (x @ A.T) @ B.T), rtol=1e-6)
    assert set_adapters_enabled(model, False) == 1
    np.testing.assert_array_equal(np.array(model(x)), np.array(base))


def user_lora(path, model, seed=1):
    """A diffusers-layout LoRA (transformer.<module>) on one attention projection, alpha = rank."""
    shape = linear_targets(model)[TARGET]
    out_f, in_f = shape.base.weight.shape if isinstance(shape, AdapterLinear) else shape.weight.shape
    rng = np.random.default_rng(seed)
    mx.save_safetensors(str(path), {f"transformer.{TARGET}.lora_A.weight": mx.array(rng.normal(0, 0.3, (2, in_f))),
                                    f"transformer.{TARGET}.lora_B.weight": mx.array(rng.normal(0, 0.3, (out_f, 2)))})
    return LoRASpec(path)


def test_a_user_lora_changes_the_layer_under_e1_full_s_adapter_and_is_undone_exactly(layout, tmp_path):
    model = edit_transformer(E1Source.resolve(layout["e1_full"], layout["base"]))
    adapter = linear_targets(model)[TARGET]
    assert isinstance(adapter, AdapterLinear)
    before = mx.array(adapter.base.weight)
    summaries, keep = replace_loras(model, [user_lora(tmp_path / "u.safetensors", model)], {}, I1_KEYS)
    assert summaries[0].merged == 1 and linear_targets(model)[TARGET] is adapter
    assert float(mx.abs(adapter.base.weight - before).max()) > 0
    replace_loras(model, [], keep, I1_KEYS)
    np.testing.assert_array_equal(np.array(adapter.base.weight), np.array(before))


def test_an_e1_1_edit_with_a_lora_differs_and_switching_it_off_restores_the_plain_edit(layout, tmp_path):
    engine = E1Engine.load(layout["e1_1"], base=layout["base"], dtype="float32")
    request = Request("Make it blue.", *e1_1_budget(), 2, engine.recipe().with_overrides(steps=2),
                      references=(str(layout["source"]),))
    plain = engine.run(request).image
    engine.load_transformer()
    spec = user_lora(tmp_path / "u.safetensors", engine.transformer)
    engine.use_loras([spec])
    with_lora = engine.run(request)
    assert not np.array_equal(with_lora.image, plain)
    assert with_lora.metadata["loras"][0]["name"] == "u.safetensors"
    engine.use_loras([])
    np.testing.assert_array_equal(engine.run(request).image, plain)


def test_e1_full_quantized_at_load_keeps_its_lora_switchable_over_the_quantized_layers(layout):
    engine = E1Engine.load(layout["e1_full"], base=layout["base"], dtype="float32", quantize_bits=8)
    engine.load_transformer()
    adapters = [m for _, m in engine.transformer.named_modules() if isinstance(m, AdapterLinear)]
    quantized = [m for m in adapters if isinstance(m.base, nn.QuantizedLinear)]
    assert quantized and len(adapters) == len(engine.source.e1_full.lora)
    layer = quantized[0]
    x = mx.array(np.random.default_rng(2).normal(size=(2, layer.lora_A.shape[1])).astype(np.float32))
    assert float(mx.abs(layer(x) - layer.base(x)).max()) > 0
    set_adapters_enabled(engine.transformer, False)
    np.testing.assert_array_equal(np.array(layer(x)), np.array(layer.base(x)))
    request = Request("Editing Instruction: x. Target Image Description: y", *e1_full_size(), 1,
                      engine.recipe().with_overrides(steps=2), references=(str(layout["source"]),))
    result = engine.run(request)
    assert result.image.shape == (*e1_full_size()[::-1], 3) and result.metadata["quantization"]["bits"] == 8
