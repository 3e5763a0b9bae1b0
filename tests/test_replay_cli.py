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
