"""The server and the studio page starting from an image: ``/v1/images/edits`` takes ``image``,
``mask`` and ``strength`` as the OpenAI edits endpoint names them; JSON bodies carry ``init_image``
and ``mask`` as base64. A served image equals the CLI's from the same files."""

import base64
import io

import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import FIXTURES as O1_FIXTURES
from i1_support import FIXTURES as I1_FIXTURES
from i1_support import golden
from PIL import Image
from server_helpers import running_server

from hidream_mlx.cli import main
from hidream_mlx.images import read_metadata

O1_SIZE = (320, 256)


def png(pixels) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def picture(width, height, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def half_mask(width, height):
    mask = np.zeros((height, width), np.uint8)
    mask[:, width // 2:] = 255
    return mask


def decode(b64: str) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(base64.b64decode(b64))))


@pytest.fixture(scope="module")
def o1(tmp_path_factory):
    out = tmp_path_factory.mktemp("o1-served")
    with running_server(O1_FIXTURES, out) as (url, _):
        with httpx.Client(base_url=url, timeout=120) as client:
            yield client, out


@pytest.fixture(scope="module")
def i1(tmp_path_factory):
    out = tmp_path_factory.mktemp("i1-served")
    with running_server(I1_FIXTURES, out) as (url, _):
        with httpx.Client(base_url=url, timeout=120) as client:
            yield client, out


def o1_fields(**extra):
    return {"prompt": "a boat on a lake", "no_snap": "true", "recipe": "dev", "steps": "10", "seed": "3", **extra}


def test_edits_inpaint_from_an_uploaded_image_and_mask_as_the_cli_does(o1, tmp_path):
    client, out = o1
    source, mask = picture(*O1_SIZE), half_mask(*O1_SIZE)
    response = client.post("/v1/images/edits", data=o1_fields(strength="0.5", mask_blur="2"),
                           files={"image": ("photo.png", png(source), "image/png"),
                                  "mask": ("mask.png", png(mask), "image/png")})
    assert response.status_code == 200, response.text
    entry = response.json()["data"][0]
    meta = read_metadata(out / entry["file"])
    assert meta["references"] == [] and meta["strength"] == 0.5 and meta["steps_run"] == 5
    assert meta["init_image"]["name"].startswith("init-") and meta["mask"]["name"].startswith("mask-")
    served = decode(entry["b64_json"])
    assert np.array_equal(served[:, :O1_SIZE[0] // 2 - 2], source[:, :O1_SIZE[0] // 2 - 2])  # kept beyond the blur

    (tmp_path / "photo.png").write_bytes(png(source))
    (tmp_path / "mask.png").write_bytes(png(mask))
    cli = tmp_path / "cli.png"
    result = CliRunner().invoke(main, ["generate", "--model", str(O1_FIXTURES), "--prompt", "a boat on a lake",
                                       "--no-snap", "--recipe", "dev", "--steps", "10", "--seed", "3",
                                       "--init-image", str(tmp_path / "photo.png"), "--mask", str(tmp_path / "mask.png"),
                                       "--strength", "0.5", "--mask-blur", "2", "--dtype", "float32", "-o", str(cli)])
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.array(Image.open(cli)), served)


def test_an_image_without_strength_or_mask_is_still_an_o1_reference(o1):
    client, out = o1
    response = client.post("/v1/images/edits", data=o1_fields(steps="2", size="256x256"),
                           files={"image": ("ref.png", (O1_FIXTURES / "edit_ref.png").read_bytes(), "image/png")})
    assert response.status_code == 200, response.text
    meta = read_metadata(out / response.json()["data"][0]["file"])
    assert len(meta["references"]) == 1 and "init_image" not in meta


def test_a_json_job_carries_the_init_image_as_base64(o1):
    client, out = o1
    body = {"prompt": "a boat", "no_snap": True, "recipe": "dev", "steps": 10, "seed": 3, "strength": 0.3,
            "init_image": "data:image/png;base64," + base64.b64encode(png(picture(*O1_SIZE))).decode()}
    response = client.post("/v1/images/generations", json=body)
    assert response.status_code == 200, response.text
    meta = read_metadata(out / response.json()["data"][0]["file"])
    assert meta["steps_run"] == 3 and (meta["width"], meta["height"]) == O1_SIZE  # the source's own size


@pytest.mark.parametrize("fields,files,message", [
    ({}, {"mask": "MASK"}, "--mask needs --init-image"),
    ({"strength": "1.5"}, {"image": "IMAGE"}, "--strength must be > 0 and <= 1"),
    ({"strength": "0.3", "steps": "3"}, {"image": "IMAGE"}, "the smallest strength that runs one is 0.334"),
    ({"strength": "0.5"}, {"image": "IMAGE", "image[]": "IMAGE"}, "one image to start from"),
    ({"strength": "0.5"}, {"image": "IMAGE", "mask": "JUNK"}, "mask upload 'mask.png' is not a readable image"),
])
def test_bad_starts_are_refused_with_400_before_anything_is_queued(o1, fields, files, message):
    client, _ = o1
    uploads = {"IMAGE": png(picture(*O1_SIZE)), "MASK": png(half_mask(*O1_SIZE)), "JUNK": b"not an image"}
    form = [(key, (f"{key}.png", uploads[value], "image/png")) for key, value in files.items()]
    response = client.post("/v1/images/edits", data=o1_fields(**fields), files=form)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]


def test_an_openai_mask_with_a_transparent_hole_repaints_the_hole(o1):
    """OpenAI's edits API marks where to edit with transparency; the rest of the mask is opaque."""
    client, out = o1
    w, h = O1_SIZE
    source = picture(w, h)
    mask = np.dstack([source, np.full((h, w), 255, np.uint8)])
    mask[:, w // 2:, 3] = 0
    response = client.post("/v1/images/edits", data=o1_fields(mask_blur="0"),
                           files={"image": ("photo.png", png(source), "image/png"),
                                  "mask": ("mask.png", png(mask), "image/png")})
    assert response.status_code == 200, response.text
    served = decode(response.json()["data"][0]["b64_json"])
    assert np.array_equal(served[:, :w // 2], source[:, :w // 2])
    assert (served[:, w // 2:] != source[:, w // 2:]).mean() > 0.9
    stored = read_metadata(out / response.json()["data"][0]["file"])["mask"]["name"]
    levels = np.array(Image.open(out / "references" / stored))
    assert levels.ndim == 2 and levels[:, :w // 2].max() == 0 and levels[:, w // 2:].min() == 255


def test_an_i1_server_takes_an_uploaded_image_as_the_init_image(i1):
    client, out = i1
    case = golden("fast_sampling.npz")
    w, h = int(case["width"]), int(case["height"])
    response = client.post("/v1/images/edits",
                           data={"prompt": "a boat", "no_snap": "true", "recipe": "fast", "steps": "10", "seed": "2"},
                           files={"image": ("photo.png", png(picture(w, h)), "image/png")})
    assert response.status_code == 200, response.text
    meta = read_metadata(out / response.json()["data"][0]["file"])
    assert meta["family"] == "i1" and meta["strength"] == 0.8 and meta["steps_run"] == 8
