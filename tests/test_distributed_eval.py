"""A battery over several ranks (mlx.launch, ring backend, 127.0.0.1 only): every job done exactly
once, the same images as one process, a lost rank loses only its round and the rerun completes;
one process at a time per run folder; a torn results line is dropped, reported and redone."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import FIXTURES

from hidream_mlx.cli.eval import eval_group
from hidream_mlx.harness import distributed
from hidream_mlx.harness.distributed import _pack, _unpack, launcher_hosts, plan_round
from hidream_mlx.harness.evaluation import EvalRun, read_results, repair_results, run_lock

VARIANT = "v:recipe=dev,steps=3"


def battery(tmp_path: Path, n: int, size: str = "64x64") -> Path:
    path = tmp_path / "spread.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"prompt number {i}", "size": size}) + "\n"
                            for i in range(n)))
    return path


def eval_command(battery_path: Path, rundir: Path, variant: str = VARIANT, hosts: str | None = None) -> list[str]:
    args = ["--battery", str(battery_path), "--model", str(FIXTURES), "--dtype", "float32", "--variant", variant,
            "--output", str(rundir)]
    return [sys.executable, "-c", "from hidream_mlx.cli import main; main(prog_name='hidream-mlx')", "eval",
            *args, *(["--hosts", hosts] if hosts else [])]


def rows(rundir: Path) -> list[dict]:
    return [json.loads(line) for line in (rundir / "results.jsonl").read_text().splitlines()]


# --- dispatch -------------------------------------------------------------------------------------

def test_the_first_round_gives_each_rank_one_job_then_shares_follow_measured_speed():
    queue = [(f"k{i}", 1.0) for i in range(20)]
    assert plan_round(queue, [None, None]) == [["k0"], ["k1"]]
    fast_and_slow = plan_round(queue, [3.0, 1.0])  # rank 0 does three jobs a second, rank 1 one
    assert [len(p) for p in fast_and_slow] == [6, 2]
    assert sorted(sum(fast_and_slow, [])) == [f"k{i}" for i in range(2, 10)] and len(queue) == 10  # from the front
    assert sum(map(len, plan_round(queue, [1.0, 1.0]) + plan_round(queue, [1.0, 1.0]) +
                   plan_round(queue, [1.0, 1.0]))) == 10 and queue == []
    assert plan_round(queue, [1.0, 1.0]) == [[], []]  # an empty plan ends the run on every rank


def test_rows_and_image_bytes_travel_unchanged():
    sent = [({"key": "v/a/1", "rank": 1}, b"\x89PNG one"), ({"key": "v/b/1", "rank": 1}, bytes(range(256)))]
    got, elapsed, cost = _unpack(_pack(sent, 1.5, 4096.0))
    assert got == sent and (elapsed, cost) == (1.5, 4096.0)


def test_hosts_are_a_hostfile_or_a_comma_list_of_ips(tmp_path):
    assert launcher_hosts("localhost,127.0.0.1") == ["--hosts", "127.0.0.1,127.0.0.1"]
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text('[{"ssh": "mac1", "ips": ["10.0.0.1"]}, {"ssh": "mac2", "ips": ["10.0.0.2"]}]')
    assert launcher_hosts(str(hostfile)) == ["--hostfile", str(hostfile)]
    for bad in ("10.0.0.1", "10.0.0.1,,10.0.0.2"):
        with pytest.raises(ValueError, match="--hosts wants"):
            launcher_hosts(bad)


def test_a_host_lacking_an_input_is_named_before_anything_loads(monkeypatch, tmp_path):
    import mlx.core as mx

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    group = mx.distributed.init()  # a group of one: the other host's answer is simulated below
    reports = [{"host": "mac1", "prints": {str(model): distributed.fingerprint(model)}},
               {"host": "mac2", "prints": {str(model): None}}]
    monkeypatch.setattr(distributed, "gather_json", lambda g, value: reports if isinstance(value, dict) else [value])
    with pytest.raises(ValueError, match=rf"host mac2 \(rank 1\) lacks {model}"):
        distributed.check_inputs(group, [str(model), "HiDream-ai/not-a-local-path"])


# --- the run folder (#12 item 7) --------------------------------------------------------------------

def test_a_second_run_on_a_locked_folder_refuses_naming_the_holder(tmp_path):
    rundir = tmp_path / "run"
    with run_lock(rundir):
        result = CliRunner().invoke(eval_group, ["--battery", str(battery(tmp_path, 1)), "--model", str(FIXTURES),
                                                 "--output", str(rundir)])
        assert result.exit_code != 0
        assert f"in use by another eval run (pid {os.getpid()} on host" in str(result.exception)
        assert not (rundir / "results.jsonl").exists()
        launching = CliRunner().invoke(eval_group, ["--battery", str(battery(tmp_path, 1)), "--model",
                                                    str(FIXTURES), "--output", str(rundir), "--hosts",
                                                    "127.0.0.1,127.0.0.1"])
        assert "in use by another eval run" in str(launching.exception)  # before any rank starts
    with run_lock(rundir):  # released when its holder is done
        pass


def test_a_torn_last_line_is_reported_dropped_and_its_job_made_again(tmp_path):
    rundir, path = tmp_path / "run", battery(tmp_path, 2)
    command = ["--battery", str(path), "--model", str(FIXTURES), "--dtype", "float32", "--variant", VARIANT,
               "--output", str(rundir)]
    assert CliRunner().invoke(eval_group, command).exit_code == 0
    results = rundir / "results.jsonl"
    first, second = results.read_text().splitlines()
    results.write_text(first + "\n" + second[: len(second) // 2])  # killed in the middle of the write
    again = CliRunner().invoke(eval_group, command)
    assert again.exit_code == 0, again.output
    assert "dropped a torn line" in again.output and "1 images made, 1 already done" in again.output
    assert [r["key"] for r in rows(rundir)] == ["v/p0/42", "v/p1/42"]  # each once, no torn line left
    assert repair_results(rundir) == []


def test_a_run_folder_opened_after_a_torn_write_reports_it(tmp_path):
    (tmp_path / "results.jsonl").write_text('{"key": "v/a/1", "image": "a.png"}\n{"key": "v/b/1", "im')
    run = EvalRun(tmp_path, {"model": "m"}, [])
    assert len(run.dropped) == 1 and "results.jsonl:2: dropped a torn line" in run.dropped[0]
    assert list(read_results(tmp_path)) == ["v/a/1"]


# --- several ranks (each test launches processes) -------------------------------------------------

@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    path = battery(root, 6)
    subprocess.run(eval_command(path, root / "run"), check=True, capture_output=True, timeout=300)
    return path, root / "run"


@pytest.mark.slow
def test_two_ranks_do_every_job_once_with_the_images_of_one_process(single, tmp_path):
    path, reference = single
    rundir = tmp_path / "run"
    done = subprocess.run(eval_command(path, rundir, hosts="127.0.0.1,127.0.0.1"), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    got, want = rows(rundir), {r["key"]: r for r in rows(reference)}
    assert sorted(r["key"] for r in got) == sorted(want)  # every job exactly once
    assert {r["rank"] for r in got} == {0, 1} and all(r["host"] for r in got)
    for r in got:
        assert r["image"] == want[r["key"]]["image"] and r["sha256"] == want[r["key"]]["sha256"]
        assert (rundir / r["image"]).read_bytes() == (reference / r["image"]).read_bytes()
    assert (rundir / "report.md").read_text().count("[png](images/") == 6
    assert (rundir / "contact_spread.png").is_file()
    session = json.loads((rundir / "run.json").read_text())["sessions"][-1]
    assert len(session["ranks"]) == 2 and session["images"] == 6


@pytest.mark.slow
def test_a_resumed_run_on_two_ranks_makes_only_the_missing_images(single, tmp_path):
    path, reference = single
    rundir = tmp_path / "run"
    subprocess.run(eval_command(battery(tmp_path, 2), rundir), check=True, capture_output=True, timeout=300)
    done = subprocess.run(eval_command(path, rundir, hosts="localhost,localhost"), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "4 images made, 2 already done" in done.stderr
    keys = [r["key"] for r in rows(rundir)]
    assert sorted(keys) == sorted(r["key"] for r in rows(reference)) and len(keys) == len(set(keys))


def _rank_pid(rundir: Path, rank: int) -> int | None:
    """The process mlx.launch started as ``rank`` for this run (found by its environment)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if f"MLX_RANK={rank}".encode() in environ and str(rundir).encode() in cmdline:
            return int(entry.name)
    return None


@pytest.mark.slow
def test_a_rank_killed_mid_run_loses_only_unwritten_jobs_and_the_rerun_completes(tmp_path):
    path, rundir = battery(tmp_path, 10, size="128x128"), tmp_path / "run"
    command = eval_command(path, rundir, variant="v:recipe=dev,steps=12", hosts="127.0.0.1,127.0.0.1")
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results, deadline = rundir / "results.jsonl", time.time() + 120
    while time.time() < deadline and not (results.is_file() and results.read_text().count("\n") >= 2):
        time.sleep(0.01)
    victim = _rank_pid(rundir, 1)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "jobs lost (no result, made again on rerun)" in err and "jobs have no result" in err
    written = rows(rundir)
    assert 2 <= len(written) < 10 and len({r["key"] for r in written}) == len(written)

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    keys = [r["key"] for r in rows(rundir)]
    assert sorted(keys) == sorted(f"v/p{i}/42" for i in range(10)) and len(keys) == 10  # nothing twice
    assert f"{10 - len(written)} images made, {len(written)} already done" in rerun.stderr
