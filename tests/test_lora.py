"""LoRA files in every supported layout change the model exactly as ``W + s * (alpha/r) * B @ A``."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import FIXTURES

from hidream_mlx.families.o1.engine import Engine, Request
from hidream_mlx.families.o1.loading import load_model
from hidream_mlx.weights.lora import LoRAError, LoRALinear, apply_lora, apply_loras
from hidream_mlx.weights.lora_specs import LoRASpec, parse_lora_options, specs_from_json
from hidream_mlx.families.o1.recipes import get_recipe

RANK, ALPHA = 4, 8.0
# Decoder attention and MLP projections, the pixel head and both embedders.
TARGETS = ("language_model.layers.0.self_attn.q_proj", "language_model.layers.1.mlp.down_proj",
           "x_embedder.proj1", "t_embedder1.mlp.0", "final_layer2.linear")
LAYOUTS = ("peft", "peft_bare", "modelscope", "kohya_dotted", "kohya_unet")


def fresh():
    return load_model(FIXTURES, dtype=mx.float32)


def lora_tensors(model, seed=0, targets=TARGETS):
    rng = np.random.default_rng(seed)
    modules = dict(model.named_modules())
    out = {}
    for path in targets:
        o, i = modules[path].weight.shape
        out[path] = (rng.normal(0, 0.3, (RANK, i)).astype(np.float32), rng.normal(0, 0.3, (o, RANK)).astype(np.float32))
    return out


def write_lora(folder, tensors, layout, alpha=ALPHA):
    """Write ``tensors`` in ``layout``'s exact key naming; files without an alpha get B pre-scaled."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "lora.safetensors"
    data = {}
    for module, (A, B) in tensors.items():
        if layout == "peft":
            key = f"base_model.model.{module}"
            data[f"{key}.lora_A.weight"], data[f"{key}.lora_B.weight"] = A, B
        elif layout in ("peft_bare", "modelscope"):
            # no adapter_config.json: alpha = rank, so the factor alpha/rank goes into B
            key = module if layout == "peft_bare" else f"model.{module}"
            data[f"{key}.lora_A.weight"], data[f"{key}.lora_B.weight"] = A, B * (alpha / RANK)
        else:
            key = f"diffusion_model.{module}" if layout == "kohya_dotted" else "lora_unet_" + module.replace(".", "_")
            data[f"{key}.lora_down.weight"], data[f"{key}.lora_up.weight"] = A, B
            data[f"{key}.alpha"] = np.array(alpha, dtype=np.float32)
    mx.save_safetensors(str(path), {k: mx.array(v) for k, v in data.items()})
    if layout == "peft":
        (folder / "adapter_config.json").write_text(json.dumps({"r": RANK, "lora_alpha": alpha}))
    return path


def merge_by_hand(model, tensors, scale, alpha=ALPHA):
    modules = dict(model.named_modules())
    for module, (A, B) in tensors.items():
        w = np.array(modules[module].weight)
        modules[module].weight = mx.array(w + scale * (alpha / RANK) * (B @ A))
    return model


def image(model):
    request = Request("a red fox", 64, 96, 3, get_recipe("dev").with_overrides(steps=3))
    return Engine(model).run(request).image.astype(int)


@pytest.fixture(scope="module")
def base_image():
    return image(fresh())


def test_lora_equals_merging_by_hand_and_changes_the_image(tmp_path, base_image):
    model = fresh()
    tensors = lora_tensors(model)
    summary = apply_lora(model, LoRASpec(write_lora(tmp_path, tensors, "kohya_unet"), 0.7))
    got, want = image(model), image(merge_by_hand(fresh(), tensors, 0.7))
    assert np.abs(got - want).max() <= 1
    assert np.abs(got - base_image).max() > 10
    assert summary.modules == len(TARGETS) and summary.merged == len(TARGETS) and summary.scale == 0.7
    assert summary.line() == (f"lora lora.safetensors: {len(TARGETS)} modules changed (merged), scale 0.7, "
                              f"rank {RANK}, kohya layout")
    assert len(summary.sha256) == 64 and summary.to_dict()["sha256"] == summary.sha256


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_gives_the_same_weights_and_image(tmp_path, layout):
    reference = merge_by_hand(fresh(), lora_tensors(fresh()), 1.0)
    model = fresh()
    apply_lora(model, LoRASpec(write_lora(tmp_path, lora_tensors(model), layout)))
    ref_modules = dict(reference.named_modules())
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear):
            np.testing.assert_allclose(np.array(module.weight), np.array(ref_modules[path].weight), atol=1e-6)
    if layout == "kohya_unet":
        assert np.abs(image(model) - image(reference)).max() <= 1


def test_scale_zero_gives_the_base_image_exactly(tmp_path, base_image):
    model = fresh()
    apply_lora(model, LoRASpec(write_lora(tmp_path, lora_tensors(model), "peft"), 0.0))
    np.testing.assert_array_equal(image(model), base_image)


def test_loras_stack(tmp_path):
    model = fresh()
    first, second = lora_tensors(model, 1), lora_tensors(model, 2, TARGETS[:2])
    specs = [LoRASpec(write_lora(tmp_path / "a", first, "peft"), 0.5),
             LoRASpec(write_lora(tmp_path / "b", second, "kohya_dotted"), -0.25)]
    summaries = apply_loras(model, specs)
    want = merge_by_hand(merge_by_hand(fresh(), first, 0.5), second, -0.25)
    assert [s.modules for s in summaries] == [len(TARGETS), 2]
    for path in TARGETS:
        np.testing.assert_allclose(np.array(dict(model.named_modules())[path].weight),
                                   np.array(dict(want.named_modules())[path].weight), atol=1e-6)


def quantize_decoder(model):
    nn.quantize(model, group_size=32, bits=8, class_predicate=lambda p, m: p.startswith("language_model.layers")
                and isinstance(m, nn.Linear))
    return model


def test_quantized_layers_get_a_side_path_that_matches_merging_into_dequantized_weights(tmp_path):
    model = quantize_decoder(fresh())
    tensors = lora_tensors(fresh())
    summary = apply_lora(model, LoRASpec(write_lora(tmp_path, tensors, "peft"), 0.8))
    assert (summary.merged, summary.side_paths) == (3, 2)
    modules = dict(model.named_modules())
    side = modules["language_model.layers.0.self_attn.q_proj"]
    assert isinstance(side, LoRALinear) and isinstance(side.base, nn.QuantizedLinear)
    assert side.lora_A[0].shape[0] == RANK  # rank-sized memory, the quantized weight untouched
    # The reference: the same quantized model with its decoder dequantized, then merged by hand.
    reference = quantize_decoder(fresh())
    for path, m in list(reference.named_modules()):
        if isinstance(m, nn.QuantizedLinear):
            w = mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits)
            dense = nn.Linear(w.shape[1], w.shape[0], bias=False)
            dense.weight = w
            parent, name = path.rsplit(".", 1)
            setattr(dict(reference.named_modules())[parent], name, dense)
    merge_by_hand(reference, tensors, 0.8)
    diff = np.abs(image(model) - image(reference))
    assert diff.max() <= 2 and (diff == 0).mean() >= 0.9


def test_quantized_side_paths_stack_on_one_layer(tmp_path):
    model = quantize_decoder(fresh())
    apply_lora(model, LoRASpec(write_lora(tmp_path / "a", lora_tensors(fresh(), 1, TARGETS[:1]), "peft"), 1.0))
    apply_lora(model, LoRASpec(write_lora(tmp_path / "b", lora_tensors(fresh(), 2, TARGETS[:1]), "kohya_unet"), 1.0))
    layer = dict(model.named_modules())[TARGETS[0]]
    assert isinstance(layer, LoRALinear) and len(layer.lora_A) == 2 and isinstance(layer.base, nn.QuantizedLinear)


def test_peft_alpha_comes_from_adapter_config_patterns(tmp_path):
    model = fresh()
    tensors = lora_tensors(model, targets=TARGETS[:2])
    path = write_lora(tmp_path, tensors, "peft")
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"r": RANK, "lora_alpha": 8, "alpha_pattern": {"mlp.down_proj": 2}}))
    apply_lora(model, LoRASpec(path))
    want = merge_by_hand(merge_by_hand(fresh(), {TARGETS[0]: tensors[TARGETS[0]]}, 1.0, 8.0),
                         {TARGETS[1]: tensors[TARGETS[1]]}, 1.0, 2.0)
    for p in TARGETS[:2]:
        np.testing.assert_allclose(np.array(dict(model.named_modules())[p].weight),
                                   np.array(dict(want.named_modules())[p].weight), atol=1e-6)


def bad_file(tmp_path, data):
    path = tmp_path / "bad.safetensors"
    mx.save_safetensors(str(path), {k: mx.array(np.asarray(v, dtype=np.float32)) for k, v in data.items()})
    return path


@pytest.mark.parametrize("data, message", [
    ({"language_model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((4, 65)),
      "language_model.layers.0.self_attn.q_proj.lora_B.weight": np.zeros((64, 4))},
     "key language_model.layers.0.self_attn.q_proj.lora_A.weight: the update is 64x65 but "
     "language_model.layers.0.self_attn.q_proj is 64x64"),
    ({"language_model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((4, 64)),
      "language_model.layers.0.self_attn.q_proj.lora_B.weight": np.zeros((64, 4)),
      "language_model.layers.9.self_attn.q_proj.lora_A.weight": np.zeros((4, 64))},
     "key language_model.layers.9.self_attn.q_proj.lora_A.weight targets a module this model does not have"),
    ({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": np.zeros((4, 64)),
      "other.thing": np.zeros(3)},
     "no key matched a module of this model; first unrecognised key: "
     "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"),
    ({"x_embedder.proj1.lora_A.weight": np.zeros((4, 3072))}, "key x_embedder.proj1.lora_A.weight has no matching lora_B"),
])
def test_bad_files_fail_naming_the_key(tmp_path, data, message):
    with pytest.raises(LoRAError, match="^" + str(tmp_path / "bad.safetensors").replace(".", r"\.")) as err:
        apply_lora(fresh(), LoRASpec(bad_file(tmp_path, data)))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_options_pair_in_order_and_battery_entries_are_checked(tmp_path):
    specs = parse_lora_options(["a.safetensors", "b.safetensors"], [0.5])
    assert [(s.path.name, s.scale) for s in specs] == [("a.safetensors", 0.5), ("b.safetensors", 1.0)]
    with pytest.raises(LoRAError, match="2 LoRA scales given for 1 LoRA files"):
        parse_lora_options(["a.safetensors"], [1, 2])
    assert specs_from_json([{"path": "x.safetensors"}], "jobs[0]")[0].scale == 1.0
    with pytest.raises(LoRAError, match=r"jobs\[0\]\.loras\[0\]\.scale must be a number"):
        specs_from_json([{"path": "x.safetensors", "scale": "big"}], "jobs[0]")
    with pytest.raises(LoRAError, match="LoRAs are read from .safetensors files only"):
        apply_lora(fresh(), LoRASpec((tmp_path / "x.pt"), 1.0)) if (tmp_path / "x.pt").write_bytes(b"x") else None


CLI = ["generate", "--model", str(FIXTURES), "--prompt", "a red fox", "--no-snap", "--width", "256",
       "--height", "256", "--seed", "3", "--recipe", "dev", "--steps", "2"]


def cli(*args):
    from click.testing import CliRunner

    from hidream_mlx.cli import main

    return CliRunner().invoke(main, [*CLI, *args])


def test_cli_applies_paired_loras_and_records_them_in_the_png(tmp_path):
    from hidream_mlx.images import read_metadata
    from hidream_mlx.files import sha256_file

    a = write_lora(tmp_path / "a", lora_tensors(fresh(), 1), "kohya_unet")
    b = write_lora(tmp_path / "b", lora_tensors(fresh(), 2, TARGETS[:2]), "peft")
    out = tmp_path / "o.png"
    result = cli("--lora", str(a), "--lora-scale", "0.5", "--lora-paths", str(b), "--output", str(out),
                 "--dtype", "float32")
    assert result.exit_code == 0, result.output
    assert f"lora lora.safetensors: {len(TARGETS)} modules changed (merged), scale 0.5" in result.output
    assert "lora lora.safetensors: 2 modules changed (merged), scale 1" in result.output
    meta = read_metadata(out)
    assert [(x["name"], x["scale"], x["sha256"]) for x in meta["loras"]] == [
        ("lora.safetensors", 0.5, sha256_file(a)), ("lora.safetensors", 1.0, sha256_file(b))]


@pytest.mark.parametrize("make, message", [
    (lambda d: bad_file(d, {"x_embedder.proj1.lora_A.weight": np.zeros((4, 7)),
                            "x_embedder.proj1.lora_B.weight": np.zeros((16, 4))}), "the update is 16x7 but"),
    (lambda d: bad_file(d, {"foo.lora_A.weight": np.zeros((4, 7)), "foo.lora_B.weight": np.zeros((16, 4))}),
     "first unrecognised key: foo.lora_A.weight"),
    (lambda d: bad_file(d, {"x_embedder.proj1.lora_A.weight": np.zeros((4, 3072)),
                            "x_embedder.proj1.lora_B.weight": np.zeros((16, 4)),
                            "x_embedder.proj9.lora_A.weight": np.zeros((4, 3072))}),
     "key x_embedder.proj9.lora_A.weight targets a module this model does not have"),
    (lambda d: d / "missing.safetensors", "missing.safetensors: no such LoRA file"),
])
def test_cli_bad_loras_give_one_clear_line(tmp_path, make, message):
    result = cli("--lora", str(make(tmp_path)), "--output", str(tmp_path / "o.png"))
    assert result.exit_code != 0 and message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) <= 2
    assert not (tmp_path / "o.png").exists()


def test_quantize_bakes_loras_in_before_quantizing_and_records_them(tmp_path):
    from click.testing import CliRunner

    from hidream_mlx.cli import main
    from hidream_mlx.files import sha256_file

    tensors = lora_tensors(fresh())
    path = write_lora(tmp_path / "l", tensors, "kohya_dotted")
    out = tmp_path / "q8"
    result = CliRunner().invoke(main, ["quantize", "--model", str(FIXTURES), "--bits", "8", "--output", str(out),
                                       "--no-vision", "--lora", str(path), "--lora-scale", "0.6"])
    assert result.exit_code == 0, result.output
    assert f"baked in: lora lora.safetensors: {len(TARGETS)} modules changed" in result.output
    loras = json.loads((out / "config.json").read_text())["hidream"]["loras"]
    assert loras == [{"name": "lora.safetensors", "sha256": sha256_file(path), "scale": 0.6,
                      "modules": len(TARGETS), "layout": "kohya"}]
    baked = dict(load_model(out, dtype=mx.float32).named_modules())
    want = dict(merge_by_hand(fresh(), tensors, 0.6).named_modules())
    for name in TARGETS:
        m = baked[name]
        w = (mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits)
             if isinstance(m, nn.QuantizedLinear) else m.weight)
        ref = np.array(want[name].weight)
        # bf16 storage, then 8-bit groups for the decoder: within that noise of the merged weight
        assert np.abs(np.array(w) - ref).max() <= 0.02 * np.abs(ref).max(), name
    assert isinstance(baked[TARGETS[0]], nn.QuantizedLinear)  # baked in: no side path, no LoRA at run time


def test_loading_a_rank_64_lora_costs_its_own_size_plus_one_layer(tmp_path):
    from hidream_mlx.weights.lora import linear_targets

    model = fresh()
    decoder = [p for p in linear_targets(model) if p.startswith("language_model.layers")]
    rng = np.random.default_rng(0)
    modules = dict(model.named_modules())
    data = {}
    for p in decoder:
        o, i = modules[p].weight.shape
        data[f"{p}.lora_A.weight"] = mx.array(rng.normal(size=(64, i)).astype(np.float32))
        data[f"{p}.lora_B.weight"] = mx.array(rng.normal(size=(o, 64)).astype(np.float32))
    path = tmp_path / "r64.safetensors"
    mx.save_safetensors(str(path), data)
    del data
    layer = max(modules[p].weight.nbytes for p in decoder)
    mx.eval(model.parameters())
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    apply_lora(model, LoRASpec(path))
    assert mx.get_peak_memory() - before <= path.stat().st_size + layer


def test_eval_jobs_switch_loras_exactly_and_record_them(tmp_path):
    from hidream_mlx.harness.batteries import parse_variants, read_battery
    from hidream_mlx.harness.evaluation import EvalRun, load_engine, plan_jobs, read_results
    from hidream_mlx.files import sha256_file

    lora = write_lora(tmp_path / "l", lora_tensors(fresh()), "peft")
    items = [{"id": "plain", "prompt": "a fox", "size": "64x64", "seed": 1},
             {"id": "styled", "prompt": "a fox", "size": "64x64", "seed": 1,
              "loras": [{"path": str(lora), "scale": 0.5}]},
             {"id": "plain2", "prompt": "a fox", "size": "64x64", "seed": 1}]
    battery = tmp_path / "b.jsonl"
    battery.write_text("\n".join(json.dumps(i) for i in items) + "\n")
    engine = load_engine(str(FIXTURES), dtype="float32")
    variants = parse_variants(["v:recipe=dev,steps=2"])
    run = EvalRun(tmp_path / "run", {"model": "o1-tiny", "dtype": "float32", "quantize": None, "battery": "b"},
                  variants)
    run.start_session(engine)
    run.run(engine, plan_jobs(read_battery(battery), variants))
    rows = {r["id"]: r for r in read_results(tmp_path / "run").values()}
    assert rows["styled"]["loras"] == [{"name": "lora.safetensors", "sha256": sha256_file(lora), "scale": 0.5,
                                        "modules": len(TARGETS), "layout": "peft"}]
    assert rows["plain"]["loras"] == [] and rows["plain2"]["loras"] == []
    from PIL import Image

    pixels = {k: np.array(Image.open(tmp_path / "run" / rows[k]["image"])).astype(int) for k in rows}
    np.testing.assert_array_equal(pixels["plain"], pixels["plain2"])  # the LoRA was undone exactly
    assert np.abs(pixels["styled"] - pixels["plain"]).max() > 10
