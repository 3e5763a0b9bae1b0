"""The server under failure and abuse: a job that raises fails alone, a dead or stuck worker shows
in /health, long prompts are refused cheaply, bad references name their field, and SIGTERM ends
the process within seconds even while a render sits inside one long device call."""

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import psutil
import pytest
from conftest import FIXTURES
from PIL import Image
from server_helpers import QUICK, free_port, running_server
from test_lora import fresh, lora_tensors, write_lora
from test_lora_validation import rank_zero

from hidream_mlx import requests as prompts
from hidream_mlx.weights import lora as lora_module


def decode(b64: str) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(base64.b64decode(b64))))


def events(client, job_id):
    out = []
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                out.append(json.loads(line[6:]))
    return out


@pytest.fixture()
def served(tmp_path):
    """A fresh server per test: these tests break its worker on purpose."""
    with running_server(FIXTURES, tmp_path / "out") as (url, studio):
        with httpx.Client(base_url=url, timeout=60) as client:
            yield client, studio


def fail_on(studio, monkeypatch, prompt: str, error: BaseException):
    run = studio.engine.run

    def failing(request, on_step=None):
        if request.prompt == prompt:
            raise error
        return run(request, on_step)

    monkeypatch.setattr(studio.engine, "run", failing)


def test_an_exception_inside_a_job_fails_that_job_only_and_the_worker_goes_on(served, monkeypatch):
    client, studio = served
    fail_on(studio, monkeypatch, "boom", ZeroDivisionError("float division by zero"))
    response = client.post("/v1/images/generations", json={"prompt": "boom", **QUICK})
    assert response.status_code == 500
    assert response.json()["error"]["message"] == "internal error (ZeroDivisionError: float division by zero)"
    job = client.post("/v1/jobs", json={"prompt": "boom", **QUICK}).json()
    last = events(client, job["id"])[-1]
    assert last["event"] == "failed" and "ZeroDivisionError" in last["error"]
    fine = client.post("/v1/images/generations", json={"prompt": "a red fox", **QUICK})
    assert fine.status_code == 200 and client.get("/health").json()["status"] == "ok"


def test_a_lora_failing_half_way_is_undone_so_later_jobs_run_on_the_plain_model(served, monkeypatch, tmp_path):
    client, studio = served
    for name, seed in (("one", 1), ("two", 2)):
        write_lora(tmp_path / name, lora_tensors(fresh(), seed), "kohya_unet").rename(tmp_path / f"{name}.safetensors")
    monkeypatch.setattr(studio.config, "lora_dir", tmp_path)
    plain = client.post("/v1/images/generations", json={"prompt": "x", **QUICK}).json()["data"][0]
    apply = lora_module.apply_lora

    def second_fails(model, spec, keep=None, keys=lora_module.O1_KEYS):
        if spec.path.name == "two.safetensors":
            raise RuntimeError("simulated failure while applying")
        return apply(model, spec, keep, keys)

    monkeypatch.setattr(lora_module, "apply_lora", second_fails)
    failed = client.post("/v1/images/generations", json={"prompt": "x", "lora": ["one", "two"], **QUICK})
    assert failed.status_code == 500 and "simulated failure" in failed.text
    after = client.post("/v1/images/generations", json={"prompt": "x", **QUICK}).json()["data"][0]
    np.testing.assert_array_equal(decode(after["b64_json"]), decode(plain["b64_json"]))


class WorkerKilled(BaseException):
    """What no job handler catches: it ends the worker thread itself."""


def test_a_dead_worker_fails_open_jobs_refuses_new_ones_and_health_says_so(served, monkeypatch):
    client, studio = served
    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # the thread's end is the point here
    fail_on(studio, monkeypatch, "die", WorkerKilled("gone"))
    response = client.post("/v1/images/generations", json={"prompt": "die", **QUICK})
    assert response.status_code == 500 and "render worker stopped" in response.json()["error"]["message"]
    studio.queue.thread.join(10)
    health = client.get("/health")
    assert health.status_code == 503 and health.json()["status"] == "stopped" and "WorkerKilled" in health.text
    again = client.post("/v1/images/generations", json={"prompt": "a red fox", **QUICK})
    assert again.status_code == 503 and "restart the server" in again.text


def test_health_reports_a_job_that_shows_no_progress_as_stuck(served, monkeypatch):
    client, studio = served
    release = threading.Event()

    def hangs(request, on_step=None):
        release.wait(30)  # one long device call, as far as the server can tell
        raise ValueError("released")

    monkeypatch.setattr(studio.engine, "run", hangs)
    monkeypatch.setattr(studio.config, "stuck_after", 0.3)
    job = client.post("/v1/jobs", json={"prompt": "x", **QUICK}).json()
    deadline = time.time() + 10
    while client.get("/health").status_code == 200 and time.time() < deadline:
        time.sleep(0.05)
    health = client.get("/health")
    assert health.status_code == 503 and health.json()["status"] == "stuck" and job["id"] in health.json()["error"]
    release.set()
    assert events(client, job["id"])[-1] == {"event": "failed", "job": job["id"], "error": "released"}
    assert client.get("/health").json()["status"] == "ok"


def test_n_zero_models_and_bad_references_are_answered_precisely(served):
    client, _ = served
    zero = client.post("/v1/images/generations", json={"prompt": "x", "n": 0, **QUICK})
    assert zero.status_code == 400 and "n must be between 1 and" in zero.text
    models = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in models] == ["o1-tiny"]
    good = base64.b64encode((FIXTURES / "edit_ref.png").read_bytes()).decode()
    junk = base64.b64encode(b"definitely not an image").decode()
    bad = client.post("/v1/images/edits", json={"prompt": "x", "references": [good, junk], **QUICK})
    message = bad.json()["error"]["message"]
    assert bad.status_code == 400 and message.startswith("references[1] is not a readable image")
    assert "BytesIO" not in message and "0x" not in message
    upload = client.post("/v1/images/edits", data={"prompt": "x"}, files={"image": ("x.png", b"junk", "image/png")})
    assert upload.status_code == 400 and upload.json()["error"]["message"].startswith(
        "image upload 0 'x.png' is not a readable image")


@pytest.mark.parametrize("body, needle", [
    (b'{"prompt": "x", "layout": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    (b'{"prompt": "x", "\\ud800": 1}', "unknown field(s): \\ud800"),
    (b'{"prompt": "a \\udfff fox"}', "--prompt is not valid text: a lone surrogate"),
    (b'{"prompt": "x", "references": "abc"}', 'references must be list, got "abc"'),
    (b'{"prompt": "x", "n": 1e400}', "n must be a whole number, got Infinity"),
])
def test_bodies_that_once_crashed_the_server_get_a_json_400(served, body, needle):
    client, _ = served
    response = client.post("/v1/images/generations", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400 and needle in response.json()["error"]["message"]
    assert client.get("/health").json()["status"] == "ok"


def test_prompts_over_the_token_or_character_bound_are_refused_without_growing_memory(served):
    client, _ = served
    rss = psutil.Process().memory_info().rss
    for _ in range(5):
        tokens = client.post("/v1/images/generations", json={"prompt": "\U0001F98A" * 7999, **QUICK})
        assert tokens.status_code == 400 and "tokens; HiDream-O1 takes at most" in tokens.text
        chars = client.post("/v1/images/generations", json={"prompt": "x" * (prompts.MAX_PROMPT_CHARS + 1)})
        assert chars.status_code == 400 and "characters; at most" in chars.text
    assert psutil.Process().memory_info().rss - rss < 200 * 2**20
    assert client.get("/health").json()["queue"] == {"running": False, "waiting": 0}


HANGING_SERVE = """
import time
from hidream_mlx.families.o1.engine import Engine
def run(self, request, on_step=None):  # a render stuck inside one device call: no step boundary comes
    time.sleep(600)
Engine.run = run
from hidream_mlx.cli import main
main()
"""


def test_sigterm_ends_the_server_within_seconds_while_a_render_never_reaches_a_step(tmp_path):
    port, out = free_port(), tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", HANGING_SERVE, "serve", "--model", str(FIXTURES), "--dtype",
                             "float32", "--port", str(port), "--output-dir", str(out)],
                            stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert proc.poll() is None and time.time() < deadline, "the server did not start"
                time.sleep(0.2)
        job = httpx.post(f"{url}/v1/jobs", json={"prompt": "x", **QUICK}).json()
        while httpx.get(f"{url}/v1/jobs/{job['id']}").json()["state"] != "running":
            time.sleep(0.05)
        started = time.time()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
        took = time.time() - started
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM and took < 30, stderr
    assert "stopped by SIGTERM: the running render was cancelled" in stderr and "Traceback" not in stderr
    assert [p.name for p in out.iterdir()] == [] and not os.path.exists(out / "references")


def test_a_rank_zero_lora_in_the_lora_folder_is_a_400_before_queueing_and_the_server_keeps_serving(
        served, monkeypatch, tmp_path):
    client, studio = served
    path, key = rank_zero(tmp_path)
    path.rename(tmp_path / "empty.safetensors")
    monkeypatch.setattr(studio.config, "lora_dir", tmp_path)
    response = client.post("/v1/images/generations", json={"prompt": "x", "lora": "empty", **QUICK})
    message = response.json()["error"]["message"]
    assert response.status_code == 400 and f"{key}.lora_down.weight has rank 0" in message
    assert str(tmp_path) not in message and message.startswith("--lora-dir/empty.safetensors")
    assert client.post("/v1/images/generations", json={"prompt": "x", **QUICK}).status_code == 200
    assert client.get("/health").json()["status"] == "ok"
