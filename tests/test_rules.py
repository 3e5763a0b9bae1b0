"""Rules that were once untested (mutation testing changed them and no test noticed): each is pinned here."""

import ast
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import FIXTURES, load_case
from huggingface_hub import constants

from PIL import Image

from hidream_mlx.families.o1 import engine as generation
from hidream_mlx.cli import main
from hidream_mlx.families.o1.engine import Engine, Request
from hidream_mlx import memory as peak_rss
from hidream_mlx.families.o1.config import BOI_TOKEN_ID, TMS_TOKEN_ID
from hidream_mlx.families.o1.synthetic import random_model, synthetic_config, synthetic_prompt_ids
from hidream_mlx.families.o1.transformer import HiDreamO1
from hidream_mlx.noise import MlxNoise
from hidream_mlx.families.o1.sampling import encode_synthetic
from hidream_mlx.families.o1.prompt import UNCOND_PROMPT, Tokenizer, encode_prompt
from hidream_mlx.families.o1.recipes import PRESETS, apply_preset, get_preset, get_recipe
from hidream_mlx.requests import build_request
from hidream_mlx.families.o1.requests import check_references
from hidream_mlx.families.o1.seams import blend_seams


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


def test_seam_blend_treats_every_seam_of_both_axes_with_the_band_mean():
    image = np.zeros((96, 96, 3), np.uint8)
    image[:, 32], image[:, 33], image[:, 64] = 100, 40, 100
    out = blend_seams(image, 2).astype(int)
    # Seam 32: band 0, 0, 100, 40 has mean 35 (its median would be 20); half of it mixed in.
    np.testing.assert_array_equal(out[0, 30:34, 0], [18, 18, 68, 38])
    # Seam 64: band 0, 0, 100, 0, mean 25 (round half to even: 12.5 -> 12, 62.5 -> 62).
    np.testing.assert_array_equal(out[0, 62:66, 0], [12, 12, 62, 12])
    flipped = blend_seams(np.ascontiguousarray(image.transpose(1, 0, 2)), 2)
    np.testing.assert_array_equal(flipped, out.astype(np.uint8).transpose(1, 0, 2))  # rows the same as columns


def test_generate_blend_seams_is_the_half_strength_blend_of_the_plain_image():
    engine = Engine.load(str(FIXTURES), dtype="float32")
    plain = Request("a fox", 256, 256, 3, get_recipe("dev").with_overrides(steps=2))
    blended = dataclasses.replace(plain, blend_seams=4)
    np.testing.assert_array_equal(np.asarray(engine.run(blended).image),
                                  blend_seams(np.asarray(engine.run(plain).image), 4, strength=0.5))


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
    step_key, second = mx.random.split(step_key)  # every step splits the step key again: no repeats
    np.testing.assert_array_equal(np.array(noise.step((2, 8))), np.array(mx.random.normal((2, 8), key=second)))


@pytest.mark.parametrize("recipe,refs,scheduler,expected", [
    ("dev", 1, "flow_match", "dev-edit"),
    ("dev-2604", 1, "flow_match", "dev-edit"),  # the update_2604 pipeline edits the same way
    ("dev", 1, "flash", "dev"),
    ("dev-2604", 1, "flash", "dev-2604"),
    ("dev", 2, "flow_match", "dev"),  # several references: subject-driven, flash
    ("full", 1, "flow_match", "full"),
])
def test_one_reference_on_a_dev_model_switches_to_the_editing_scheduler(recipe, refs, scheduler, expected):
    from hidream_mlx.families.o1.recipes import recipe_for_references

    assert recipe_for_references(recipe, refs, scheduler) == expected


def test_the_flash_editing_scheduler_is_refused_where_it_means_nothing():
    from click.testing import CliRunner

    from hidream_mlx.cli import main

    result = CliRunner().invoke(main, ["generate", "--model", str(FIXTURES), "--prompt", "a fox", "--recipe", "full",
                                       "--editing-scheduler", "flash", "--no-snap", "--width", "256", "--height", "256"])
    assert result.exit_code == 1 and "only applies to a Dev recipe" in result.output


# --- the unconditional prompt as the engine sends it ---------------------------------------------

def test_the_engine_encodes_a_single_space_as_the_unconditional_prompt(monkeypatch):
    engine = Engine.load(str(FIXTURES), dtype="float32")
    seen = []
    monkeypatch.setattr(generation, "encode", lambda *args: seen.append(args[-1]))
    engine.encode(Request("a fox", 256, 256, 0, get_recipe("full")))
    engine.encode(Request("a fox", 256, 256, 0, get_recipe("full"), negative_prompt="blurry"))
    assert seen == [" ", "blurry"]


# --- a model's name decides its recipe, and each recipe has the released settings --------------

@pytest.mark.parametrize("name, recipe, settings", [
    ("HiDream-ai/HiDream-O1-Image", "full",
     dict(scheduler="unipc", steps=50, shift=3.0, guidance=5.0, noise_scale=8.0, s_noise=0.0, noise_clip=0.0)),
    ("HiDream-ai/HiDream-O1-Image-Dev", "dev",
     dict(scheduler="flash", steps=28, guidance=0.0, noise_scale=7.5, s_noise=7.5, noise_clip=2.5)),
    ("HiDream-ai/HiDream-O1-Image-Dev-2604", "dev-2604",
     dict(scheduler="flash", steps=28, guidance=0.0, noise_scale=8.0, s_noise=8.0, noise_clip=8.0)),
])
def test_each_official_model_name_gets_its_released_recipe(name, recipe, settings):
    request = build_request(SimpleNamespace(name=name, stored={}), prompt="a fox", seed=1)
    assert request.recipe.name == recipe and request.recipe.official
    assert {k: getattr(request.recipe, k) for k in settings} == settings


# --- presets: lookup and what they change ---------------------------------------------------------

def test_presets_are_looked_up_by_name_and_an_unknown_one_lists_the_choices():
    assert all(get_preset(name) is PRESETS[name] for name in ("quick", "standard", "high", "official"))
    with pytest.raises(ValueError, match="unknown preset 'fast'; choose one of quick, standard, high, official"):
        get_preset("fast")


def test_a_preset_reaches_the_request_with_its_free_size_and_effort():
    full = SimpleNamespace(name="HiDream-ai/HiDream-O1-Image", stored={})
    quick = build_request(full, prompt="a fox", seed=1, preset="quick")
    assert (quick.width, quick.height, quick.recipe.steps, quick.recipe.guidance) == (1024, 1024, 24, 1.0)
    assert not quick.recipe.official and not quick.recipe.uses_cfg
    standard = build_request(full, prompt="a fox", seed=1, preset="standard", steps=40)
    assert (standard.width, standard.recipe.steps, standard.recipe.guidance) == (1536, 40, 4.0)  # a flag wins


# --- the --keep-aspect size -----------------------------------------------------------------------

@pytest.mark.parametrize("width, height, expected", [
    (None, None, (2560, 1600)),  # the official 2048^2 budget: what the official pipeline renders
    (1024, 1024, (1280, 800)),
    (256, 256, (320, 192)),
    (1024, 512, (896, 544)),  # a non-square budget counts by its area: isqrt(1024*512) = 724
])
def test_keep_aspect_fits_a_16_by_10_reference_into_the_pixel_budget(tmp_path, width, height, expected):
    ref = tmp_path / "wide.png"
    Image.new("RGB", (1600, 1000), (90, 120, 200)).save(ref)
    request = build_request(SimpleNamespace(name="HiDream-ai/HiDream-O1-Image-Dev", stored={}), prompt="x", seed=1,
                            refs=[str(ref)], keep_aspect=True, width=width, height=height)
    assert (request.width, request.height) == expected
    assert request.size_note.startswith(f"{expected[0]}x{expected[1]} ")


# --- the editing warning below 2 MP --------------------------------------------------------------

@pytest.mark.parametrize("width, height, warns", [
    (2000, 1000, False),  # exactly 2,000,000 pixels: no warning
    (1999, 1000, True),
    (1414, 1414, True),  # 1,999,396
    (1415, 1414, False),  # 2,000,810
])
def test_editing_warns_below_two_million_pixels_exactly(width, height, warns):
    lines = []
    check_references([str(FIXTURES / "edit_ref.png")], None, False, width, height, lines.append)
    assert any("(< 2 MP)" in line for line in lines) == warns


# --- peak RSS: the sampled spike and the kernel high-water mark, merged by max ---------------------

def test_peak_rss_keeps_a_sampled_spike_above_a_lower_kernel_mark(monkeypatch):
    monkeypatch.setattr(peak_rss, "ru_maxrss_bytes", lambda: 1)
    monkeypatch.setattr(peak_rss, "reset_high_water", lambda: True)
    readings, calls = iter([100, 500] + [200] * 10**6), []  # at the start, a spike, then steady

    class Process:
        def memory_info(self):
            calls.append(None)
            return SimpleNamespace(rss=next(readings))

    rss = peak_rss.PeakRss(interval=0.001)
    rss.process = Process()
    with rss.measure():
        while len(calls) < 3:  # the start reading and two samples
            time.sleep(0.001)
    assert rss.exact and rss.process_max == 1
    assert rss.peak == 500  # neither the kernel's 1 nor the final 200


# --- RMSNorm epsilons: every layer's and the final norm's follow the config ----------------------

def test_every_rms_norm_takes_the_configs_epsilon_not_a_constant():
    config = synthetic_config("tiny", layers=2)
    config = config.replace(text=dataclasses.replace(config.text, rms_norm_eps=3e-3))
    model = HiDreamO1(config)
    norms = {path: m.eps for path, m in model.named_modules() if isinstance(m, nn.RMSNorm)}
    expected = {"language_model.norm"} | {f"language_model.layers.{i}.{n}" for i in range(2) for n in (
        "input_layernorm", "post_attention_layernorm", "self_attn.q_norm", "self_attn.k_norm")}
    assert expected <= set(norms)
    assert all(eps == 3e-3 for eps in norms.values()), norms


# --- synthetic prompt encoding (random-weight models, no tokenizer) ------------------------------

def test_synthetic_prompt_ids_are_ordinary_ids_ending_with_boi_and_tms():
    ids = synthetic_prompt_ids(20)
    assert len(ids) == 20 and ids[-2:].tolist() == [BOI_TOKEN_ID, TMS_TOKEN_ID]
    assert 1000 <= ids[:-2].min() and ids[:-2].max() < 150000
    np.testing.assert_array_equal(ids, synthetic_prompt_ids(20))  # deterministic per seed
    assert not np.array_equal(ids, synthetic_prompt_ids(20, seed=1))


def test_synthetic_encoding_sizes_the_prompt_by_its_words_and_the_uncond_like_the_real_one():
    model = random_model("tiny", layers=1)
    words = "a red fox in a snowy forest at dawn"  # 9 words: the template's 14 tokens + 9 * 4 // 3
    with_cfg = encode_synthetic(model, words, 64, 64, guidance=5.0)
    assert with_cfg.cond.cache.length == 14 + 12 - 1  # the prefix is every token but tms
    real_uncond = load_case("full_sampling.npz")["input_ids_uncond"].shape[1]
    assert with_cfg.uncond.cache.length == real_uncond - 1  # as long as the real encoded " "
    assert with_cfg.cond.positions.shape[1] == 1 + (64 // 32) ** 2  # tms and the patches
    assert encode_synthetic(model, words, 64, 64, guidance=1.0).uncond is None


# --- run-time dependencies ---------------------------------------------------------------------

def test_generation_and_conversion_run_without_the_safetensors_package(tmp_path):
    """safetensors is a dev-only dependency (tests write fixtures with it): nothing at run time imports it."""
    script = (
        "import sys\n"
        "sys.modules['safetensors'] = None  # any import of it now fails\n"
        "from hidream_mlx.cli import main\n"
        f"args = ['--model', {str(FIXTURES)!r}]\n"
        f"main(['quantize', *args, '--bits', '8', '-o', {str(tmp_path / 'q8')!r}], standalone_mode=False)\n"
        f"main(['generate', '--model', {str(tmp_path / 'q8')!r}, '--prompt', 'a fox', '--no-snap', '--width', '256',"
        f" '--height', '256', '--steps', '1', '--ref', {str(FIXTURES / 'edit_ref.png')!r},"
        f" '-o', {str(tmp_path / 'o.png')!r}], standalone_mode=False)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "o.png").is_file()


# --- README commands that depend on where they run -------------------------------------------------


@pytest.mark.parametrize("how", ["module from the repository root", "module from elsewhere",
                                 "script path from elsewhere"])
def test_the_quantize_convert_shim_runs_as_the_readme_says(tmp_path, how):
    repo = Path(__file__).resolve().parents[1]
    if how == "module from the repository root":
        command, cwd = [sys.executable, "-m", "quantize.convert"], repo
    elif how == "module from elsewhere":  # the package is installed with hidream_mlx
        command, cwd = [sys.executable, "-m", "quantize.convert"], tmp_path
    else:
        command, cwd = [sys.executable, str(repo / "quantize" / "convert.py")], tmp_path
    out = tmp_path / "q8"
    done = subprocess.run([*command, "--model", str(FIXTURES), "--bits", "8", "-o", str(out)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 8


def test_info_with_a_repo_id_reads_only_the_local_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))  # even where it is cached
    result = CliRunner().invoke(main, ["info", "--model", "HiDream-ai/HiDream-O1-Image-Dev"])
    assert result.exit_code == 1
    assert "not in the local Hugging Face cache and downloads are off" in result.output


# --- code rules ------------------------------------------------------------------------------------


def function_local_imports(path: Path) -> list[tuple[int, str]]:
    """(line, source text) of every import inside a function body of ``path``."""
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    found.add((inner.lineno, " ".join(lines[inner.lineno - 1:inner.end_lineno])))
    return sorted(found)


def test_function_local_import_detection_sees_nested_and_multi_line_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import os\n\ndef f():\n    def g():\n        from json import (\n            dumps,  # lazy: x\n"
                      "        )\n    import sys\n")
    assert [line for line, _ in function_local_imports(module)] == [5, 8]
    assert ["# lazy:" in text for _, text in function_local_imports(module)] == [True, False]


def test_every_function_local_import_says_why_it_is_lazy():
    """Imports go at the top of a module; one that must wait (an import cycle, an optional extra)
    says why on its line: ``# lazy: <why>``."""
    repo = Path(__file__).resolve().parents[1]
    files = [*(repo / "hidream_mlx").rglob("*.py"), *(repo / "quantize").rglob("*.py"), repo / "generate_hidream_mlx.py"]
    unmarked = [f"{path.relative_to(repo)}:{line}: {text.strip()}" for path in sorted(files) if path.is_file()
                for line, text in function_local_imports(path) if "# lazy:" not in text]
    assert unmarked == []
