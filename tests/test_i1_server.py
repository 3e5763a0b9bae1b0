"""`hidream-mlx serve` with a HiDream-I1 pipeline: the CLI's builder and pixels, O1 fields refused."""

import base64
import io

import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from hidream_mlx.cli import main
from i1_support import FIXTURES, golden
from server_helpers import running_server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(FIXTURES, tmp_path_factory.mktemp("served")) as (url, studio):
        yield url


def size():
    c = golden("fast_sampling.npz")
    return int(c["width"]), int(c["height"])


def test_a_request_gives_the_cli_image_and_records_the_family(server, tmp_path):
    w, h = size()
    body = {"prompt": "a red fox", "size": f"{w}x{h}", "no_snap": True, "recipe": "fast", "steps": 3, "seed": 5,
            "n": 2, "step_noise_seed": 9}
    with httpx.Client(base_url=server, timeout=120) as client:
        response = client.post("/v1/images/generations", json=body)
        assert response.status_code == 200, response.text
        data = response.json()["data"]
        health = client.get("/health").json()
    assert [d["seed"] for d in data] == [5, 6] and health["default_recipe"] == "full"
    served = np.array(Image.open(io.BytesIO(base64.b64decode(data[0]["b64_json"]))))
    out = tmp_path / "cli.png"
    result = CliRunner().invoke(main, ["generate", "--model", str(FIXTURES), "--prompt", "a red fox", "--width",
                                       str(w), "--height", str(h), "--no-snap", "--recipe", "fast", "--steps", "3",
                                       "--seed", "5", "--step-noise-seed", "9", "--dtype", "float32", "-o", str(out)])
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(served, np.array(Image.open(out)))


@pytest.mark.parametrize("field,value,flag", [("blend_seams", 2, "--blend-seams"), ("noise", "mlx", "--noise"),
                                              ("recipe", "dev-2604", "--recipe"),
                                              ("seam_smoothing", 0.5, "--seam-smoothing"),
                                              ("seam_window", "mean", "--seam-window"),
                                              ("layout", "[[0, 1, 0, 1]]", "--layout"),
                                              ("keep_aspect", True, "--keep-aspect"),
                                              ("references", "png", "--ref")])
def test_o1_fields_are_a_400_naming_the_option(server, field, value, flag):
    w, h = size()
    if field == "references":  # one real image, so the refusal is about I1, not the upload
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), "red").save(buffer, format="PNG")
        value = [base64.b64encode(buffer.getvalue()).decode()]
    response = httpx.post(f"{server}/v1/images/generations", timeout=60,
                          json={"prompt": "a fox", "size": f"{w}x{h}", "no_snap": True, field: value})
    assert response.status_code == 400 and flag in response.json()["error"]["message"]


def test_a_lora_by_name_is_checked_before_queueing_and_changes_the_image(tmp_path):
    from test_i1_lora import lora_tensors, transformer, write_lora  # the LoRA files those tests build

    loras = tmp_path / "loras"
    write_lora(loras, lora_tensors(transformer(), scale=1.0), "kohya").rename(loras / "style.safetensors")
    (loras / "wrong.safetensors").write_bytes((loras / "style.safetensors").read_bytes().replace(
        b"lora_unet_double_stream_blocks_0", b"lora_unet_double_stream_blocks_9"))
    w, h = size()
    body = {"prompt": "a red fox", "size": f"{w}x{h}", "no_snap": True, "recipe": "fast", "steps": 2, "seed": 5}
    with running_server(FIXTURES, tmp_path / "out", lora_dir=loras) as (url, _):
        with httpx.Client(base_url=url, timeout=120) as client:
            plain = client.post("/v1/images/generations", json=body)
            styled = client.post("/v1/images/generations", json={**body, "lora": ["style"]})
            wrong = client.post("/v1/images/generations", json={**body, "lora": ["wrong"]})
    assert plain.status_code == 200 and styled.status_code == 200, styled.text
    assert styled.json()["data"][0]["b64_json"] != plain.json()["data"][0]["b64_json"]
    assert wrong.status_code == 400 and "--lora-dir" in wrong.json()["error"]["message"]


def test_job_progress_carries_x0_previews(server):
    w, h = size()
    body = {"prompt": "a red fox", "size": f"{w}x{h}", "no_snap": True, "recipe": "full", "steps": 3, "seed": 2}
    with httpx.Client(base_url=server, timeout=120) as client:
        job = client.post("/v1/jobs", json=body).json()
        with client.stream("GET", f"/v1/jobs/{job['id']}/events") as response:
            events = [line for line in response.iter_lines() if line.startswith("data: ")]
    previews = [e for e in events if '"preview": "data:image/jpeg;base64,' in e and '"event": "progress"' in e]
    assert len(previews) == 2 and any('"event": "done"' in e for e in events)
