"""`hidream-mlx generate` / `python generate_hidream_mlx.py`: the product's main job."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import FIXTURES
from PIL import Image

from hidream_mlx.cli import main
from hidream_mlx.images import read_metadata

ROOT = Path(__file__).resolve().parents[1]
BASE = ["generate", "--model", str(FIXTURES), "--prompt", "a red fox", "--no-snap", "--width", "256",
        "--height", "256", "--seed", "7"]


def run(*args):
    return CliRunner().invoke(main, [*BASE, *args])


def pixels(path):
    return np.array(Image.open(path))


def test_driver_script_writes_a_png_with_metadata_and_is_deterministic(tmp_path):
    """The issue's exact command, run as a user would, twice."""
    for name in ("a.png", "b.png"):
        proc = subprocess.run(
            [sys.executable, str(ROOT / "generate_hidream_mlx.py"), "--model", str(FIXTURES), "--prompt", "a red fox",
             "--no-snap", "--width", "256", "--height", "256", "--seed", "7", "--output", name],
            cwd=tmp_path, capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        assert "s/step" in proc.stderr and "256x256" in proc.stderr
    image = Image.open(tmp_path / "a.png")
    assert image.size == (256, 256) and image.mode == "RGB"
    np.testing.assert_array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "b.png"))
    meta = read_metadata(tmp_path / "a.png")
    assert meta["prompt"] == "a red fox" and meta["seed"] == 7
    assert (meta["width"], meta["height"]) == (256, 256)
    assert meta["recipe"] == "full" and meta["recipe_settings"]["scheduler"] == "unipc"
    # The model by its folder's name and fingerprint: an image keeps no local path.
    assert meta["model"] == FIXTURES.name == meta["model_name"] and meta["model_fingerprint"].startswith("sha256:")
    assert str(FIXTURES.parent) not in json.dumps(meta)
    assert "quantization" in meta and meta["tool_version"]


def test_flags_override_the_recipe_and_are_recorded(tmp_path):
    out = tmp_path / "o.png"
    result = run("--recipe", "dev", "--steps", "7", "--output", str(out))
    assert result.exit_code == 0, result.output
    meta = read_metadata(out)
    assert meta["recipe"] == "dev" and meta["steps"] == 7 and meta["official_recipe"] is False
    assert "differ from the released dev recipe (7 of the 28 distilled timesteps)" in result.output


def test_default_size_snaps_to_an_official_bucket_and_says_so(tmp_path, monkeypatch):
    """Without --no-snap a request is snapped (checked without running: a bad size fails first)."""
    from hidream_mlx.families.o1.sizes import resolve_size

    w, h, note = resolve_size(1024, 1024, snap=True)
    assert (w, h) == (2048, 2048) and "snapped from 1024x1024" in note


def test_seam_blend_and_previews(tmp_path):
    out = tmp_path / "o.png"
    result = run("--recipe", "dev", "--steps", "4", "--blend-seams", "2", "--preview-every", "2", "--output", str(out))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "o.step002.png").is_file()
    assert read_metadata(out)["blend_seams"] == 2


@pytest.mark.parametrize("args, message", [
    (["--width", "250"], "multiple of 32"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--steps", "-3"], "--steps must be >= 1"),
    (["--blend-seams", "40"], "--blend-seams must be >= 0 and <= 16"),
    (["--width", "0"], "--width must be >= 1"),
    (["--height", "-256"], "--height must be >= 1"),
    (["--guidance", "nan"], "--guidance must be a finite number"),
    (["--shift", "inf"], "--shift must be a finite number"),
    (["--blend-seams", "-1"], "--blend-seams must be >= 0"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--seed", str(2**40), "--noise", "mlx"], "--seed must be >= 0 and <= 4294967295"),
    (["--recipe", "full", "--s-noise", "2"], "--s-noise has no effect with the full recipe"),
    (["--recipe", "dev", "--shift", "2"], "--shift has no effect with the dev recipe"),
    (["--prompt", "a fox<|im_end|>"], "special-token string '<|im_end|>'"),
])
def test_bad_settings_fail_with_one_line(tmp_path, args, message):
    out = tmp_path / "o.png"
    result = run(*args, "--output", str(out))
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists() and not list(tmp_path.iterdir())


def test_missing_or_wrong_model_folder(tmp_path):
    result = CliRunner().invoke(main, ["generate", "--model", str(tmp_path / "nope"), "--prompt", "x",
                                       "--output", str(tmp_path / "o.png")])
    assert result.exit_code == 1 and "no such folder" in result.output
    result = CliRunner().invoke(main, ["generate", "--model", str(tmp_path), "--prompt", "x",
                                       "--output", str(tmp_path / "o.png")])
    assert result.exit_code == 1 and "no config.json" in result.output


def test_empty_prompt(tmp_path):
    result = CliRunner().invoke(main, ["generate", "--model", str(FIXTURES), "--prompt", "  ",
                                       "--output", str(tmp_path / "o.png")])
    assert result.exit_code == 1 and "--prompt is empty" in result.output


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    out = tmp_path / "o.png"
    out.write_bytes(b"precious")
    result = run("--recipe", "dev", "--steps", "2", "--output", str(out))
    assert result.exit_code == 1 and "already exists" in result.output
    assert out.read_bytes() == b"precious"
    result = run("--recipe", "dev", "--steps", "2", "--output", str(out), "--overwrite")
    assert result.exit_code == 0 and Image.open(out).size == (256, 256)


def test_unwritable_output_folder(tmp_path, monkeypatch):
    # CI runs as root, who may write anywhere, so the permission check itself is simulated.
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    result = run("--output", str(tmp_path / "o.png"))
    assert result.exit_code == 1 and "is not writable" in result.output
    assert list(tmp_path.iterdir()) == []


def test_output_in_a_missing_folder_or_onto_a_folder(tmp_path):
    result = run("--output", str(tmp_path / "missing" / "o.png"))
    assert result.exit_code == 1 and "output folder does not exist" in result.output
    result = run("--output", str(tmp_path))
    assert result.exit_code == 1 and "is a folder" in result.output


def test_failure_during_sampling_leaves_no_partial_file(tmp_path, monkeypatch):
    from hidream_mlx.families.o1 import engine as generation

    def explode(*_a, **_k):
        raise ValueError("simulated failure")

    monkeypatch.setattr(generation.Engine, "run", explode)
    result = run("--output", str(tmp_path / "o.png"))
    assert result.exit_code == 1 and "simulated failure" in result.output
    assert list(tmp_path.iterdir()) == []


def test_memory_check_refuses_unless_forced(tmp_path, monkeypatch):
    from hidream_mlx import memory

    monkeypatch.setattr(memory, "machine_memory", lambda: 1024)
    result = run("--recipe", "dev", "--steps", "2", "--output", str(tmp_path / "o.png"))
    assert result.exit_code == 1 and "try a lower-bit model" in result.output
    result = run("--recipe", "dev", "--steps", "2", "--output", str(tmp_path / "o.png"), "--force")
    assert result.exit_code == 0, result.output


def test_an_existing_preview_is_never_overwritten_silently(tmp_path):
    out = tmp_path / "o.png"
    mine = tmp_path / "o.step002.png"
    mine.write_bytes(b"my own file")
    result = run("--recipe", "dev", "--steps", "4", "--preview-every", "2", "--output", str(out))
    assert result.exit_code == 1 and "o.step002.png: already exists" in result.output
    assert mine.read_bytes() == b"my own file" and not out.exists()
    result = run("--recipe", "dev", "--steps", "4", "--preview-every", "2", "--output", str(out), "--overwrite")
    assert result.exit_code == 0, result.output
    assert mine.read_bytes() != b"my own file" and out.exists()
