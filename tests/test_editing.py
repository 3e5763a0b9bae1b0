"""Editing and subject-driven generation: reference images through the same generation code."""

import json
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import FIXTURES, load_case
from PIL import Image

from hidream_mlx.cli import main
from hidream_mlx.images import read_metadata

REF = str(FIXTURES / "edit_ref.png")
REF_NAME = "edit_ref.png"  # what an image records: the name, never the folder


def generate(tmp_path, *args, name="o.png"):
    out = tmp_path / name
    result = CliRunner().invoke(main, ["generate", "--model", str(FIXTURES), "--prompt", "make the sky purple",
                                       "--seed", "1", "--output", str(out), *args])
    return result, out


def test_replay_edit_forward_matches_vision_tower_and_x_pred(tmp_path):
    out = tmp_path / "edit.npz"
    result = CliRunner().invoke(main, ["replay", "--model", str(FIXTURES), "--case", str(FIXTURES / "edit_forward.npz"),
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    ref, got = load_case("edit_forward.npz"), np.load(out)
    keys = ["x_pred", "x_pred_t05", "x_pred_all_vis", "cond_image_embeds"]
    keys += [k for k in ref.files if k.startswith("cond_deepstack_")]
    for key in keys:
        assert got[key].shape == ref[key].shape, key
        np.testing.assert_allclose(got[key], ref[key], atol=1e-4, rtol=1e-4, err_msg=key)


def test_replay_flow_match_sampling_writes_every_z_and_the_image(tmp_path):
    out = tmp_path / "fm.npz"
    result = CliRunner().invoke(main, ["replay", "--model", str(FIXTURES), "--case",
                                       str(FIXTURES / "flow_match_sampling.npz"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    ref, got = load_case("flow_match_sampling.npz"), np.load(out)
    assert got["z"].shape == ref["z"].shape
    diff = np.abs(got["image"].astype(int) - ref["image"])
    assert diff.max() <= 1 and (diff == 0).mean() >= 0.99


def test_single_reference_edit_records_the_reference(tmp_path):
    result, out = generate(tmp_path, "--ref", REF, "--no-snap", "--width", "256", "--height", "288", "--recipe", "dev",
                           "--steps", "4")
    assert result.exit_code == 0, result.output
    meta = read_metadata(out)
    assert meta["references"] == [REF_NAME]
    assert meta["recipe"] == "dev-edit" and meta["recipe_settings"]["scheduler"] == "flow_match"
    assert Image.open(out).size == (256, 288)
    assert "< 2 MP" in result.output  # warned, not failed


def test_two_references_with_a_layout(tmp_path):
    layout = json.dumps([{"bbox": [0, 0.5, 0, 1], "text": "left"}, [0.5, 1, 0, 1]])
    result, out = generate(tmp_path, "--ref", REF, "--ref", REF, "--layout", layout, "--no-snap", "--width", "256",
                           "--height", "256", "--recipe", "dev", "--steps", "3")
    assert result.exit_code == 0, result.output
    meta = read_metadata(out)
    assert meta["references"] == [REF_NAME, REF_NAME] and json.loads(meta["layout"])[0]["text"] == "left"
    assert meta["recipe"] == "dev"  # several references keep the flash sampler


def test_keep_aspect_takes_the_reference_shape():
    # Only the preparation runs: sampling at ~4 MP takes half a minute even for the tiny model.
    from hidream_mlx.families.o1.engine import Engine, Request
    from hidream_mlx.families.o1.recipes import get_recipe

    engine = Engine.load(str(FIXTURES), dtype="float32")
    refs, request = engine.prepare_references(Request("x", 256, 256, 0, get_recipe("dev-edit"), references=(REF,), keep_aspect=True))
    w, h = request.width, request.height
    assert (refs.width, refs.height) == (w, h) and "aspect" in request.size_note
    ref_w, ref_h = Image.open(REF).size
    assert w % 32 == 0 and h % 32 == 0 and abs(w / h - ref_w / ref_h) < 0.05


@pytest.mark.parametrize("make_args, message", [
    (lambda p: ["--ref", str(p / "missing.png")], "image not found"),
    (lambda p: ["--ref", str(FIXTURES / "config.json")], "not a readable image"),
    (lambda p: ["--ref", REF] * 11, "at most 10 reference images"),
    (lambda p: ["--ref", REF, "--layout", "[[0, 1, 0"], "neither valid JSON"),
    (lambda p: ["--ref", REF, "--layout", "[[300, 400, 0, 250]]"], "is empty inside 256x256"),
    (lambda p: ["--ref", REF, "--layout", "boxes.json"], "neither a JSON list of boxes nor an existing file"),
    (lambda p: ["--layout", "[[0, 1, 0, 1]]"], "--layout needs at least one --ref"),
])
def test_bad_reference_input_fails_in_one_line(tmp_path, make_args, message):
    result, out = generate(tmp_path, *make_args(tmp_path), "--no-snap", "--width", "256", "--height", "256")
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_official_leniencies_run_and_say_what_was_interpreted(tmp_path):
    # Several references with --keep-aspect: snapped as usual (a note says so); pixel and negative boxes.
    result, out = generate(tmp_path, "--ref", REF, "--ref", REF, "--keep-aspect", "--no-snap", "--width", "256",
                           "--height", "256", "--recipe", "dev", "--steps", "1",
                           "--layout", "[[0, 128, 0, 256], [-0.1, 1.0, 0, 1]]")
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if line.startswith("note: ")]
    assert any("--keep-aspect needs exactly one --ref" in line for line in notes)
    assert any("layout box 0" in line and "pixels" in line for line in notes)
    assert any("layout box 1" in line and "clamped" in line for line in notes)
    assert Image.open(out).size == (256, 256) and read_metadata(out)["keep_aspect"] is False


def test_full_recipe_edits_with_cfg_over_the_same_references(tmp_path):
    result, out = generate(tmp_path, "--ref", REF, "--no-snap", "--width", "256", "--height", "256",
                           "--recipe", "full", "--steps", "3")
    assert result.exit_code == 0, result.output
    meta = read_metadata(out)
    assert meta["recipe"] == "full" and meta["guidance"] == 5.0 and meta["references"] == [REF_NAME]


def test_references_on_a_folder_converted_without_the_vision_tower_fail_before_loading(tmp_path, monkeypatch):
    from hidream_mlx.families.o1.engine import Engine
    from hidream_mlx.families.o1.convert import convert
    from hidream_mlx.quant.recipes import get_quant_recipe

    out = convert(str(FIXTURES), tmp_path / "q8", get_quant_recipe("flat"), bits=8, include_vision=False).output
    monkeypatch.setattr(Engine, "load", classmethod(lambda *a, **k: pytest.fail("weights must not load")))
    result = CliRunner().invoke(main, ["generate", "--model", str(out), "--prompt", "edit it", "--ref",
                                       str(FIXTURES / "edit_ref.png"), "--no-snap", "--width", "256", "--height",
                                       "256", "--output", str(tmp_path / "e.png")])
    assert result.exit_code == 1 and "no vision tower" in result.output
    assert not (tmp_path / "e.png").exists()


def test_keep_aspect_size_is_printed_fit_checked_rendered_and_recorded_as_one(tmp_path, monkeypatch):
    o1_family = sys.modules["hidream_mlx.families.o1.family"]  # where generate's fit check runs for O1
    checked = []
    real_check = o1_family.check_fits_folder
    monkeypatch.setattr(o1_family, "check_fits_folder",
                        lambda source, dtype_bytes, bits, w, h, *a, **k: (checked.append((w, h)),
                                                                          real_check(source, dtype_bytes, bits, w, h,
                                                                                     *a, **k))[1])
    wide = tmp_path / "wide.png"
    Image.new("RGB", (1600, 1000), (90, 120, 200)).save(wide)
    result, out = generate(tmp_path, "--ref", str(wide), "--keep-aspect", "--width", "256", "--height", "256",
                           "--recipe", "dev", "--steps", "2", "--dtype", "float32")
    assert result.exit_code == 0, result.output
    rendered = Image.open(out).size
    assert rendered[0] > rendered[1] and rendered[0] * rendered[1] <= 256 * 256 * 1.1  # 16:10, in the budget
    assert checked == [rendered]
    assert f"size {rendered[0]}x{rendered[1]}" in result.output
    meta = read_metadata(out)
    assert (meta["width"], meta["height"]) == rendered
