"""`hidream-mlx serve`: the real server on a free local port, spoken to over HTTP like any client."""

import base64
import io
import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import FIXTURES
from PIL import Image
from server_helpers import QUICK, free_port, running_server

from hidream_mlx.cli import main
from hidream_mlx.files import sha256_file
from hidream_mlx.images import read_metadata

TOKEN = "s3cret"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    out = tmp_path_factory.mktemp("served")
    with running_server(FIXTURES, out, token=TOKEN) as (url, studio):
        yield url, studio, out


@pytest.fixture()
def client(server):
    url, _, _ = server
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120) as c:
        yield c


def decode(b64: str) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(base64.b64decode(b64))))


def sse_events(client, job_id):
    events = []
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    return events


def test_openai_shaped_request_gives_the_cli_image_and_saves_it_with_metadata(client, server, tmp_path):
    _, _, out = server
    response = client.post("/v1/images/generations", json={"prompt": "a red fox", "n": 1, "model": "o1-tiny",
                                                          "response_format": "b64_json", **QUICK})
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert len(data) == 1 and data[0]["seed"] == 7
    served = decode(data[0]["b64_json"])

    cli_out = tmp_path / "cli.png"
    result = CliRunner().invoke(main, ["generate", "--model", str(FIXTURES), "--prompt", "a red fox", "--width", "256",
                                       "--height", "256", "--no-snap", "--steps", "4", "--seed", "7", "--dtype",
                                       "float32", "--output", str(cli_out)])
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(served, np.array(Image.open(cli_out)))

    saved = out / data[0]["file"]
    np.testing.assert_array_equal(np.array(Image.open(saved)), served)
    meta = read_metadata(saved)
    assert meta["seed"] == 7 and meta["prompt"] == "a red fox" and meta["steps"] == 4
    assert meta == read_metadata(cli_out)


def test_url_response_and_n_images_with_consecutive_seeds(client):
    response = client.post("/v1/images/generations", json={"prompt": "a cat", "n": 2, "response_format": "url",
                                                          **QUICK, "steps": 2})
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert [d["seed"] for d in data] == [7, 8]
    images = [client.get(d["url"]) for d in data]
    assert all(r.status_code == 200 and r.headers["content-type"] == "image/png" for r in images)
    assert not np.array_equal(*[np.array(Image.open(io.BytesIO(r.content))) for r in images])


def test_progress_arrives_as_server_sent_events_with_increasing_steps_and_previews(client):
    job = client.post("/v1/jobs", json={"prompt": "a boat", **QUICK, "steps": 8})
    assert job.status_code == 202, job.text
    events = sse_events(client, job.json()["id"])
    progress = [e for e in events if e["event"] == "progress"]
    assert [e["step"] for e in progress] == list(range(1, 9))
    assert all(e["steps"] == 8 and e["seconds_per_step"] > 0 and e["eta_seconds"] >= 0 for e in progress)
    assert progress[-1]["eta_seconds"] == 0
    previews = [e["preview"] for e in progress if "preview" in e]
    assert previews and all(p.startswith("data:image/jpeg;base64,") for p in previews)
    assert Image.open(io.BytesIO(base64.b64decode(previews[0].split(",")[1]))).format == "JPEG"
    assert [e["event"] for e in events][-2:] == ["image", "done"]


def test_two_concurrent_requests_both_complete_in_order(client, server):
    url = server[0]
    finished = []

    def post(prompt):
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120) as c:
            r = c.post("/v1/images/generations", json={"prompt": prompt, **QUICK, "steps": 6})
        finished.append((prompt, r.status_code))

    first = threading.Thread(target=post, args=("first",))
    first.start()
    while server[1].queue.running is None:
        threading.Event().wait(0.01)
    second = threading.Thread(target=post, args=("second",))
    second.start()
    first.join(120)
    second.join(120)
    assert finished == [("first", 200), ("second", 200)]


def test_a_queued_job_sees_its_place_and_cancel_stops_running_and_queued_jobs(client, server):
    running = client.post("/v1/jobs", json={"prompt": "long", **QUICK, "steps": 200}).json()
    queued = client.post("/v1/jobs", json={"prompt": "next", **QUICK}).json()
    assert queued["position"] >= 1 and queued["state"] == "queued"
    assert client.delete(f"/v1/jobs/{queued['id']}").status_code == 202
    assert client.get(f"/v1/jobs/{queued['id']}").json()["state"] == "cancelled"
    while client.get(f"/v1/jobs/{running['id']}").json()["state"] == "queued":
        threading.Event().wait(0.02)
    client.delete(f"/v1/jobs/{running['id']}")
    events = sse_events(client, running["id"])
    assert events[-1]["event"] == "cancelled"
    assert len([e for e in events if e["event"] == "progress"]) < 200
    assert client.get("/health").json()["queue"] == {"running": False, "waiting": 0}


@pytest.mark.parametrize("body, status, needle", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({"prompt": "x", "colour": "red"}).encode(), 400, "unknown field(s): colour"),
    (json.dumps({"prompt": "x", "size": "100000x100000"}).encode(), 400, "width must be between"),
    (json.dumps({"prompt": "x", "size": "big"}).encode(), 400, "size must look like"),
    (json.dumps({"prompt": "x", "n": 50}).encode(), 400, "n must be between"),
    (json.dumps({"prompt": "x", "steps": 100000}).encode(), 400, "steps must be between"),
    (json.dumps({"prompt": "x", "seed": "seven"}).encode(), 400, "seed must be a whole number"),
    (json.dumps({"prompt": "x", "layout": "/etc/passwd"}).encode(), 400, "file name is not accepted"),
    (json.dumps({"prompt": "x", "references": ["/etc/passwd"]}).encode(), 400, "server paths"),
    (json.dumps({"prompt": "x", "model": "/models/other"}).encode(), 404, "is not served here"),
    (json.dumps({"prompt": "x", "output": "/tmp/x.png"}).encode(), 400, "unknown field(s): output"),
    (json.dumps({"prompt": "x", "lora": "../../secret"}).encode(), 400, "no LoRA folder"),
    (json.dumps({"prompt": "x", "guidance": float("1e999")}).encode(), 400, "must be a finite number"),
    (json.dumps({"prompt": ""}).encode(), 400, "--prompt is empty"),
])
def test_bad_requests_get_a_json_4xx_and_the_server_keeps_serving(client, body, status, needle):
    response = client.post("/v1/images/generations", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert needle in response.json()["error"]["message"]
    assert client.get("/health").json()["status"] == "ok"


def test_a_wrong_or_missing_token_is_refused(server):
    url = server[0]
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = httpx.post(f"{url}/v1/images/generations", json={"prompt": "x"}, headers=headers)
        assert response.status_code == 401 and "token" in response.json()["error"]["message"]
        assert httpx.get(f"{url}/health", headers=headers).status_code == 401
    assert httpx.get(f"{url}/").status_code == 200  # the page itself holds nothing


def test_an_oversized_body_is_refused_before_it_is_read(client):
    response = client.post("/v1/images/generations", content=b"x" * (33 * 1024 * 1024))
    assert response.status_code == 413
    assert client.get("/health").status_code == 200


def test_a_request_the_machine_cannot_hold_is_refused_by_the_cli_fit_check(client, monkeypatch):
    monkeypatch.setattr("hidream_mlx.memory.machine_memory", lambda: 1024)
    response = client.post("/v1/images/generations", json={"prompt": "x", **QUICK})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "insufficient_memory" and "--preset quick" in response.text


def test_edits_take_a_multipart_upload_decoded_in_memory(client, server):
    ref = (FIXTURES / "edit_ref.png").read_bytes()
    fields = {"prompt": "make it blue", "size": "256x256", "no_snap": "true", "steps": "2", "seed": "3"}
    response = client.post("/v1/images/edits", data=fields, files={"image": ("ref.png", ref, "image/png")})
    assert response.status_code == 200, response.text
    entry = response.json()["data"][0]
    meta = read_metadata(server[2] / entry["file"])
    # Recorded by name and sha256 (the stored upload's), never by the server's path.
    [name] = meta["references"]
    assert meta["reference_files"] == [{"name": name, "sha256": sha256_file(server[2] / "references" / name)}]
    assert str(server[2]) not in json.dumps(meta) and str(server[2]) not in response.text

    as_json = client.post("/v1/images/edits", json={"prompt": "make it blue", "size": "256x256", "no_snap": True,
                                                   "steps": 2, "seed": 3,
                                                   "references": [base64.b64encode(ref).decode()]})
    assert as_json.status_code == 200, as_json.text
    np.testing.assert_array_equal(decode(as_json.json()["data"][0]["b64_json"]), decode(entry["b64_json"]))

    broken = client.post("/v1/images/edits", data=fields, files={"image": ("x.png", b"not an image", "image/png")})
    assert broken.status_code == 400 and "not a readable image" in broken.json()["error"]["message"]


def test_models_and_health_describe_the_loaded_model(client):
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and "o1-tiny" in [m["id"] for m in models["data"]]
    assert str(FIXTURES) not in json.dumps(models)  # the server's own paths stay private
    health = client.get("/health").json()
    assert health["model"] == "o1-tiny" and health["dtype"] == "float32" and "quantization" in health
    assert health["memory"]["process_rss_bytes"] > 0


def test_serve_refuses_a_public_host_without_a_token():
    result = CliRunner().invoke(main, ["serve", "--model", str(FIXTURES), "--host", "0.0.0.0"])
    assert result.exit_code != 0 and "--token" in result.output


def test_a_negative_prompt_needs_cfg_as_on_the_cli(client):
    response = client.post("/v1/images/generations", json={"prompt": "x", "negative_prompt": "blur", "guidance": 1,
                                                          **QUICK})
    assert response.status_code == 400 and "needs CFG" in response.json()["error"]["message"]


def test_sigterm_cancels_the_running_job_and_exits_cleanly_with_nothing_half_written(tmp_path):
    """The real ``hidream-mlx serve`` process, stopped mid-render."""
    port = free_port()
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", "from hidream_mlx.cli import main; main()", "serve", "--model",
                             str(FIXTURES), "--dtype", "float32", "--port", str(port), "--output-dir", str(out)],
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
        job = httpx.post(f"{url}/v1/jobs", json={"prompt": "long", **QUICK, "steps": 200}).json()
        while httpx.get(f"{url}/v1/jobs/{job['id']}").json()["state"] != "running":
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    # The CLI's convention for a stop signal (128 + signum), after an orderly shutdown.
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "Application shutdown complete" in stderr and "Traceback" not in stderr
    assert [p.name for p in out.iterdir()] == []  # the cancelled render left no file, whole or partial


def test_loras_are_chosen_by_name_from_the_lora_folder_and_undone_after_the_job(client, server, tmp_path,
                                                                                monkeypatch):
    from test_lora import fresh, lora_tensors, write_lora

    write_lora(tmp_path / "made", lora_tensors(fresh(), 1), "kohya_unet").rename(tmp_path / "style.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    monkeypatch.setattr(server[1].config, "lora_dir", tmp_path)
    for name in ("../style", str(tmp_path / "style.safetensors"), "other"):
        response = client.post("/v1/images/generations", json={"prompt": "x", "lora": name, **QUICK})
        assert response.status_code == 400 and "unknown LoRA" in response.json()["error"]["message"]
    broken = client.post("/v1/images/generations", json={"prompt": "x", "lora": "broken", **QUICK})
    assert broken.status_code == 400 and str(tmp_path) not in broken.text

    plain = client.post("/v1/images/generations", json={"prompt": "x", **QUICK}).json()["data"][0]
    styled = client.post("/v1/images/generations", json={"prompt": "x", "lora": ["style"], "lora_scale": 0.5,
                                                        **QUICK}).json()["data"][0]
    after = client.post("/v1/images/generations", json={"prompt": "x", **QUICK}).json()["data"][0]
    assert not np.array_equal(decode(styled["b64_json"]), decode(plain["b64_json"]))
    np.testing.assert_array_equal(decode(after["b64_json"]), decode(plain["b64_json"]))
    loras = read_metadata(server[2] / styled["file"])["loras"]
    assert [(x["name"], x["scale"]) for x in loras] == [("style.safetensors", 0.5)]
    assert "loras" not in read_metadata(server[2] / after["file"])


def test_the_cli_imports_no_server_stack_until_serve_runs():
    code = "import sys, hidream_mlx.cli; print(sorted(m for m in ('starlette', 'uvicorn') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"


def test_serve_without_the_extra_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if the serve extra were not installed
    result = CliRunner().invoke(main, ["serve", "--model", str(FIXTURES)])
    assert result.exit_code == 1 and "pip install 'hidream-mlx[serve]'" in result.output
    assert "Traceback" not in result.output
