"""build_e1_request: option values (the CLI's names) -> a checked edit request, before any weight
loads: the recipe of the model's kind with the official defaults, the overrides, one readable
source at a size its rule can make, and one clear error for each thing that cannot run."""

import pytest

from e1_support import user_layout
from hidream_mlx.families.i1.e1.recipes import E1_1, E1_FULL
from hidream_mlx.families.i1.e1.requests import build_e1_request
from hidream_mlx.families.i1.e1.sizes import resize_plan
from hidream_mlx.families.i1.e1.source import E1Source
from hidream_mlx.family import RequestError


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    return user_layout(tmp_path_factory.mktemp("e1"))


@pytest.fixture(scope="module")
def sources(layout):
    return {kind: E1Source.resolve(layout[kind], layout["base"]) for kind in ("e1_1", "e1_full")}


def build(source, layout, notes=None, **options):
    options = {"prompt": "Make it blue.", "refs": (str(layout["source"]),), **options}
    return build_e1_request(source, options, (notes if notes is not None else []).append)


def test_the_model_s_kind_picks_the_recipe_and_its_official_size(sources, layout):
    edit = build(sources["e1_1"], layout, seed=3)
    assert (edit.recipe.name, edit.width, edit.height, edit.seed) == (E1_1, 1024, 1024, 3)
    assert edit.recipe.official and edit.negative == edit.recipe.negative_prompt and edit.noise == "torch"
    plan = resize_plan(edit.recipe.size_rule, (160, 160), 1024, 1024)
    assert edit.size_note.startswith(f"{plan.size[0]}x{plan.size[1]} from the ") and "aspect kept" in edit.size_note
    full = build(sources["e1_full"], layout, seed=3)
    assert (full.recipe.name, full.width, full.height) == (E1_FULL, 768, 768)
    assert "exactly" in full.size_note


def test_the_overrides_reach_the_recipe_and_clear_official(sources, layout):
    edit = build(sources["e1_1"], layout, recipe="e1-full", image_guidance=2.5, refine_strength=0.0,
                 no_clip_cfg_norm=True, keep_source_size=True, steps=10, guidance=4.0, negative_prompt="grey")
    rec = edit.recipe
    assert (rec.name, rec.image_guidance, rec.refine_steps, rec.clip_cfg_norm, rec.keep_source_size) == \
        (E1_FULL, 2.5, 0, False, True)
    assert (rec.steps, rec.guidance, rec.official, edit.negative) == (10, 4.0, False, "grey")


@pytest.mark.parametrize("options,message", [
    ({"refs": ()}, "give it with --ref SOURCE"),
    ({"refs": ("a.png", "b.png")}, "one --ref"),
    ({"refine_strength": 1.5}, "--refine-strength must be between 0 and 1"),
    ({"image_guidance": -1.0}, "--image-guidance must not be negative"),
    ({"recipe": "full"}, "not a HiDream-E1 recipe"),
    ({"recipe": "e1-full", "width": 100}, "multiple of 16"),
    ({"noise": "cuda"}, "--noise cuda"),
])
def test_what_cannot_run_is_refused_in_one_line(sources, layout, options, message):
    with pytest.raises(RequestError, match=message):
        build(sources["e1_1"], layout, **options)


def test_an_unreadable_source_is_refused_before_anything_loads(sources, layout, tmp_path):
    broken = tmp_path / "x.png"
    broken.write_bytes(b"no")
    with pytest.raises(RequestError, match="not a readable image"):
        build(sources["e1_1"], layout, refs=(str(broken),))


def test_e1_full_notes_a_prompt_without_its_target_description(sources, layout):
    notes = []
    build(sources["e1_full"], layout, notes)
    assert notes and "Target Image Description:" in notes[0]
    notes.clear()
    build(sources["e1_full"], layout, notes, prompt="Editing Instruction: x. Target Image Description: y")
    assert notes == []
