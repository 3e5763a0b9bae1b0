"""The HiDream-E1 editing sampler against the recorded official runs: the text rows of each stage,
the schedule from the base's scheduler config, the editing input, both 3-way guidance forms and
the refine stage's 2-way guidance (exact formulas on the recorded outputs), and the UniPC steps."""

import json

import mlx.core as mx
import numpy as np
import pytest

from e1_support import SAMPLING_CASES, golden, max_abs
from hidream_mlx.families.i1.e1.recipes import E1_1, E1_FULL, get_e1_recipe, target_prompt
from hidream_mlx.families.i1.e1.sampling import edit_model_input, edit_texts, guide_edit, guide_refine, image_rows
from hidream_mlx.families.i1.e1.source import EditScheduler
from hidream_mlx.schedulers import UniPCSampler, unipc_flow_sigmas_schedule


def case_recipe(case: dict):
    kind = E1_FULL if str(case["script"]) == "inference.py" else E1_1
    return get_e1_recipe(kind).with_overrides(
        steps=int(case["num_inference_steps"]), guidance=float(case["guidance_scale"]),
        image_guidance=float(case["image_guidance_scale"]), refine_strength=float(case["refine_strength"]),
        clip_cfg_norm=bool(case["clip_cfg_norm"]))


def test_the_official_defaults_are_the_recipes():
    e1_1, full = get_e1_recipe(E1_1), get_e1_recipe(E1_FULL)
    assert (e1_1.guidance, e1_1.image_guidance, e1_1.negative_prompt) == (3.0, 1.5, "low quality, blurry, distorted")
    assert (full.guidance, full.image_guidance, full.negative_prompt) == (5.0, 4.0, "low resolution, blur")
    for recipe in (e1_1, full):
        assert (recipe.steps, recipe.refine_strength, recipe.clip_cfg_norm, recipe.official) == (28, 0.3, True, True)
    assert (e1_1.width, e1_1.height, full.width, full.height) == (1024, 1024, 768, 768)


def test_the_refine_stage_starts_at_int_steps_times_one_minus_strength():
    recipe = get_e1_recipe(E1_1)
    assert recipe.refine_start == 19 and recipe.refine_steps == 9  # 28 * 0.7 = 19.599999999999998
    assert recipe.with_overrides(refine_strength=0.0).refine_steps == 0
    assert recipe.with_overrides(refine_strength=1.0).refine_start == 0
    for name in SAMPLING_CASES:
        case = golden(name)
        start = case_recipe(case).refine_start
        assert (start if start < case_recipe(case).steps else -1) == int(case["refine_start_step"])


@pytest.mark.parametrize("overrides,message", [
    ({"refine_strength": 1.5}, "between 0 and 1"), ({"refine_strength": -0.1}, "between 0 and 1"),
    ({"image_guidance": -1.0}, "must not be negative"), ({"steps": 0}, "positive integer"),
])
def test_overrides_out_of_range_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        get_e1_recipe(E1_1).with_overrides(**overrides)


def test_any_override_of_a_released_value_clears_official_and_keep_source_size_does_not():
    recipe = get_e1_recipe(E1_1)
    assert not recipe.with_overrides(image_guidance=2.0).official
    assert recipe.with_overrides(guidance=3.0).official
    assert recipe.with_overrides(keep_source_size=True).official


def test_the_target_description_is_what_follows_the_marker_as_split_takes_it():
    assert target_prompt("Editing Instruction: x. Target Image Description: a cat.") == "a cat."
    assert target_prompt("Make the apples green.") == "Make the apples green."
    assert target_prompt("A Target Image Description: b Target Image Description: c") == "b"
    for name in ("e1_1", "e1_full"):
        text = golden("edit_encoding")
        expected = str(text[f"{name}.target_prompt"]) or str(text[f"{name}.prompt"])
        assert target_prompt(str(text[f"{name}.prompt"])) == expected


def test_stage_rows_are_pos_neg_pos_with_the_clip_neg_neg_pos_without_and_neg_target_for_refine():
    prompt = "Editing Instruction: x. Target Image Description: t"
    recipe = get_e1_recipe(E1_FULL)
    assert edit_texts(prompt, "n", recipe) == ([prompt, "n", prompt], ["n", "t"])
    assert edit_texts(prompt, "n", recipe.with_overrides(clip_cfg_norm=False)) == (["n", "n", prompt], ["n", "t"])
    assert edit_texts(prompt, "n", recipe.with_overrides(guidance=1.0)) == ([prompt], ["t"])
    orders = golden("edit_encoding")
    roles = {prompt: "pos", "n": "neg", "t": "target"}
    assert [roles[t] for t in edit_texts(prompt, "n", recipe)[0]] == list(orders["e1_full.cfg3_clip_cfg_norm.order"])
    assert [roles[t] for t in edit_texts(prompt, "n", recipe)[1]] == list(orders["e1_full.refine_cfg2.order"])


@pytest.mark.parametrize("name", SAMPLING_CASES)
def test_the_schedule_from_the_recorded_scheduler_config_is_the_pipeline_s(name):
    case = golden(name)
    config = json.loads(str(case["scheduler_config"]))
    schedule = EditScheduler.from_config(config, name).schedule(int(case["num_inference_steps"]))
    np.testing.assert_array_equal(schedule.timesteps, case["timesteps"])
    np.testing.assert_array_equal(schedule.timesteps, case["model_timesteps"])
    np.testing.assert_array_equal(schedule.sigmas, case["sigmas"])


def test_the_flow_sigma_schedule_shifts_once_and_starts_just_below_one():
    schedule = unipc_flow_sigmas_schedule(28, 3.0)
    s = np.linspace(1, 1 / 1000, 29)[:-1]
    expected = 3 * s / (1 + 2 * s)
    expected[0] -= 1e-6
    np.testing.assert_array_equal(schedule.sigmas[:-1], expected.astype(np.float32))
    assert schedule.sigmas[-1] == 0 and schedule.timesteps[0] == 999 and schedule.timesteps.dtype == np.int64


@pytest.mark.parametrize("name", SAMPLING_CASES)
def test_the_first_editing_input_is_the_noise_beside_zeros_image_image_along_the_width(name):
    case = golden(name)
    rows = image_rows(mx.array(case["image_latents"]), case_recipe(case).uses_cfg)
    ours = edit_model_input(mx.array(case["init_latents"]), rows, rows.shape[0])
    np.testing.assert_array_equal(np.array(ours), case["edit.model_input_step0"])


@pytest.mark.parametrize("name", SAMPLING_CASES)
def test_guidance_of_the_recorded_outputs_is_the_recorded_scheduler_input(name):
    case = golden(name)
    recipe = case_recipe(case)
    start = recipe.refine_start
    for i in range(recipe.steps):
        if i < start:
            guided = guide_edit(-mx.array(case["edit.model_output_left"][i]), recipe)
        else:
            guided = guide_refine(-mx.array(case["refine.model_output"][i - start]), recipe)
        assert max_abs(guided, case["guided"][i]) <= 1e-5, i


def test_the_two_edit_guidance_forms_differ_as_written():
    recipe = get_e1_recipe(E1_1)
    pred = mx.array(np.random.default_rng(0).normal(size=(3, 4, 2, 2)).astype(np.float32))
    u, ic, fc = (np.array(p) for p in mx.split(pred, 3, axis=0))
    plain = u + 1.5 * (ic - u) + 3.0 * (fc - ic)
    np.testing.assert_allclose(np.array(guide_edit(pred, recipe.with_overrides(clip_cfg_norm=False))), plain, rtol=1e-5)
    text = ic + 3.0 * (fc - ic)
    scale = np.clip(np.linalg.norm(fc, axis=1, keepdims=True) / (np.linalg.norm(text, axis=1, keepdims=True) + 1e-8),
                    0, 1)
    np.testing.assert_allclose(np.array(guide_edit(pred, recipe)), u + 1.5 * (text * scale - u), rtol=1e-5)


@pytest.mark.parametrize("name", SAMPLING_CASES)
def test_unipc_steps_on_the_recorded_inputs_land_on_the_recorded_latents(name):
    case = golden(name)
    schedule = EditScheduler.from_config(json.loads(str(case["scheduler_config"])), name).schedule(len(case["guided"]))
    sampler = UniPCSampler(schedule)
    state = sampler.start()
    for i in range(len(schedule)):
        x = case["init_latents"] if i == 0 else case["latents"][i - 1]
        out = sampler.step(state, i, mx.array(x), mx.array(case["guided"][i]))
        assert max_abs(out, case["latents"][i]) < 1e-5, i
