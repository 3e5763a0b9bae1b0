"""`hidream-mlx eval` on a HiDream-I1 pipeline: the same request builder, phases and pixels as generate."""

import json

import numpy as np
from click.testing import CliRunner
from PIL import Image

from hidream_mlx.cli import main
from hidream_mlx.harness.evaluation import read_results
from hidream_mlx.models.i1 import engine as engine_module
from hidream_mlx.models.i1.text_encoding import TextEncoders
from i1_support import FIXTURES, golden


def test_an_i1_battery_encodes_first_loads_once_and_matches_generate(tmp_path, monkeypatch):
    c = golden("fast_sampling.npz")
    size = f"{int(c['width'])}x{int(c['height'])}"
    battery = tmp_path / "mini.jsonl"
    battery.write_text("\n".join(json.dumps(line) for line in [
        {"id": "cat", "prompt": str(c["prompt"]), "size": size, "seed": 3},
        {"id": "fox", "prompt": "a red fox", "size": size, "seed": 4},
    ]) + "\n")
    encoded, loads = [], []
    real_encode, real_load = TextEncoders.encode, engine_module.load_transformer_planned
    monkeypatch.setattr(TextEncoders, "encode", lambda self, texts: encoded.append(list(texts)) or real_encode(self, texts))
    monkeypatch.setattr(engine_module, "load_transformer_planned",
                        lambda *a, **k: loads.append(1) or real_load(*a, **k))
    rundir = tmp_path / "run"
    result = CliRunner().invoke(main, ["eval", "--battery", str(battery), "--model", str(FIXTURES), "--dtype",
                                       "float32", "--variant", "fast:recipe=fast,steps=2", "--output", str(rundir)])
    assert result.exit_code == 0, result.output
    assert encoded == [[str(c["prompt"]), "a red fox"]] and loads == [1]
    rows = read_results(rundir)
    assert sorted(rows) == ["fast/cat/3", "fast/fox/4"]
    row = rows["fast/cat/3"]
    assert row["settings"]["family"] == "i1" and row["recipe"] == "fast" and row["steps"] == 2
    assert json.loads((rundir / "run.json").read_text())["weight_bytes"] > 0

    out = tmp_path / "cat.png"
    generated = CliRunner().invoke(main, ["generate", "--model", str(FIXTURES), "--prompt", str(c["prompt"]),
                                          "--width", str(int(c["width"])), "--height", str(int(c["height"])),
                                          "--no-snap", "--dtype", "float32", "--recipe", "fast", "--steps", "2",
                                          "--seed", "3", "-o", str(out)])
    assert generated.exit_code == 0, generated.output
    np.testing.assert_array_equal(np.array(Image.open(rundir / row["image"])), np.array(Image.open(out)))
