"""Rules that were once untested (mutation testing changed them and no test noticed): each is pinned here."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import FIXTURES, load_case

from hidream_mlx.harness import peak_rss
from hidream_mlx.noise import MlxNoise
from hidream_mlx.prompt import UNCOND_PROMPT, Tokenizer, encode_prompt
from hidream_mlx.recipes import PRESETS, apply_preset, get_recipe
from hidream_mlx.seams import blend_seams


def test_the_unconditional_prompt_is_a_single_space_as_the_official_pipeline_uses():
    assert UNCOND_PROMPT == " "
    ids = encode_prompt(Tokenizer(FIXTURES), UNCOND_PROMPT)
    np.testing.assert_array_equal(ids, load_case("full_sampling.npz")["input_ids_uncond"][0])


@pytest.mark.parametrize("name,size,full,distilled", [
    ("quick", (1024, 1024), (24, 1.0), 14),
    ("standard", (1536, 1536), (32, 4.0), 28),
    ("high", (2048, 2048), (50, 5.0), 28),
    ("official", None, (50, 5.0), 28),
])
def test_presets_set_these_sizes_steps_and_guidance(name, size, full, distilled):
    preset = PRESETS[name]
    assert preset.size == size
    on_full = apply_preset(get_recipe("full"), preset)
    assert (on_full.steps, on_full.guidance) == full
    on_dev = apply_preset(get_recipe("dev"), preset)
    assert on_dev.steps == distilled and on_dev.guidance == get_recipe("dev").guidance


def test_seam_blend_mixes_half_of_the_band_mean_into_a_band_of_radius_px_each_side():
    image = np.zeros((64, 64, 3), np.uint8)
    image[:, 32:] = 100
    out = blend_seams(image, 2).astype(int)
    # Columns 30..33 form the band (2R = 4 px); its mean is 50, mixed in at strength 0.5.
    np.testing.assert_array_equal(out[0, 28:36, 0], [0, 0, 25, 25, 75, 75, 100, 100])
    assert (out[:, :, 0] == out[:1, :, 0]).all()  # rows are untouched: no horizontal seam has a step


def test_seam_blend_strength_scales_the_mix():
    image = np.zeros((32, 64, 3), np.uint8)
    image[:, 32:] = 200
    out = blend_seams(image, 1, strength=1.0).astype(int)
    np.testing.assert_array_equal(out[0, 30:34, 0], [0, 100, 100, 200])


def test_peak_rss_takes_the_kernel_high_water_mark_only_when_it_was_reset(monkeypatch):
    huge = 1 << 50
    monkeypatch.setattr(peak_rss, "ru_maxrss_bytes", lambda: huge)
    monkeypatch.setattr(peak_rss, "reset_high_water", lambda: True)
    rss = peak_rss.PeakRss()
    with rss.measure():
        pass
    assert rss.exact and rss.peak == huge and rss.process_max == huge
    monkeypatch.setattr(peak_rss, "reset_high_water", lambda: False)
    with rss.measure():
        pass
    assert not rss.exact and rss.peak < huge and rss.process_max == huge


def test_rms_norm_epsilons_come_from_the_config_for_every_layer_and_the_final_norm(tiny_model):
    eps = tiny_model.config.text.rms_norm_eps
    assert eps == json.loads((FIXTURES / "config.json").read_text())["text_config"]["rms_norm_eps"]
    norms = [(path, m) for path, m in tiny_model.named_modules() if isinstance(m, nn.RMSNorm)]
    assert any(path == "language_model.norm" for path, _ in norms)
    assert len(norms) >= 4 * len(tiny_model.language_model.layers) + 1
    assert all(m.eps == eps for _, m in norms), {p: m.eps for p, m in norms if m.eps != eps}


def test_mlx_noise_derives_its_keys_from_seed_plus_one():
    initial_key, step_key = mx.random.split(mx.random.key(11))
    noise = MlxNoise(10)
    np.testing.assert_array_equal(np.array(noise.initial((3, 4, 4))),
                                  np.array(mx.random.normal((1, 3, 4, 4), key=initial_key)))
    step_key, first = mx.random.split(step_key)
    np.testing.assert_array_equal(np.array(noise.step((2, 8))), np.array(mx.random.normal((2, 8), key=first)))


@pytest.mark.parametrize("recipe,refs,scheduler,expected", [
    ("dev", 1, "flow_match", "dev-edit"),
    ("dev-2604", 1, "flow_match", "dev-edit"),  # the update_2604 pipeline edits the same way
    ("dev", 1, "flash", "dev"),
    ("dev-2604", 1, "flash", "dev-2604"),
    ("dev", 2, "flow_match", "dev"),  # several references: subject-driven, flash
    ("full", 1, "flow_match", "full"),
])
def test_one_reference_on_a_dev_model_switches_to_the_editing_scheduler(recipe, refs, scheduler, expected):
    from hidream_mlx.recipes import recipe_for_references

    assert recipe_for_references(recipe, refs, scheduler) == expected


def test_the_flash_editing_scheduler_is_refused_where_it_means_nothing():
    from click.testing import CliRunner

    from hidream_mlx.cli import main

    result = CliRunner().invoke(main, ["generate", "--model", str(FIXTURES), "--prompt", "a fox", "--recipe", "full",
                                       "--editing-scheduler", "flash", "--no-snap", "--width", "256", "--height", "256"])
    assert result.exit_code == 1 and "only applies to a Dev recipe" in result.output
