"""E1Engine edits free-running from the folders users download (an I1-Full pipeline as the base,
an E1.1 folder holding transformer/, a folder holding HiDream-E1-Full.safetensors) in float32
with the recorded seed and sizes, against the official images: E1.1 (default, no refine stage,
no CFG norm clip) within one level on 99% identical values; E1-Full, whose strong guidance
amplifies float noise, within two levels on 97%."""

import dataclasses
import json

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from e1_support import assert_image_close, e1_1_budget, e1_full_size, golden, max_abs, user_layout
from hidream_mlx.families.i1.e1 import engine as engine_module
from hidream_mlx.families.i1.e1.engine import E1Engine, request_texts
from hidream_mlx.families.i1.e1.metadata import recorded_edit_settings
from hidream_mlx.families.i1.e1.sizes import resize_plan
from hidream_mlx.families.i1.text_encoding import TextEncoders
from hidream_mlx.families.i1.e1.requests import E1Request as Request, recipe_from_options
from hidream_mlx.files import sha256_file


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    return user_layout(tmp_path_factory.mktemp("e1"))


@pytest.fixture(scope="module")
def engines(layout):
    return {kind: E1Engine.load(layout[kind], base=layout["base"], dtype="float32") for kind in ("e1_1", "e1_full")}


def recorded_request(engine: E1Engine, case: dict, source, size) -> Request:
    recipe = engine.recipe().with_overrides(refine_strength=float(case["refine_strength"]),
                                            clip_cfg_norm=bool(case["clip_cfg_norm"]))
    return Request(str(case["prompt"]), size[0], size[1], int(case["seed"]), recipe, references=(str(source),))


@pytest.mark.parametrize("name", ["e1_1_sampling", "e1_1_sampling_refine0", "e1_1_sampling_no_clip_cfg_norm"])
def test_e1_1_edits_equal_the_official_images(name, engines, layout):
    case = golden(name)
    result = engines["e1_1"].run(recorded_request(engines["e1_1"], case, layout["source"], e1_1_budget()))
    assert_image_close(result.image, case["image"], levels=1, identical=0.99)
    assert result.metadata["edited_size"] == [case["image"].shape[1], case["image"].shape[0]]
    assert result.metadata["max_seq"] == int(case["max_seq"])


def test_e1_full_edit_equals_the_official_image(engines, layout):
    case = golden("e1_full_sampling")
    engine = engines["e1_full"]
    assert engine.default_recipe == "e1-full"
    result = engine.run(recorded_request(engine, case, layout["source"], e1_full_size()))
    assert_image_close(result.image, case["image"], levels=2, identical=0.97)
    assert result.metadata["target_prompt"] == str(case["target_prompt"])
    assert result.metadata["negative_prompt"] == str(case["negative_prompt"])


def test_the_metadata_records_the_source_by_name_and_sha256_and_gives_the_settings_back(engines, layout):
    engine = engines["e1_1"]
    recipe = engine.recipe().with_overrides(steps=1, image_guidance=2.0, clip_cfg_norm=False)
    request = Request("Make it blue.", *e1_1_budget(), 5, recipe, references=(str(layout["source"]),),
                      negative_prompt="grey")
    meta = engine.run(request).metadata
    assert meta["reference_files"] == [{"name": "source.png", "sha256": sha256_file(layout["source"])}]
    assert str(layout["source"].parent) not in json.dumps(meta)
    assert (meta["family"], meta["recipe"], meta["e1_model"]) == ("e1", "e1.1", "e1.1")
    assert not meta["official_recipe"]
    assert str(layout["base"]) not in json.dumps(meta)  # the base by its name and fingerprint, never its path
    assert meta["base"] == layout["base"].name and meta["base_fingerprint"].startswith("sha256:")
    settings = recorded_edit_settings(meta)
    assert settings["no_clip_cfg_norm"] is True and "clip_cfg_norm" not in settings
    again = recipe_from_options(settings["recipe"], settings)
    assert again == recipe
    assert (settings["prompt"], settings["seed"], settings["negative_prompt"]) == ("Make it blue.", 5, "grey")
    # The base by its folder's name (an image keeps no local path), the model by name and fingerprint.
    assert (settings["width"], settings["height"], settings["base"]) == (*e1_1_budget(), layout["base"].name)
    assert meta["model"] == meta["model_name"] == layout["e1_1"].name and meta["model_fingerprint"]
    assert str(layout["base"].parent) not in json.dumps(meta)


def test_keep_source_size_returns_the_edit_at_the_source_s_size(engines, tmp_path):
    source = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (100, 250, 3), dtype=np.uint8)).save(source)
    engine = engines["e1_1"]
    recipe = engine.recipe().with_overrides(steps=1)
    budget = e1_1_budget()
    edited = engine.run(Request("x", *budget, 1, recipe, references=(str(source),)))
    w, h = resize_plan(recipe.size_rule, (250, 100), *budget).size
    assert edited.image.shape == (h, w, 3) and (w, h) != (250, 100)
    kept = engine.run(Request("x", *budget, 1, dataclasses.replace(recipe, keep_source_size=True),
                              references=(str(source),)))
    assert kept.image.shape == (100, 250, 3)
    np.testing.assert_array_equal(kept.image, np.asarray(Image.fromarray(edited.image).resize((250, 100),
                                                                                            Image.BICUBIC)))


def test_several_seeds_encode_the_texts_and_the_source_once(layout, monkeypatch):
    counts = {"encode": 0}
    real_encode = TextEncoders.encode

    def encode(self, texts):
        counts["encode"] += 1
        return real_encode(self, texts)

    monkeypatch.setattr(TextEncoders, "encode", encode)
    engine = E1Engine.load(layout["e1_full"], base=layout["base"], dtype="float32")
    recipe = engine.recipe().with_overrides(steps=2)
    prompt = "Editing Instruction: x. Target Image Description: y"
    jobs = [Request(prompt, *e1_full_size(), seed, recipe, references=(str(layout["source"]),)) for seed in (1, 2, 3)]
    assert request_texts(jobs[0]) == [prompt, recipe.negative_prompt, "y"]
    engine.encode_prompts(jobs)
    images = [engine.run(job).image for job in jobs]
    assert counts["encode"] == 1  # the three texts, once, in one batch
    assert len(engine._sources) == 1  # one source at one size: one VAE encode
    assert not np.array_equal(images[0], images[1])


def test_torch_noise_is_the_cpu_generator_s_randn_of_the_seed():
    case = golden("e1_1_sampling")
    ours = engine_module.initial_noise("torch", int(case["seed"]), case["init_latents"].shape)
    assert max_abs(ours, case["init_latents"]) < 1e-6  # torch's draw, up to float rounding
    mlx_noise = engine_module.initial_noise("mlx", int(case["seed"]), case["init_latents"].shape)
    assert mlx_noise.dtype == mx.float32 and not np.array_equal(np.array(mlx_noise), case["init_latents"])


@pytest.mark.parametrize("refs,message", [((), "exactly one source image"), (("a.png", "b.png"), "got 2")])
def test_an_edit_takes_exactly_one_source(engines, refs, message):
    engine = engines["e1_1"]
    with pytest.raises(ValueError, match=message):
        engine.run(Request("x", 128, 128, 1, engine.recipe(), references=refs))


def test_e1_runs_only_in_float32_or_bfloat16(layout):
    with pytest.raises(ValueError, match="--dtype float16"):
        E1Engine.load(layout["e1_1"], base=layout["base"], dtype="float16")


def test_without_a_refine_stage_the_target_description_is_not_encoded(layout, monkeypatch):
    encoded = []
    real_encode = TextEncoders.encode
    monkeypatch.setattr(TextEncoders, "encode", lambda self, texts: (encoded.extend(texts), real_encode(self, texts))[1])
    engine = E1Engine.load(layout["e1_full"], base=layout["base"], dtype="float32")
    recipe = engine.recipe().with_overrides(steps=2, refine_strength=0.0)
    prompt = "Editing Instruction: x. Target Image Description: y"
    engine.run(Request(prompt, *e1_full_size(), 1, recipe, references=(str(layout["source"]),)))
    assert encoded == [prompt, recipe.negative_prompt]


def test_a_source_that_cannot_be_edited_fails_before_the_encoders_load(engines, tmp_path, monkeypatch):
    monkeypatch.setattr(TextEncoders, "encode", lambda self, texts: pytest.fail("the encoders ran"))
    engine = engines["e1_1"]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="not a readable image"):
        engine.encode_prompts([Request("x", *e1_1_budget(), 1, engine.recipe(), references=(str(broken),))])
    with pytest.raises(ValueError, match="exactly one source image"):
        engine.run(Request("x", *e1_1_budget(), 1, engine.recipe()))


def test_prepare_encodes_then_loads_once_and_announce_names_the_sizes(layout):
    engine = E1Engine.load(layout["e1_1"], base=layout["base"], dtype="float32")
    recipe = engine.recipe().with_overrides(steps=1, refine_strength=0.0)
    jobs = [Request("Make it blue.", *e1_1_budget(), seed, recipe, references=(str(layout["source"]),))
            for seed in (1, 2)]
    notes = []
    engine.prepare(jobs, notes.append)
    assert notes[0].startswith("prompts encoded") and "for 2 edits" in notes[-1]
    assert engine.resident_bytes() > 0
    plan = engine.edit_plan(jobs[0])
    line = engine.announce(jobs[0])
    assert f"at {plan.size[0]}x{plan.size[1]}" in line[0] and "no refine stage" in line[0]
    assert line[1].startswith("note: settings differ")
