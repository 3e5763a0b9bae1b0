"""HiDream-E1 through `eval` and `serve`: a battery row's "ref" (relative to the battery file) is the
source it edits, every prompt is encoded before the one load, variants set the image guidance;
the server takes the edits upload as the source (a strength is refused: an edit starts from no
init image), and the same request builder refuses what generate refuses."""

import base64
import io
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from e1_support import e1_1_budget, user_layout
from hidream_mlx.cli import main
from hidream_mlx.families.i1.e1 import engine as engine_module
from hidream_mlx.families.i1.e1.engine import E1Engine
from hidream_mlx.families.i1.text_encoding import TextEncoders
from hidream_mlx.files import sha256_file
from hidream_mlx.families.i1.e1.source import E1Source
from hidream_mlx.harness.batteries import DEFAULT_VARIANT, read_battery
from hidream_mlx.harness.evaluation import checked_request, plan_jobs, read_results
from hidream_mlx.images import read_metadata

starlette = pytest.importorskip("starlette", reason="the server is an optional extra")


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    return user_layout(tmp_path_factory.mktemp("e1"))


def write_battery(path, lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_a_battery_edits_each_row_s_source_with_one_load(layout, tmp_path, monkeypatch):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    shutil.copy(layout["source"], inputs / "photo.png")
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (80, 180, 3), dtype=np.uint8)).save(inputs / "wide.png")
    size = "{}x{}".format(*e1_1_budget())
    battery = write_battery(tmp_path / "edits.jsonl", [
        {"id": "blue", "prompt": "Make it blue.", "ref": "inputs/photo.png", "size": size, "seed": 3},
        {"id": "red", "prompt": "Make it red.", "ref": "inputs/wide.png", "size": size, "seed": 4},
    ])
    encoded, loads = [], []
    real_encode, real_load = TextEncoders.encode, engine_module.load_transformer_planned
    monkeypatch.setattr(TextEncoders, "encode", lambda self, texts: encoded.append(1) or real_encode(self, texts))
    monkeypatch.setattr(engine_module, "load_transformer_planned",
                        lambda *a, **k: loads.append(1) or real_load(*a, **k))
    rundir = tmp_path / "run"
    result = CliRunner().invoke(main, ["eval", "--battery", str(battery), "--model", str(layout["e1_1"]), "--base",
                                       str(layout["base"]), "--dtype", "float32", "--variant", "plain:steps=1",
                                       "--variant", "ig:steps=1,image_guidance=2.5", "--warmup",
                                       "--output", str(rundir)])
    assert result.exit_code == 0, result.output
    assert encoded == [1] and loads == [1]  # the warm-up (a shorter recipe) reuses both
    assert json.loads((rundir / "run.json").read_text())["sessions"][0]["warmup_time"] > 0
    rows = read_results(rundir)
    assert sorted(rows) == ["ig/blue/3", "ig/red/4", "plain/blue/3", "plain/red/4"]
    blue, red = rows["plain/blue/3"], rows["plain/red/4"]
    assert blue["settings"]["family"] == "e1" and blue["recipe"] == "e1.1"
    assert blue["settings"]["reference_files"] == [{"name": "photo.png", "sha256": sha256_file(inputs / "photo.png")}]
    assert red["settings"]["edited_size"] != red["settings"]["source_size"]
    assert rows["ig/blue/3"]["settings"]["image_guidance"] == 2.5
    meta = read_metadata(rundir / blue["image"])
    assert meta["edited_size"] == [int(s) for s in size.split("x")] and str(inputs) not in json.dumps(meta)


def test_a_row_with_a_source_and_no_size_edits_at_the_recipe_s_size(layout, tmp_path):
    shutil.copy(layout["source"], tmp_path / "photo.png")
    battery = write_battery(tmp_path / "b.jsonl", [{"id": "a", "prompt": "Make it blue.", "ref": "photo.png"}])
    [item] = read_battery(battery)
    assert item.refs == (str(tmp_path / "photo.png"),)
    for kind, size in (("e1_1", (1024, 1024)), ("e1_full", (768, 768))):
        source = E1Source.resolve(layout[kind], layout["base"])
        [request] = [checked_request(job, source) for job in plan_jobs([item], [DEFAULT_VARIANT])]
        assert (request.width, request.height) == size


def test_a_battery_row_an_e1_model_cannot_run_is_refused_naming_its_line(layout, tmp_path):
    battery = write_battery(tmp_path / "b.jsonl", [{"id": "nosource", "prompt": "Make it blue."}])
    result = CliRunner().invoke(main, ["eval", "--battery", str(battery), "--model", str(layout["e1_1"]), "--base",
                                       str(layout["base"]), "--output", str(tmp_path / "run")])
    assert result.exit_code == 1 and f"{battery}:1 (id nosource)" in result.output and "--ref" in result.output


def png_bytes(path) -> bytes:
    return path.read_bytes()


@pytest.fixture(scope="module")
def client(layout, tmp_path_factory):
    from starlette.testclient import TestClient

    from hidream_mlx.server.app import ServerConfig, create_app
    engine = E1Engine.load(layout["e1_1"], base=layout["base"], dtype="float32")
    out = tmp_path_factory.mktemp("served")
    app, studio = create_app(engine, ServerConfig(output_dir=out))
    with TestClient(app) as http:
        yield http, out


def test_the_edits_upload_is_the_source_and_the_image_records_it(client, layout):
    http, out = client
    width, height = e1_1_budget()
    response = http.post("/v1/images/edits", files={"image": ("photo.png", png_bytes(layout["source"]), "image/png")},
                         data={"prompt": "Make it blue.", "seed": "3", "steps": "1", "width": str(width),
                               "height": str(height), "image_guidance": "2", "no_clip_cfg_norm": "true"})
    assert response.status_code == 200, response.text
    entry = response.json()["data"][0]
    meta = read_metadata(out / entry["file"])
    assert meta["family"] == "e1" and meta["image_guidance"] == 2 and meta["clip_cfg_norm"] is False
    assert [r["name"] for r in meta["reference_files"]] == [next((out / "references").glob("ref-*.png")).name]
    image = Image.open(io.BytesIO(base64.b64decode(entry["b64_json"])))
    assert image.size == tuple(meta["edited_size"])


@pytest.mark.parametrize("fields, files, message", [
    ({"strength": "0.5"}, 1, "--init-image means nothing for a HiDream-E1 edit"),
    ({}, 0, "give it with --ref SOURCE"),
    ({}, 2, "takes one --ref (the source image), got 2"),
    ({"refine_strength": "2"}, 1, "--refine-strength must be >= 0 and <= 1"),
    ({"shift": "3"}, 1, "--shift means nothing for a HiDream-E1 edit"),
])
def test_what_an_edit_cannot_run_is_a_400_naming_it(client, layout, fields, files, message):
    http, _ = client
    uploads = [("image", (f"s{i}.png", png_bytes(layout["source"]), "image/png")) for i in range(files)]
    if uploads:
        response = http.post("/v1/images/edits", files=uploads, data={"prompt": "Make it blue.", "steps": "1",
                                                                      **fields})
    else:
        response = http.post("/v1/images/edits", json={"prompt": "Make it blue.", "steps": 1})
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]


def test_a_json_body_with_a_base64_reference_edits_it(client, layout):
    http, out = client
    width, height = e1_1_budget()
    data = "data:image/png;base64," + base64.b64encode(png_bytes(layout["source"])).decode()
    response = http.post("/v1/images/generations", json={"prompt": "Make it red.", "references": [data],
                                                         "steps": 1, "seed": 9, "size": f"{width}x{height}",
                                                         "refine_strength": 0})
    assert response.status_code == 200, response.text
    meta = read_metadata(out / response.json()["data"][0]["file"])
    assert meta["refine_strength"] == 0 and meta["seed"] == 9
