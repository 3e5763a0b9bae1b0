"""The shared request builder: every option checked, the same way, before any weights load."""

import dataclasses
import math
from types import SimpleNamespace

import pytest
from conftest import FIXTURES
from PIL import Image

from hidream_mlx.families.o1.references import resize_reference
from hidream_mlx.families.o1.engine import Engine, Request
from hidream_mlx.family import NonFiniteLatentError
from hidream_mlx.families.o1.recipes import get_recipe, recipe_for_model
from hidream_mlx.requests import build_request
from hidream_mlx.family import RANGES, SEED_MAX, RequestError

DEV = SimpleNamespace(name="HiDream-ai/HiDream-O1-Image-Dev", stored={})
FULL = SimpleNamespace(name="HiDream-ai/HiDream-O1-Image", stored={})
REF = FIXTURES / "edit_ref.png"


def build(model=DEV, **options):
    return build_request(model, **{"prompt": "a red fox", "seed": 7, **options})


@pytest.mark.parametrize("option", ["width", "height", "steps"])
@pytest.mark.parametrize("value", [0, -1])
def test_zero_or_negative_sizes_and_steps_are_errors_not_unset(option, value):
    with pytest.raises(RequestError, match=f"--{option} must be >= 1"):
        build(**{option: value})


@pytest.mark.parametrize("option", ["guidance", "shift", "noise_scale", "s_noise", "noise_clip"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_refused(option, value):
    model = DEV if option in ("s_noise", "noise_clip") else FULL
    with pytest.raises(RequestError, match=f"--{option.replace('_', '-')} must be a finite number"):
        build(model, **{option: value})


@pytest.mark.parametrize("option, value", [("blend_seams", -1), ("blend_seams", 17), ("guidance", -0.5),
                                           ("shift", 0.0), ("noise_scale", -2.0), ("guidance", 101.0)])
def test_numbers_outside_their_stated_range_are_refused(option, value):
    model = FULL if option == "shift" else DEV
    with pytest.raises(RequestError, match=f"must be {RANGES[option].text()}"):
        build(model, **{option: value})


def test_a_float_for_a_whole_number_option_is_refused():
    with pytest.raises(RequestError, match="--steps must be a whole number"):
        build(steps=2.5)


@pytest.mark.parametrize("seed", [-1, SEED_MAX + 1, 2**63])
def test_seeds_outside_the_stated_range_are_errors_not_wrapped(seed):
    with pytest.raises(RequestError, match=f"--seed must be >= 0 and <= {SEED_MAX}"):
        build(seed=seed, noise="mlx")


def test_the_largest_seed_runs_with_mlx_noise_and_a_missing_seed_is_drawn_in_range():
    from hidream_mlx.noise import make_noise_source

    assert make_noise_source("mlx", SEED_MAX).initial((3, 32, 32)).shape == (1, 3, 32, 32)
    drawn = build(seed=None).seed
    assert 0 <= drawn <= SEED_MAX


@pytest.mark.parametrize("model, recipe, option, users", [
    (FULL, None, "s_noise", "dev, dev-2604"),
    (FULL, None, "noise_clip", "dev, dev-2604"),
    (DEV, "dev-edit", "s_noise", "dev, dev-2604"),
    (DEV, None, "shift", "full"),
    (DEV, "dev-2604", "shift", "full"),
])
def test_options_the_recipe_ignores_are_refused_naming_the_recipes_that_use_them(model, recipe, option, users):
    with pytest.raises(RequestError, match=f"has no effect with the .* recipe.*it applies to: {users}$"):
        build(model, recipe=recipe, **{option: 1.5})


def test_flow_match_editing_of_dev_refuses_per_step_noise():
    """Dev with one reference switches to flow-match editing, which re-injects no noise."""
    with pytest.raises(RequestError, match="--s-noise has no effect with the dev-edit recipe"):
        build(refs=[str(REF)], width=2048, height=1024, s_noise=3.0)


def test_options_the_recipe_uses_are_applied():
    request = build(FULL, steps=3, guidance=2.0, shift=2.5)
    assert (request.recipe.steps, request.recipe.guidance, request.recipe.shift) == (3, 2.0, 2.5)
    assert not request.recipe.official
    assert build(DEV, s_noise=2.0).recipe.s_noise == 2.0


@pytest.mark.parametrize("token", ["<|im_end|>", "<|vision_start|>", "<|tms_token|>", "<|image_pad|>"])
def test_prompts_holding_special_token_strings_are_refused(token):
    with pytest.raises(RequestError, match="special-token string"):
        build(prompt=f"a fox {token} on snow")


def test_ordinary_angle_brackets_and_pipes_are_fine():
    assert build(prompt="a | b <c> d").prompt == "a | b <c> d"


def test_keep_aspect_fits_the_reference_into_the_requested_pixel_budget():
    ref = Image.open(REF)
    request = build(refs=[str(REF)], keep_aspect=True, width=256, height=256)
    expected = resize_reference(ref.convert("RGB"), 256).size
    assert (request.width, request.height) == expected
    assert request.width * request.height <= 256 * 256
    assert request.size_note.startswith(f"{expected[0]}x{expected[1]} ")
    assert request.keep_aspect_budget == 256
    assert request.metadata()["width"] == expected[0]
    default = build(refs=[str(REF)], keep_aspect=True)
    assert default.keep_aspect_budget == 2048
    assert (default.width, default.height) == resize_reference(ref.convert("RGB"), 2048).size


def test_keep_aspect_with_a_layout_is_refused_with_the_reason():
    with pytest.raises(RequestError, match="--layout cannot be combined with --keep-aspect"):
        build(refs=[str(REF)], keep_aspect=True, layout="[[0, 0.5, 0, 0.5]]")


def test_keep_aspect_with_several_references_is_noted_and_the_size_snaps_as_officially():
    lines = []
    request = build(refs=[str(REF), str(REF)], keep_aspect=True, width=1024, height=1024,
                    layout="[[0, 0.5, 0, 1], [0.5, 1, 0, 1]]", note=lines.append)
    plain = build(refs=[str(REF), str(REF)], width=1024, height=1024, layout="[[0, 0.5, 0, 1], [0.5, 1, 0, 1]]")
    assert (request.width, request.height) == (plain.width, plain.height) == (2048, 2048)
    assert not request.keep_aspect and request.layout == plain.layout  # the layout is honoured, as officially
    assert "keep_aspect_budget" not in request.metadata()
    assert any(line.startswith("note: --keep-aspect needs exactly one --ref") and "2 references" in line
               for line in lines)


def test_layout_leniencies_are_printed_as_notes():
    lines = []
    request = build(refs=[str(REF)], width=1024, height=1024, layout="[[0, 512, 0, 1024], [-0.1, 0.5, 0, 1]]",
                    note=lines.append)
    assert request.layout == "[[0, 512, 0, 1024], [-0.1, 0.5, 0, 1]]"  # stored as given, read the same again
    notes = [line for line in lines if line.startswith("note: layout box")]
    assert len(notes) == 2 and "pixels" in notes[0] and "clamped" in notes[1]


def test_an_empty_layout_list_is_kept_and_an_empty_value_means_no_layout():
    lines = []
    assert build(refs=[str(REF)], layout="[]", note=lines.append).layout == "[]"
    assert any("no boxes" in line for line in lines)
    lines.clear()
    assert build(refs=[str(REF)], layout="", note=lines.append).layout is None
    assert any(line.startswith("note: --layout is empty") for line in lines)


def test_reference_only_options_need_a_reference():
    with pytest.raises(RequestError, match="--keep-aspect needs at least one --ref"):
        build(keep_aspect=True)


def test_small_edits_warn_through_the_note_callback():
    lines = []
    build(refs=[str(REF)], width=1024, height=1024, no_snap=True, note=lines.append)
    assert len(lines) == 1 and "(< 2 MP)" in lines[0]


def test_presets_keep_their_free_size_and_an_explicit_size_snaps():
    quick = build(preset="quick")
    assert (quick.width, quick.height) == (1024, 1024) and quick.recipe.steps == 14
    snapped = build(preset="quick", width=1024, height=1024)
    assert (snapped.width, snapped.height) == (2048, 2048)


@pytest.mark.parametrize("name, recipe", [
    ("HiDream-ai/HiDream-O1-Image-Dev", "dev"),
    ("/models/HiDream-O1-Image-Dev/", "dev"),
    ("/models/hidream_o1_image_dev", "dev"),
    ("hidream_o1_image_dev_bf16.safetensors", "dev"),
    ("HiDream-ai/HiDream-O1-Image-Dev-2604", "dev-2604"),
    ("/m/HiDream-O1-Image-Dev2604", "dev-2604"),
    ("/m/hidream_o1_dev_2604_q4", "dev-2604"),
    ("/home/ml-dev/SomeModel", "full"),
    ("/home/x/HiDream-O1-Image", "full"),
    ("/home/x/devices", "full"),
    ("/home/x/HiDream-O1-Image-Devil", "full"),
])
def test_recipe_detection_reads_the_models_own_name_only(name, recipe):
    assert recipe_for_model(name) == recipe


def test_stored_metadata_decides_before_the_name():
    assert recipe_for_model("/m/ml-dev/anything", {"recipe": "dev-2604"}) == "dev-2604"
    assert recipe_for_model("/m/q4", {"variant": "HiDream-ai/HiDream-O1-Image-Dev"}) == "dev"


def test_a_latent_that_turns_non_finite_stops_the_run_naming_the_step(tiny_model):
    # Built past the request checks on purpose: the sampler's own guard is under test.
    recipe = dataclasses.replace(get_recipe("dev"), steps=2, noise_scale=math.nan)
    request = Request("a fox", 64, 64, 1, recipe)
    with pytest.raises(NonFiniteLatentError, match=r"non-finite \(NaN or inf\) at step 1 of 2"):
        Engine(tiny_model).run(request)


def test_quantize_takes_plan_with_recipe_as_its_old_alias():
    from click.testing import CliRunner

    from hidream_mlx.cli import main

    for spelling in ("--plan", "--recipe"):
        result = CliRunner().invoke(main, ["quantize", "--model", str(FIXTURES), spelling, "no-such-plan", "-o", "x"])
        assert result.exit_code == 2 and "'no-such-plan' is not one of" in result.output
    assert "--plan, --recipe" in CliRunner().invoke(main, ["quantize", "--help"]).output
