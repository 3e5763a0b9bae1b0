"""`hidream-mlx generate` with HiDream-E1 models laid out as users download them (an I1-Full
pipeline folder as --base, an E1.1 folder holding transformer/, a folder holding
HiDream-E1-Full.safetensors): free-running edits from the command line equal the official images
(E1.1 and its --refine-strength 0 and --no-clip-cfg-norm runs within one level on 99 % identical
values, E1-Full within two on 97 %), the metadata names no path and re-renders with --from-image,
several seeds and instructions share one load. Sizes, seeds and prompts come from the fixture set
(HIDREAM_E1_FIXTURES picks another)."""

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from e1_support import FIXTURES, assert_image_close, e1_1_budget, e1_full_size, golden, user_layout
from hidream_mlx.cli import main
from hidream_mlx.families.i1.e1 import engine as engine_module
from hidream_mlx.families.i1.e1.sizes import resize_plan
from hidream_mlx.families.i1.text_encoding import TextEncoders
from hidream_mlx.files import sha256_file
from hidream_mlx.images import read_metadata

E1_1_CASES = ("e1_1_sampling", "e1_1_sampling_refine0", "e1_1_sampling_no_clip_cfg_norm")


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    return user_layout(tmp_path_factory.mktemp("e1"))


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def case_args(name: str, layout: dict, kind: str, size) -> list:
    """generate's flags for the recorded run ``name``: its prompt, negative prompt, seed and settings."""
    case = golden(name)
    args = ["generate", "--model", layout[kind], "--base", layout["base"], "--ref", layout["source"],
            "--prompt", str(case["prompt"]), "--negative-prompt", str(case["negative_prompt"]),
            "--seed", int(case["seed"]), "--width", size[0], "--height", size[1], "--dtype", "float32",
            "--steps", int(case["num_inference_steps"]), "--guidance", float(case["guidance_scale"]),
            "--image-guidance", float(case["image_guidance_scale"]),
            "--refine-strength", float(case["refine_strength"])]
    return args + ([] if bool(case["clip_cfg_norm"]) else ["--no-clip-cfg-norm"])


def pixels(path) -> np.ndarray:
    return np.array(Image.open(path))


@pytest.mark.parametrize("name", E1_1_CASES)
def test_an_e1_1_edit_from_the_command_line_equals_the_official_image(name, layout, tmp_path):
    out = tmp_path / "edit.png"
    result = invoke(*case_args(name, layout, "e1_1", e1_1_budget()), "-o", out)
    assert result.exit_code == 0, result.output
    case = golden(name)
    assert_image_close(pixels(out), case["image"], levels=1, identical=0.99)
    meta = read_metadata(out)
    assert (meta["family"], meta["recipe"], meta["e1_model"], meta["max_seq"]) == ("e1", "e1.1", "e1.1",
                                                                                  int(case["max_seq"]))
    assert meta["edited_size"] == [case["image"].shape[1], case["image"].shape[0]]
    assert meta["official_recipe"] is (name == "e1_1_sampling")


def test_an_e1_full_edit_from_the_command_line_equals_the_official_image(layout, tmp_path):
    out = tmp_path / "edit.png"
    result = invoke(*case_args("e1_full_sampling", layout, "e1_full", e1_full_size()), "-o", out)
    assert result.exit_code == 0, result.output
    case = golden("e1_full_sampling")
    assert_image_close(pixels(out), case["image"], levels=2, identical=0.97)
    meta = read_metadata(out)
    assert meta["recipe"] == "e1-full" and meta["target_prompt"] == str(case["target_prompt"])
    assert "Editing Instruction" not in result.output  # the prompt has its description: no format note


def test_the_model_picks_its_recipe_and_the_metadata_names_no_path_and_re_renders(layout, tmp_path):
    shutil.copy(layout["source"], tmp_path / "photo.png")
    out, again = tmp_path / "a.png", tmp_path / "b.png"
    width, height = e1_1_budget()
    result = invoke("generate", "--model", layout["e1_1"], "--base", layout["base"], "--ref", tmp_path / "photo.png",
                    "--prompt", "Make it blue.", "--seed", 5, "--steps", 2, "--width", width, "--height", height,
                    "--dtype", "float32", "--no-clip-cfg-norm", "--image-guidance", 2, "-o", out)
    assert result.exit_code == 0, result.output
    meta = read_metadata(out)
    assert meta["recipe"] == "e1.1" and meta["clip_cfg_norm"] is False and meta["image_guidance"] == 2
    assert meta["reference_files"] == [{"name": "photo.png", "sha256": sha256_file(tmp_path / "photo.png")}]
    text = json.dumps(meta)
    for folder in (layout["base"], layout["e1_1"], tmp_path):
        assert str(folder) not in text
    assert meta["model"] == meta["model_name"] == layout["e1_1"].name
    assert meta["base"] == layout["base"].name and meta["base_fingerprint"].startswith("sha256:")
    described = invoke("info", out)
    assert described.exit_code == 0 and "HiDream-E1 (e1.1) on HiDream-I1-Full" in described.output
    assert "reference photo.png" in described.output
    # the model and the base were local folders: recorded by name, given again with --model and --base
    refused = invoke("generate", "--from-image", out, "-o", again)
    assert refused.exit_code == 1 and "give it with --model FOLDER" in refused.output
    refused = invoke("generate", "--from-image", out, "--model", layout["e1_1"], "-o", again)
    assert refused.exit_code == 1 and "the local base HiDream-I1-Full" in refused.output
    assert "give it with --base FOLDER" in refused.output and "Traceback" not in refused.output
    rerun = invoke("generate", "--from-image", out, "--model", layout["e1_1"], "--base", layout["base"], "-o", again)
    assert rerun.exit_code == 0, rerun.output
    assert "found beside the image" in rerun.output
    np.testing.assert_array_equal(pixels(out), pixels(again))
    assert read_metadata(again)["clip_cfg_norm"] is False


def test_seeds_and_instructions_share_one_load_and_the_prompts_are_encoded_first(layout, tmp_path, monkeypatch):
    """A prompt file of two instructions (one with its own source) x two seeds: one encode, one load."""
    events = []
    real_encode, real_load = TextEncoders.encode, engine_module.load_transformer_planned
    monkeypatch.setattr(TextEncoders, "encode", lambda self, texts: events.append("encode") or real_encode(self, texts))
    monkeypatch.setattr(engine_module, "load_transformer_planned",
                        lambda *a, **k: events.append("load") or real_load(*a, **k))
    wide = tmp_path / "inputs" / "wide.png"
    wide.parent.mkdir()
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (90, 200, 3), dtype=np.uint8)).save(wide)
    prompts = tmp_path / "edits.jsonl"
    prompts.write_text(json.dumps({"prompt": "Make it blue."}) + "\n"
                       + json.dumps({"prompt": "Make it red.", "ref": "inputs/wide.png"}) + "\n")
    width, height = e1_1_budget()
    result = invoke("generate", "--model", layout["e1_1"], "--base", layout["base"], "--ref", layout["source"],
                    "--prompt-file", prompts, "--seed", 1, "--count", 2, "--steps", 1, "--width", width,
                    "--height", height, "--dtype", "float32", "-o", tmp_path / "{n}.png")
    assert result.exit_code == 0, result.output
    assert events == ["encode", "load"]
    metas = [read_metadata(tmp_path / f"{n}.png") for n in range(1, 5)]
    assert [m["seed"] for m in metas] == [1, 2, 1, 2]
    assert [m["reference_files"][0]["name"] for m in metas] == ["source.png"] * 2 + ["wide.png"] * 2
    plan = resize_plan("budget", (200, 90), width, height)
    assert metas[2]["edited_size"] == list(plan.size) and pixels(tmp_path / "3.png").shape[:2] == plan.size[::-1]


def test_e1_full_resizes_exactly_and_keep_source_size_restores_a_non_square_source(layout, tmp_path):
    wide = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (70, 150, 3), dtype=np.uint8)).save(wide)
    width, height = e1_full_size()
    for extra, shape in (([], (height, width)), (["--keep-source-size"], (70, 150))):
        out = tmp_path / f"out{len(extra)}.png"
        result = invoke("generate", "--model", layout["e1_full"], "--base", layout["base"], "--ref", wide,
                        "--prompt", "Editing Instruction: make it red. Target Image Description: a red picture.",
                        "--steps", 1, "--width", width, "--height", height, "--dtype", "float32", "-o", out, *extra)
        assert result.exit_code == 0, result.output
        assert pixels(out).shape[:2] == shape
        assert read_metadata(out)["edited_size"] == [width, height]


def test_e1_full_notes_a_prompt_without_its_target_description(layout, tmp_path):
    width, height = e1_full_size()
    result = invoke("generate", "--model", layout["e1_full"], "--base", layout["base"], "--ref", layout["source"],
                    "--prompt", "make it red", "--steps", 1, "--width", width, "--height", height,
                    "--dtype", "float32", "-o", tmp_path / "x.png")
    assert result.exit_code == 0, result.output
    assert "Target Image Description:" in result.output and "refine stage uses the whole prompt" in result.output


def test_the_e1_transformer_quantizes_and_takes_an_i1_layout_lora(layout, tmp_path):
    from test_e1_lora import TARGET
    from hidream_mlx.families.i1.e1.replay import edit_transformer
    from hidream_mlx.families.i1.e1.source import E1Source
    from hidream_mlx.weights.lora import linear_targets
    model = edit_transformer(E1Source.resolve(layout["e1_1"], layout["base"]))
    out_f, in_f = linear_targets(model)[TARGET].weight.shape
    rng = np.random.default_rng(1)
    lora = tmp_path / "style.safetensors"
    import mlx.core as mx
    mx.save_safetensors(str(lora), {f"transformer.{TARGET}.lora_A.weight": mx.array(rng.normal(0, 0.3, (2, in_f))),
                                    f"transformer.{TARGET}.lora_B.weight": mx.array(rng.normal(0, 0.3, (out_f, 2)))})
    width, height = e1_1_budget()
    common = ["generate", "--model", layout["e1_1"], "--base", layout["base"], "--ref", layout["source"],
              "--prompt", "Make it blue.", "--seed", 4, "--steps", 1, "--width", width, "--height", height]
    plain, styled, quantized = (tmp_path / f"{n}.png" for n in ("plain", "styled", "q8"))
    assert invoke(*common, "--dtype", "float32", "-o", plain).exit_code == 0
    result = invoke(*common, "--dtype", "float32", "--lora", lora, "-o", styled)
    assert result.exit_code == 0, result.output
    assert not np.array_equal(pixels(plain), pixels(styled))
    assert read_metadata(styled)["loras"][0]["name"] == "style.safetensors"
    result = invoke(*common, "-q", 8, "-o", quantized)
    assert result.exit_code == 0, result.output
    meta = read_metadata(quantized)
    assert meta["quantize_bits"] == 8 and meta["dtype"] == "bfloat16"


@pytest.mark.parametrize("key, value, message", [
    ("image_guidance", "x", "image_guidance must be a finite number"),
    ("refine_strength", 2, "refine_strength must be >= 0 and <= 1 (as --refine-strength), got 2"),
    ("e1_model", "e2", "e1_model must be one of"),
    ("edited_size", "96x96", "edited_size must be a list of whole numbers"),
    ("recipe", "full", "recipe must be one of \"e1.1\", \"e1-full\""),
])
def test_a_tampered_edit_record_is_refused_naming_the_key(layout, tmp_path, key, value, message):
    from PIL import PngImagePlugin
    from hidream_mlx.images import METADATA_KEY
    out = tmp_path / "a.png"
    width, height = e1_1_budget()
    assert invoke("generate", "--model", layout["e1_1"], "--base", layout["base"], "--ref", layout["source"],
                  "--prompt", "Make it blue.", "--steps", 1, "--width", width, "--height", height,
                  "--dtype", "float32", "-o", out).exit_code == 0
    meta = {**read_metadata(out), key: value}
    info = PngImagePlugin.PngInfo()
    info.add_text(METADATA_KEY, json.dumps(meta))
    bad = tmp_path / "bad.png"
    with Image.open(out) as im:
        im.save(bad, pnginfo=info)
    for args in (("info", bad), ("generate", "--from-image", bad, "--model", layout["e1_1"], "--base",
                                 layout["base"], "-o", tmp_path / "again.png")):
        result = invoke(*args)
        assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "again.png").exists()
