"""HiDream-I1 LoRAs in every supported key layout change the transformer exactly as
``W + s * (alpha/r) * B @ A``; a zero LoRA changes nothing; files that fit nothing fail in one line.

Layouts (docs/model.md, "LoRA key layouts"): diffusers/PEFT ``transformer.<module>.lora_A/B.weight``
(alpha from the header's ``lora_adapter_metadata`` or an ``adapter_config.json``, else alpha = r),
ComfyUI / converted ``diffusion_model.<module>``, bare PEFT ``base_model.model.<module>``, kohya
``lora_unet_<module_underscored>.lora_down/lora_up/alpha`` (also dotted under ``diffusion_model.``,
and after ``lora_transformer_``) and SimpleTuner's ``lycoris_`` spelling.
"""

import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from hidream_mlx.cli import main
from hidream_mlx.images import read_metadata
from hidream_mlx.families.i1 import engine as engine_module
from hidream_mlx.families.i1.engine import I1Engine
from hidream_mlx.families.i1.lora_targets import transformer_targets
from hidream_mlx.families.i1.source import I1Source
from hidream_mlx.families.i1.text_encoding import TextEncoders
from hidream_mlx.families.i1.weights import load_transformer
from hidream_mlx.weights.lora import I1_KEYS, LoRAError, LoRALinear, apply_lora, switch_loras
from hidream_mlx.weights.lora_specs import LoRASpec
from i1_support import FIXTURES, golden

RANK, ALPHA = 2, 6.0
# Image and text attention, a routed expert, the shared expert, a single-stream block's
# modulation (a list index in its path), the caption projection and the final layer.
TARGETS = ("double_stream_blocks.0.block.attn1.to_q", "double_stream_blocks.0.block.attn1.to_v_t",
           "double_stream_blocks.1.block.ff_i.experts.1.w2", "single_stream_blocks.0.block.ff_i.shared_experts.w1",
           "single_stream_blocks.1.block.adaLN_modulation.1", "caption_projection.0.linear", "final_layer.linear")
LAYOUTS = ("diffusers_metadata", "diffusers_config", "diffusers_bare", "comfyui", "peft", "kohya", "kohya_dotted",
           "kohya_transformer", "lycoris")
KOHYA_PREFIXES = {"kohya": "lora_unet_", "kohya_transformer": "lora_transformer_", "lycoris": "lycoris_"}


def transformer():
    return load_transformer(FIXTURES / "transformer", lazy=False)


def lora_tensors(model, seed=0, scale=0.3):
    rng = np.random.default_rng(seed)
    modules = dict(model.named_modules())
    out = {}
    for path in TARGETS:
        o, i = modules[path].weight.shape
        out[path] = (rng.normal(0, scale, (RANK, i)).astype(np.float32),
                     rng.normal(0, scale, (o, RANK)).astype(np.float32))
    return out


def write_lora(folder, tensors, layout, alpha=ALPHA):
    """``tensors`` in ``layout``'s exact naming; a layout that cannot state alpha gets B pre-scaled."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "lora.safetensors"
    data, metadata = {}, {}
    for module, (A, B) in tensors.items():
        if layout.startswith("diffusers") or layout in ("comfyui", "peft"):
            prefix = {"comfyui": "diffusion_model.", "peft": "base_model.model."}.get(layout, "transformer.")
            prescale = alpha / RANK if layout in ("diffusers_bare", "comfyui", "peft") else 1.0
            data[f"{prefix}{module}.lora_A.weight"], data[f"{prefix}{module}.lora_B.weight"] = A, B * prescale
        else:
            key = (f"diffusion_model.{module}" if layout == "kohya_dotted"
                   else KOHYA_PREFIXES[layout] + module.replace(".", "_"))
            data[f"{key}.lora_down.weight"], data[f"{key}.lora_up.weight"] = A, B
            data[f"{key}.alpha"] = np.array(alpha, dtype=np.float32)
    if layout == "diffusers_metadata":  # what diffusers' save_lora_weights writes
        metadata["lora_adapter_metadata"] = json.dumps({"transformer.r": RANK, "transformer.lora_alpha": alpha})
    mx.save_safetensors(str(path), {k: mx.array(v) for k, v in data.items()}, metadata=metadata)
    if layout == "diffusers_config":
        (folder / "adapter_config.json").write_text(json.dumps({"r": RANK, "lora_alpha": alpha}))
    return path


def forward(model):
    """One transformer call on the golden inputs (call1 of transformer_forward.npz)."""
    g = golden("transformer_forward.npz")
    out = model(*(mx.array(g[f"call1.{k}"]) for k in ("hidden_states", "timesteps", "encoder_hidden_states_t5",
                                                       "encoder_hidden_states_llama3", "pooled_embeds")))
    return np.array(out)


def merged_by_hand(tensors, scale):
    model = transformer()
    modules = dict(model.named_modules())
    for path, (A, B) in tensors.items():
        modules[path].weight = mx.array(np.array(modules[path].weight) + scale * (ALPHA / RANK) * (B @ A))
    return model


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_merges_w_plus_scaled_b_a_and_changes_the_output_as_predicted(tmp_path, layout):
    base = transformer()
    tensors = lora_tensors(base)
    original = {p: np.array(m.weight) for p, m in base.named_modules() if p in TARGETS}
    summary = apply_lora(base, LoRASpec(write_lora(tmp_path, tensors, layout), 0.7), keys=I1_KEYS)
    assert summary.modules == len(TARGETS) and summary.merged == len(TARGETS) and summary.ranks == (RANK,)
    modules = dict(base.named_modules())
    for path, (A, B) in tensors.items():
        expected = original[path] + 0.7 * (ALPHA / RANK) * (B @ A)
        np.testing.assert_allclose(np.array(modules[path].weight), expected, rtol=1e-5, atol=1e-6)
    predicted = forward(merged_by_hand(tensors, 0.7))
    assert np.abs(forward(base) - predicted).max() < 1e-4
    assert np.abs(predicted - forward(transformer())).max() > 1e-2  # the LoRA does change the output


def test_a_zero_lora_leaves_the_output_identical(tmp_path):
    base = transformer()
    zeros = {p: (np.zeros_like(A), np.zeros_like(B)) for p, (A, B) in lora_tensors(base).items()}
    apply_lora(base, LoRASpec(write_lora(tmp_path, zeros, "kohya"), 1.0), keys=I1_KEYS)
    assert np.array_equal(forward(base), forward(transformer()))


def test_quantized_blocks_get_side_paths_and_the_float_layers_merge(tmp_path):
    model = load_transformer(FIXTURES / "transformer", lazy=False, bits=8, group_size=32)
    tensors = lora_tensors(transformer())
    summary = apply_lora(model, LoRASpec(write_lora(tmp_path, tensors, "diffusers_metadata")), keys=I1_KEYS)
    modules = dict(model.named_modules())
    assert isinstance(modules["double_stream_blocks.0.block.attn1.to_q"], LoRALinear)
    assert summary.side_paths >= 1 and summary.merged >= 1  # caption projection / final layer stay float
    assert summary.side_paths + summary.merged == len(TARGETS)
    predicted = forward(merged_by_hand(tensors, 1.0))  # float weights; the quantized ones add rounding
    assert np.abs(forward(model) - predicted).max() < 0.05 * np.abs(predicted).max()


def test_keys_that_match_nothing_fail_in_one_line_naming_file_and_key(tmp_path):
    path = tmp_path / "sdxl.safetensors"
    mx.save_safetensors(str(path), {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": mx.zeros((2, 4)),
                                    "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": mx.zeros((4, 2))})
    with pytest.raises(LoRAError) as err:
        apply_lora(transformer(), LoRASpec(path), keys=I1_KEYS)
    message = str(err.value)
    assert message.startswith(str(path)) and "no key matched" in message and "HiDream-I1" in message
    assert "\n" not in message


def test_a_wrong_shape_is_refused_before_any_weight_loads(tmp_path):
    source = I1Source.resolve(str(FIXTURES))
    key = "transformer.double_stream_blocks.0.block.attn1.to_q"
    out, inp = transformer_targets(source)["double_stream_blocks.0.block.attn1.to_q"]
    path = tmp_path / "wide.safetensors"
    mx.save_safetensors(str(path), {f"{key}.lora_A.weight": mx.zeros((2, inp + 1)),
                                    f"{key}.lora_B.weight": mx.zeros((out, 2))})
    with pytest.raises(LoRAError, match="the update is"):
        I1Engine(source, "float32", loras=[LoRASpec(path)])


def test_engine_switches_loras_in_place_exactly(tmp_path):
    """Eval and the server switch per job: the originals come back bit for bit."""
    source = I1Source.resolve(str(FIXTURES))
    engine = I1Engine(source, "float32")
    switch_loras(engine, [LoRASpec(write_lora(tmp_path, lora_tensors(transformer()), "kohya"))])
    engine.load_transformer()
    assert len(engine.loras) == 1 and engine.describe()["loras"][0]["modules"] == len(TARGETS)
    switch_loras(engine, [])
    assert engine.loras == [] and "loras" not in engine.describe()
    assert np.array_equal(forward(engine.transformer), forward(transformer()))


def run_cli(*args):
    return CliRunner().invoke(main, ["generate", "--model", str(FIXTURES), "--prompt", "a red fox", "--recipe", "fast",
                                     "--steps", "2", "--width", "128", "--height", "128", "--no-snap",
                                     "--dtype", "float32", "--seed", "3", *args])


def test_generate_applies_the_lora_and_records_it(tmp_path):
    lora = write_lora(tmp_path / "l", lora_tensors(transformer()), "diffusers_metadata")
    plain, changed, zero = tmp_path / "plain.png", tmp_path / "lora.png", tmp_path / "zero.png"
    assert run_cli("-o", str(plain)).exit_code == 0
    result = run_cli("--lora", str(lora), "--lora-scale", "0.5", "-o", str(changed))
    assert result.exit_code == 0, result.output
    assert f"lora lora.safetensors: {len(TARGETS)} modules changed (merged), scale 0.5" in result.output
    meta = read_metadata(changed)
    assert meta["loras"][0]["scale"] == 0.5 and meta["loras"][0]["layout"] == "peft"
    assert not np.array_equal(np.array(Image.open(plain)), np.array(Image.open(changed)))
    assert run_cli("--lora", str(lora), "--lora-scale", "0", "-o", str(zero)).exit_code == 0
    assert np.array_equal(np.array(Image.open(plain)), np.array(Image.open(zero)))


def test_generate_refuses_a_lora_for_another_model_in_one_line_before_any_weight_loads(tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("weights loaded before the refusal")

    monkeypatch.setattr(engine_module, "load_transformer_planned", no_loading)
    monkeypatch.setattr(TextEncoders, "model", no_loading)
    path = tmp_path / "o1.safetensors"
    mx.save_safetensors(str(path), {"language_model.layers.0.self_attn.q_proj.lora_A.weight": mx.zeros((2, 32)),
                                    "language_model.layers.0.self_attn.q_proj.lora_B.weight": mx.zeros((32, 2))})
    result = run_cli("--lora", str(path), "-o", str(tmp_path / "x.png"))
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("error:") and str(path) in lines[-1] and "no key matched" in lines[-1]
    assert "Traceback" not in result.output and not (tmp_path / "x.png").exists()


def test_a_broken_lora_adapter_metadata_header_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "meta.safetensors"
    key = "transformer.final_layer.linear"
    out, inp = dict(transformer().named_modules())["final_layer.linear"].weight.shape
    tensors = {f"{key}.lora_A.weight": mx.zeros((2, inp)), f"{key}.lora_B.weight": mx.zeros((out, 2))}
    mx.save_safetensors(str(path), tensors, metadata={"lora_adapter_metadata": "{not json"})
    with pytest.raises(LoRAError, match="lora_adapter_metadata in the header is not valid JSON") as err:
        apply_lora(transformer(), LoRASpec(path), keys=I1_KEYS)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)
