"""SIGTERM and SIGHUP clean up like Ctrl-C; a reader closing our stdout loses nothing."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FIXTURES

from hidream_mlx.cli import Terminated, install_signal_handlers
from hidream_mlx.files import atomic_output
from hidream_mlx.images import read_metadata

ROOT = Path(__file__).resolve().parents[1]
GENERATE = [sys.executable, str(ROOT / "generate_hidream_mlx.py"), "--model", str(FIXTURES), "--prompt", "a fox",
            "--no-snap", "--width", "256", "--height", "256", "--seed", "3"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_termination_signal_unwinds_and_removes_the_partial_file(tmp_path, signum):
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    install_signal_handlers()
    try:
        with pytest.raises(Terminated):
            with atomic_output(tmp_path / "out.png") as tmp:
                tmp.write_bytes(b"half")
                os.kill(os.getpid(), signum)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_generate_stopped_by_a_signal_exits_cleanly_and_writes_nothing(tmp_path, signum):
    proc = subprocess.Popen([*GENERATE, "--steps", "400", "--output", "out.png"], cwd=tmp_path,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    for line in proc.stderr:
        if line.startswith("size "):  # printed once the model is loaded, just before sampling
            break
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum
    assert f"stopped by {signal.Signals(signum).name}" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_a_closed_stdout_does_not_lose_the_image_or_fail_the_run(tmp_path):
    out = tmp_path / "out.png"
    proc = subprocess.Popen([*GENERATE, "--steps", "2", "--output", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # like `| head -0`: nobody reads what we print
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err
    assert read_metadata(out)["seed"] == 3
