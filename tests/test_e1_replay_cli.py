"""`hidream-mlx replay` on every HiDream-E1 case of the fixture set, from the folders users
download: --model the E1 model and --base the I1-Full pipeline (the cases that need no E1 weights
also replay with the pipeline alone as --model). Every recorded key is written; single calls
(encodings, the source's latents, transformer calls) within 1e-4, the free-running sampling
cases at the fixture README's thresholds. `info --model` says what an edit reads and predicts the
released E1.1 edit: batch 3 over 8192 tokens at 1024x1024."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from e1_support import FIXTURES, SAMPLING_CASES, TOL, assert_image_close, golden, max_abs, user_layout
from hidream_mlx.cli import main

SINGLE_CALLS = ("edit_encoding", "image_latents", "edit_forward")
MODEL_OF = {"edit_forward": "e1_1", "e1_full_sampling": "e1_full"}  # the rest: E1.1 (or the base alone)
EXACT = ("timesteps", "model_timesteps", "refine_start_step", "max_seq", "pipeline_image")


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    return user_layout(tmp_path_factory.mktemp("e1"))


def replay(*args):
    return CliRunner().invoke(main, ["replay", *[str(a) for a in args]])


def compare_single(ours: dict, ref: dict) -> None:
    assert set(ref) - {k for k in ref if k.startswith("dbg.") or ".dbg." in k} <= set(ours)
    for key in set(ref) & set(ours):
        assert ours[key].shape == ref[key].shape, key
        if ref[key].dtype.kind in "USbi":
            np.testing.assert_array_equal(ours[key], ref[key], err_msg=key)
        else:
            assert max_abs(ours[key], ref[key]) < TOL, key


@pytest.mark.parametrize("name", SINGLE_CALLS)
def test_a_single_call_case_replays_within_1e_4_on_the_e1_model_and_its_base(name, layout, tmp_path):
    out = tmp_path / "ours.npz"
    result = replay("--model", layout[MODEL_OF.get(name, "e1_1")], "--base", layout["base"],
                    "--case", FIXTURES / f"{name}.npz", "--out", out)
    assert result.exit_code == 0, result.output
    compare_single(dict(np.load(out)), golden(name))


@pytest.mark.parametrize("name", ["edit_encoding", "image_latents"])
def test_the_cases_that_need_no_e1_weights_replay_on_the_base_alone(name, layout, tmp_path):
    out = tmp_path / "ours.npz"
    result = replay("--model", layout["base"], "--case", FIXTURES / f"{name}.npz", "--out", out)
    assert result.exit_code == 0, result.output
    compare_single(dict(np.load(out)), golden(name))


@pytest.mark.parametrize("name", SAMPLING_CASES)
def test_a_sampling_case_replays_with_its_keys(name, layout, tmp_path):
    out = tmp_path / "ours.npz"
    result = replay("--model", layout[MODEL_OF.get(name, "e1_1")], "--base", layout["base"],
                    "--case", FIXTURES / f"{name}.npz", "--out", out)
    assert result.exit_code == 0, result.output
    ours, ref = dict(np.load(out)), golden(name)
    assert set(ref) <= set(ours)
    for key in EXACT:
        np.testing.assert_array_equal(ours[key], ref[key], err_msg=key)
    for key in ("sigmas", "image_latents", "init_latents"):
        assert max_abs(ours[key], ref[key]) < TOL, key
    assert max_abs(ours["final_latents"], ref["final_latents"]) < 1e-2
    full = name.startswith("e1_full")
    assert_image_close(ours["image"], ref["image"], levels=2 if full else 1, identical=0.97 if full else 0.99)


@pytest.mark.parametrize("model, case, message", [
    ("base", "edit_forward", "this case runs an E1 model; give it with --model"),
    ("e1_full", "e1_1_sampling", "this case runs an E1.1 model"),
    ("e1_1", "e1_full_sampling", "this case runs the E1-Full checkpoint"),
])
def test_a_case_that_needs_other_weights_is_refused_in_one_line(layout, tmp_path, model, case, message):
    args = ["--model", layout[model]] + ([] if model == "base" else ["--base", layout["base"]])
    result = replay(*args, "--case", FIXTURES / f"{case}.npz", "--out", tmp_path / "o.npz")
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output


def test_base_goes_with_e1_cases_and_an_e1_model(layout, tmp_path):
    result = replay("--model", layout["base"], "--base", layout["base"], "--case", FIXTURES / "edit_encoding.npz",
                    "--out", tmp_path / "o.npz")
    assert result.exit_code == 1 and "give the E1 model as --model and the pipeline as --base" in result.output
    i1_case = Path(__file__).parent / "fixtures" / "i1-tiny" / "text_encoding.npz"
    result = replay("--model", layout["base"], "--base", layout["base"], "--case", i1_case, "--out", tmp_path / "o.npz")
    assert result.exit_code == 1 and "--base: only HiDream-E1 cases take it" in result.output
    result = replay("--model", layout["e1_1"], "--base", layout["base"], "--case", i1_case, "--out", tmp_path / "o.npz")
    assert result.exit_code == 1 and "a HiDream-I1 case (text_encoding), but --model" in result.output


def _tool(name):
    path = Path(__file__).parent / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_info_says_what_an_edit_reads_and_predicts_the_released_e1_1_edit(tmp_path):
    """A sparse checkpoint of the real dims (headers only): at 1024x1024 the editing batch is 3 rows
    of 8192 padded tokens, and a Mac user reads the E1.1 transformer with the base's encoders and VAE."""
    base = tmp_path / "HiDream-I1-Full"
    _tool("make_sparse_i1_checkpoint").main([str(base), "--from", str(FIXTURES)])
    _tool("make_sparse_i1_encoders").main([str(base), "--from", str(FIXTURES)])
    e1_1 = tmp_path / "HiDream-E1-1"
    e1_1.mkdir()
    (e1_1 / "transformer").symlink_to(base / "transformer")
    result = CliRunner().invoke(main, ["info", "--model", str(e1_1), "--base", str(base)])
    assert result.exit_code == 0, result.output
    text = result.output
    assert "HiDream-E1, recipe e1.1" in text and "on the base HiDream-I1-Full" in text
    assert "E1.1 reads its own transformer" in text and "the base's transformer weights are not needed" in text
    assert "CFG: batch 3 over 8192 tokens" in text and "1024x1024 pixel budget" in text
    for phase in ("encode (largest encoder", "source (VAE encode)", "sample (load included)", "VAE decode",
                  "whole run"):
        assert phase in text, phase
    assert "this request:" in text
    refused = CliRunner().invoke(main, ["info", "--model", str(base), "--base", str(base)])
    assert refused.exit_code == 1 and "--base is for HiDream-E1 models" in refused.output
