"""`hidream-mlx replay` writes our outputs under the recorded keys, through the generation code."""

import numpy as np
from click.testing import CliRunner
from conftest import FIXTURES, load_case

from hidream_mlx.cli import main


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_replay_forward_file_matches_every_case(tmp_path):
    out = tmp_path / "out.npz"
    result = run("replay", "--model", str(FIXTURES), "--case", str(FIXTURES / "forward_t2i.npz"), "--out", str(out))
    assert result.exit_code == 0, result.output
    ref = load_case("forward_t2i.npz")
    got = np.load(out)
    prefixes = sorted({k.split(".")[0] for k in ref.files})
    assert sorted(got.files) == [f"{p}.x_pred" for p in prefixes]
    for key in got.files:
        np.testing.assert_allclose(got[key], ref[key], atol=1e-4, rtol=1e-4)


def test_replay_refuses_to_overwrite_and_rejects_unknown_files(tmp_path):
    out = tmp_path / "out.npz"
    out.write_bytes(b"keep me")
    result = run("replay", "--model", str(FIXTURES), "--case", str(FIXTURES / "forward_t2i.npz"), "--out", str(out))
    assert result.exit_code == 1 and "already exists" in result.output
    assert out.read_bytes() == b"keep me"
    bogus = tmp_path / "bogus.npz"
    np.savez(bogus, something=np.zeros(3))
    result = run("replay", "--model", str(FIXTURES), "--case", str(bogus), "--out", str(tmp_path / "o.npz"))
    assert result.exit_code == 1 and "unrecognised case file" in result.output
    assert not (tmp_path / "o.npz").exists()


def test_sampling_cases_replay_without_a_manifest_beside_them(tmp_path):
    """The recipe's released settings are the fallback when no manifest.json records the run."""
    import shutil

    case = tmp_path / "dev_sampling.npz"
    shutil.copy(FIXTURES / "dev_sampling.npz", case)
    out = tmp_path / "out.npz"
    result = run("replay", "--model", str(FIXTURES), "--case", str(case), "--out", str(out))
    assert result.exit_code == 0, result.output
    ref, got = load_case("dev_sampling.npz"), np.load(out)
    diff = np.abs(got["image"].astype(int) - ref["image"])
    assert diff.max() <= 1 and (diff == 0).mean() >= 0.99
