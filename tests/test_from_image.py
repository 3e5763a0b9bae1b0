"""Images that carry their recipe: --from-image re-renders, `info IMAGE`, JPEG/WebP metadata."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import FIXTURES
from PIL import Image

from hidream_mlx.cli import main
from hidream_mlx.images import read_metadata
from hidream_mlx.files import sha256_file
from hidream_mlx.workflow.reproduce import check_model, find_references, merge_settings, recorded_settings
from hidream_mlx.family import RequestError

BASE = ["generate", "--model", str(FIXTURES), "--no-snap", "--width", "256", "--height", "256",
        "--steps", "3", "--dtype", "float32", "--prompt", "a red fox"]
# A local model is recorded by its folder's name only (no path), so a re-run names the folder again.
FROM = ["generate", "--model", str(FIXTURES), "--from-image"]
# Keys that legitimately differ between a run and its re-run with other steps.
STEP_KEYS = {"steps", "official_recipe"}


def invoke(*args):
    return CliRunner().invoke(main, list(args))


def pixels(path):
    return np.array(Image.open(path))


@pytest.fixture(scope="module")
def keeper(tmp_path_factory):
    out = tmp_path_factory.mktemp("keeper") / "out_1.png"
    result = invoke(*BASE, "--seed", "1", "-o", str(out))
    assert result.exit_code == 0, result.output
    return out


def test_metadata_holds_what_a_rerun_needs(keeper):
    meta = read_metadata(keeper)
    for key in ("prompt", "seed", "recipe", "steps", "guidance", "width", "height", "recipe_settings", "noise",
                "dtype", "quantization", "tool_version", "model", "model_name", "model_fingerprint"):
        assert key in meta, key
    assert meta["model_name"] == FIXTURES.name and meta["model_fingerprint"].startswith("sha256:")
    assert (meta["dtype"], meta["steps"], meta["seed"]) == ("float32", 3, 1)


def test_from_image_reproduces_the_image(keeper, tmp_path):
    again = tmp_path / "again.png"
    result = invoke(*FROM, str(keeper), "-o", str(again))
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(pixels(keeper), pixels(again))
    assert read_metadata(again) == read_metadata(keeper)


def test_from_image_with_steps_changes_only_the_steps_and_info_shows_it(keeper, tmp_path):
    out = tmp_path / "two.png"
    result = invoke(*FROM, str(keeper), "--steps", "2", "-o", str(out))
    assert result.exit_code == 0, result.output
    old, new = read_metadata(keeper), read_metadata(out)
    assert new["steps"] == 2 and new["recipe_settings"]["steps"] == 2
    changed = {k for k in old if old[k] != new[k]} - {"recipe_settings"}
    assert changed <= STEP_KEYS and "steps" in changed
    assert {k for k in old["recipe_settings"] if old["recipe_settings"][k] != new["recipe_settings"][k]} \
        <= {"steps", "official"}
    shown = invoke("info", str(out))
    assert shown.exit_code == 0 and "steps 2," in shown.output and "seed 1 | 256x256" in shown.output


@pytest.mark.parametrize("name, quality", [("o.jpg", None), ("o.jpeg", "80"), ("o.webp", None), ("o.webp", "70")])
def test_jpeg_and_webp_carry_metadata_info_reads_back(keeper, tmp_path, name, quality):
    out = tmp_path / name
    args = [*FROM, str(keeper), "-o", str(out)] + (["--quality", quality] if quality else [])
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    shown = invoke("info", str(out), "--json")
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output) == read_metadata(out) == read_metadata(keeper)
    readable = invoke("info", str(out)).output
    assert "prompt: 'a red fox'" in readable and "recipe full" in readable
    if name == "o.webp" and quality is None:  # lossless by default
        np.testing.assert_array_equal(pixels(out), pixels(keeper))


def test_info_and_from_image_on_an_image_without_metadata_say_so(tmp_path):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    for args in (["info", str(plain)], ["generate", "--from-image", str(plain), "-o", str(tmp_path / "x.png")]):
        result = invoke(*args)
        assert result.exit_code == 1
        assert result.output.strip() == f"error: {plain}: no hidream-mlx metadata in this image"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.png"]


def test_negative_prompt_replaces_the_unconditional_prompt_and_is_recorded(keeper, tmp_path):
    out = tmp_path / "neg.png"
    result = invoke(*FROM, str(keeper), "--negative-prompt", "blurry", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert read_metadata(out)["negative_prompt"] == "blurry"
    assert not np.array_equal(pixels(out), pixels(keeper))
    assert "negative prompt: 'blurry'" in invoke("info", str(out)).output
    again = tmp_path / "neg_again.png"
    assert invoke(*FROM, str(out), "-o", str(again)).exit_code == 0
    np.testing.assert_array_equal(pixels(out), pixels(again))


def test_command_line_preset_beats_the_image_which_beats_recipe_defaults(keeper):
    recorded = recorded_settings(read_metadata(keeper))
    assert (recorded["steps"], recorded["width"], recorded["no_snap"]) == (3, 256, True)
    high = merge_settings(recorded, {"preset": "high"}, "full")
    assert "steps" not in high and "width" not in high and "no_snap" not in high
    assert high["prompt"] == "a red fox" and high["seed"] == 1 and high["preset"] == "high"
    flags = merge_settings(recorded, {"steps": 9, "width": 512}, "full")
    assert flags["steps"] == 9 and flags["width"] == 512 and "height" not in flags


def test_only_settings_the_target_recipe_reads_are_reapplied():
    meta = {"prompt": "p", "seed": 2, "recipe": "dev", "width": 64, "height": 64,
            "recipe_settings": {"steps": 14, "guidance": 0.0, "shift": 1.0, "noise_scale": 7.5, "s_noise": 7.5,
                                "noise_clip": 2.5}}
    same = merge_settings(recorded_settings(meta), {}, "dev")
    assert same["s_noise"] == 7.5 and same["steps"] == 14 and "shift" not in same  # dev ignores shift
    other = merge_settings(recorded_settings(meta), {"recipe": "full"}, "full")
    assert not {"steps", "guidance", "s_noise", "noise_clip", "noise_scale"} & set(other)


def test_references_are_given_again_or_found_beside_the_image(tmp_path):
    ref = tmp_path / "cat.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(ref)
    meta = {"reference_files": [{"name": "cat.png", "sha256": sha256_file(ref)}]}
    notes = []
    assert find_references(meta, tmp_path / "out.png", (), notes.append) == (str(ref),)
    elsewhere = tmp_path / "sub"
    elsewhere.mkdir()
    with pytest.raises(RequestError, match="made with reference image\\(s\\) cat.png.*give them again with --ref"):
        find_references(meta, elsewhere / "out.png", (), notes.append)
    other = tmp_path / "dog.png"
    Image.new("RGB", (8, 8)).save(other)
    assert find_references(meta, elsewhere / "out.png", (str(other),), notes.append) == (str(other),)
    assert "differs from the recorded reference cat.png" in notes[-1]


def test_a_different_model_fingerprint_warns():
    notes = []
    meta = {"model_name": "a", "model_fingerprint": "sha256:1"}
    check_model(meta, SimpleNamespace(name="b", fingerprint="sha256:2"), notes.append)
    check_model(meta, SimpleNamespace(name="a", fingerprint="sha256:1"), notes.append)
    assert len(notes) == 1 and "differs from the one that made the image" in notes[0]


def test_a_recorded_model_missing_here_asks_for_model(keeper, tmp_path):
    meta = read_metadata(keeper)
    meta["model"] = str(tmp_path / "gone")
    from hidream_mlx.images import save_image

    moved = tmp_path / "moved.png"
    save_image(pixels(keeper), moved, meta)
    result = invoke("generate", "--from-image", str(moved), "-o", str(tmp_path / "x.png"))
    assert result.exit_code == 1 and "is not on this machine; give --model" in result.output
    ok = invoke("generate", "--from-image", str(moved), "--model", str(FIXTURES), "-o", str(tmp_path / "x.png"))
    assert ok.exit_code == 0, ok.output
    np.testing.assert_array_equal(pixels(tmp_path / "x.png"), pixels(keeper))


def test_loras_recorded_by_name_are_found_beside_the_image_or_asked_for(tmp_path):
    from test_lora import fresh, lora_tensors, write_lora

    lora = write_lora(tmp_path / "l", lora_tensors(fresh()), "peft")
    out = lora.parent / "with_lora.png"
    made = invoke(*BASE, "--seed", "1", "--lora", str(lora), "--lora-scale", "0.6", "-o", str(out))
    assert made.exit_code == 0, made.output
    again = tmp_path / "again.png"
    result = invoke(*FROM, str(out), "-o", str(again))
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(pixels(out), pixels(again))
    assert read_metadata(again)["loras"] == read_metadata(out)["loras"]
    moved = tmp_path / "moved.png"
    moved.write_bytes(out.read_bytes())
    missing = invoke(*FROM, str(moved), "-o", str(tmp_path / "x.png"))
    assert missing.exit_code == 1 and "made with LoRA(s) lora.safetensors" in missing.output


@pytest.mark.parametrize("scheduler, recipe", [("flash", "dev"), ("flow_match", "dev-edit")])
def test_from_image_of_an_edit_reruns_the_editing_scheduler_it_was_made_with(tmp_path, scheduler, recipe):
    ref = str(FIXTURES / "edit_ref.png")
    first = tmp_path / "edit.png"
    made = invoke(*BASE, "--recipe", "dev", "--seed", "3", "--ref", ref, "--editing-scheduler", scheduler,
                  "-o", str(first))
    assert made.exit_code == 0, made.output
    assert read_metadata(first)["recipe"] == recipe
    again = tmp_path / "again.png"
    rerun = invoke(*FROM, str(first), "--ref", ref, "-o", str(again))
    assert rerun.exit_code == 0, rerun.output
    assert read_metadata(again)["recipe"] == recipe
    assert np.array_equal(pixels(again), pixels(first))
