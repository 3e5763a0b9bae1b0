"""`hidream-mlx replay` on every HiDream-I1 golden case: the command writes the case's own keys,
and they match the PyTorch reference within the fixture README's tolerances (forward and
encoders 1e-4; trajectories 1e-3 relative per step; images within one level, 99% identical)."""

import os

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import FIXTURES as O1_FIXTURES

from hidream_mlx.cli import main
from i1_support import FIXTURES, TOL, golden, max_abs

SAMPLING = ("full", "dev", "fast")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def replayed(tmp_path_factory):
    """Each case replayed once per module: name -> (our arrays, the golden arrays)."""
    done = {}

    def get(name):
        if name not in done:
            out = tmp_path_factory.mktemp("replay") / f"{name}.npz"
            result = run("replay", "--model", FIXTURES, "--case", FIXTURES / f"{name}.npz", "--out", out)
            assert result.exit_code == 0, result.output
            done[name] = (dict(np.load(out)), golden(f"{name}.npz"))
        return done[name]

    return get


def relative(a, b) -> float:
    return max_abs(a, b) / float(np.abs(b).max())


def assert_image_matches(ours, ref):
    assert ours.dtype == np.uint8 and ours.shape == ref.shape
    diff = np.abs(ours.astype(int) - ref.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() >= 0.99


def test_text_encoding_writes_every_pos_and_neg_key_within_1e_4(replayed):
    ours, ref = replayed("text_encoding")
    expected = {k for k in ref if k.startswith(("pos.", "neg."))}
    assert set(ours) == expected
    for key in sorted(expected):
        assert ours[key].shape == ref[key].shape, key
        if key.endswith(("input_ids", "attention_mask")):
            assert np.array_equal(ours[key], ref[key]), key
        else:
            assert max_abs(ours[key], ref[key]) < TOL, key


def test_transformer_forward_writes_each_call_output_and_patchify(replayed):
    ours, ref = replayed("transformer_forward")
    calls = sorted({k.split(".")[0] for k in ref if k.endswith(".output")})
    assert calls and all(f"{c}.output" in ours for c in calls)
    for call in calls:
        assert ours[f"{call}.output"].shape == ref[f"{call}.output"].shape
        assert max_abs(ours[f"{call}.output"], ref[f"{call}.output"]) < TOL, call
    patchify = [k for k in ref if k.startswith("patchify.")]
    assert patchify and set(patchify) <= set(ours)
    for key in patchify:
        assert np.array_equal(ours[key], ref[key]), key


def test_vae_decode_writes_decoded_and_images(replayed):
    ours, ref = replayed("vae_decode")
    for key in ("vae_input", "decoded", "image_float"):
        assert ours[key].shape == ref[key].shape
        assert max_abs(ours[key], ref[key]) < TOL, key
    assert_image_matches(ours["image"], ref["image"])


@pytest.mark.parametrize("name", SAMPLING)
def test_sampling_case_follows_the_reference_trajectory_from_the_encoded_prompt(replayed, name):
    """The conditioning is the prompt through the four encoders, not the case's embeddings."""
    ours, ref = replayed(f"{name}_sampling")
    assert np.array_equal(ours["timesteps"], ref["timesteps"])
    assert max_abs(ours["sigmas"], ref["sigmas"]) < 1e-6
    assert ours["latents"].shape == ref["latents"].shape
    for i in range(len(ref["latents"])):
        assert relative(ours["latents"][i], ref["latents"][i]) < 1e-3, f"step {i}"
    assert ours["model_output"].shape == ref["model_output"].shape
    for i in range(len(ref["model_output"])):
        assert relative(ours["model_output"][i], ref["model_output"][i]) < 1e-3, f"output {i}"
    assert relative(ours["final_latents"], ref["final_latents"]) < 1e-3
    assert np.array_equal(ours["final_latents"], ours["latents"][-1])
    assert relative(ours["decoded"], ref["decoded"]) < 1e-3
    assert_image_matches(ours["image"], ref["image"])


def test_a_case_of_the_other_family_is_refused_in_one_line(tmp_path):
    out = tmp_path / "out.npz"
    cases = [(O1_FIXTURES, FIXTURES / "vae_decode.npz", "HiDream-I1 case"),
             (FIXTURES, O1_FIXTURES / "forward_t2i.npz", "HiDream-O1 case")]
    for model, case, says in cases:
        result = run("replay", "--model", model, "--case", case, "--out", out)
        assert result.exit_code == 1
        assert result.output.startswith("error:") and result.output.strip().count("\n") == 0, result.output
        assert says in result.output and str(model) in result.output
        assert not out.exists()


def test_output_is_never_replaced_without_overwrite(tmp_path):
    out = tmp_path / "out.npz"
    out.write_bytes(b"keep me")
    case = FIXTURES / "vae_decode.npz"
    result = run("replay", "--model", FIXTURES, "--case", case, "--out", out)
    assert result.exit_code == 1 and "already exists" in result.output
    assert out.read_bytes() == b"keep me"
    result = run("replay", "--model", FIXTURES, "--case", case, "--out", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert set(np.load(out)) == {"vae_input", "decoded", "image_float", "image"}


def pipeline_without_llama(tmp_path):
    folder = tmp_path / "pipeline"
    folder.mkdir()
    for entry in FIXTURES.iterdir():
        if entry.name not in ("text_encoder_4", "tokenizer_4"):
            (folder / entry.name).symlink_to(entry)
    return folder


def test_llama_from_its_own_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the default (the official repo) is not in the cache
    pipeline = pipeline_without_llama(tmp_path)
    case, out = FIXTURES / "text_encoding.npz", tmp_path / "out.npz"
    for extra in ([], ["--llama", tmp_path / "no-such-llama"]):
        result = run("replay", "--model", pipeline, "--case", case, "--out", out, *extra)
        assert result.exit_code == 1 and result.output.strip().count("\n") == 0, result.output
        assert "Llama not found" in result.output and "--llama" in result.output and not out.exists()
    llama = tmp_path / "llama"
    llama.mkdir()
    for part in ("text_encoder_4", "tokenizer_4"):
        for f in (FIXTURES / part).iterdir():
            os.symlink(f, llama / f.name)
    result = run("replay", "--model", pipeline, "--case", case, "--out", out, "--llama", llama)
    assert result.exit_code == 0, result.output
    ref = golden("text_encoding.npz")
    for side in ("pos", "neg"):
        assert max_abs(np.load(out)[f"{side}.llama_hidden_states"], ref[f"{side}.llama_hidden_states"]) < TOL


def test_llama_is_refused_for_o1_models(tmp_path):
    result = run("replay", "--model", O1_FIXTURES, "--case", O1_FIXTURES / "forward_t2i.npz",
                 "--out", tmp_path / "out.npz", "--llama", tmp_path)
    assert result.exit_code == 1 and "--llama" in result.output


def test_a_case_missing_its_prompt_is_refused_in_one_line(tmp_path):
    case, out = tmp_path / "fast_sampling.npz", tmp_path / "out.npz"
    np.savez(case, **{k: v for k, v in golden("fast_sampling.npz").items() if k != "prompt"})
    result = run("replay", "--model", FIXTURES, "--case", case, "--out", out)
    assert result.exit_code == 1 and result.output.strip().count("\n") == 0
    assert "sampling case without prompt" in result.output and not out.exists()
