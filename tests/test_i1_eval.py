"""`hidream-mlx eval` on a HiDream-I1 pipeline: the same request builder, phases and pixels as generate."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from hidream_mlx.cli import main
from hidream_mlx.harness.evaluation import read_results
from hidream_mlx.families.i1 import engine as engine_module
from hidream_mlx.families.i1.text_encoding import TextEncoders
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
    monkeypatch.setattr(TextEncoders, "encode",
                        lambda self, texts: encoded.append(list(texts)) or real_encode(self, texts))
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


def write_battery(path, lines):
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def run_eval(battery, rundir, *args):
    return CliRunner().invoke(main, ["eval", "--battery", str(battery), "--model", str(FIXTURES), "--dtype", "float32",
                                     "--output", str(rundir), *args])


def test_seeds_times_variants_log_step_times_and_rss_report_and_resume(tmp_path, monkeypatch):
    battery = write_battery(tmp_path / "b.jsonl", [{"id": "fox", "prompt": "a red fox", "size": "128x128"}])
    rundir = tmp_path / "run"
    variants = ["--variant", "two:recipe=fast,steps=2", "--variant", "three:recipe=fast,steps=3"]
    result = run_eval(battery, rundir, "--seeds", "1,2", *variants)
    assert result.exit_code == 0, result.output
    rows = read_results(rundir)
    assert sorted(rows) == ["three/fox/1", "three/fox/2", "two/fox/1", "two/fox/2"]
    for key, row in rows.items():
        assert len(row["step_times"]) == row["steps"] == (2 if key.startswith("two") else 3)
        assert row["peak_rss_bytes"] > 0 and row["mlx_peak_bytes"] > 0 and row["seconds_per_step"] > 0
        assert (rundir / row["image"]).is_file() and row["width"] == row["height"] == 128
    assert "s/step, peak RSS" in result.output
    report = (rundir / "report.md").read_text()
    assert "two" in report and "three" in report
    assert CliRunner().invoke(main, ["eval", "report", str(rundir)]).exit_code == 0

    def no_loading(*args, **kwargs):
        raise AssertionError("a finished run loaded weights again")

    monkeypatch.setattr(engine_module, "load_transformer_planned", no_loading)
    again = run_eval(battery, rundir, "--seeds", "1,2", *variants)
    assert again.exit_code == 0, again.output
    assert "0 images made, 4 already done" in again.output


def test_a_battery_item_runs_with_its_i1_lora(tmp_path):
    from test_i1_lora import lora_tensors, transformer, write_lora

    lora = write_lora(tmp_path / "l", lora_tensors(transformer()), "kohya")
    battery = write_battery(tmp_path / "b.jsonl", [
        {"id": "plain", "prompt": "a red fox", "size": "128x128", "seed": 5},
        {"id": "styled", "prompt": "a red fox", "size": "128x128", "seed": 5, "loras": [{"path": str(lora)}]},
        {"id": "plain2", "prompt": "a red fox", "size": "128x128", "seed": 5},
    ])
    rundir = tmp_path / "run"
    result = run_eval(battery, rundir, "--variant", "v:recipe=fast,steps=2")
    assert result.exit_code == 0, result.output
    rows = read_results(rundir)
    assert rows["v/styled/5"]["loras"][0]["name"] == "lora.safetensors" and rows["v/plain/5"]["loras"] == []
    images = {k: np.array(Image.open(rundir / r["image"])) for k, r in rows.items()}
    assert not np.array_equal(images["v/plain/5"], images["v/styled/5"])
    np.testing.assert_array_equal(images["v/plain/5"], images["v/plain2/5"])  # switched back exactly


@pytest.mark.parametrize("variant, named", [
    ("smooth:recipe=fast,seam_smoothing=0.5", "--seam-smoothing"), ("blend:recipe=fast,blend_seams=2", "--blend-seams"),
    ("mlx:recipe=fast,noise=mlx", "--noise"), ("win:recipe=fast,seam_window=mean", "--seam-window"),
])
def test_o1_only_variant_settings_are_refused_naming_the_variants_file_line(tmp_path, monkeypatch, variant, named):
    def no_loading(*args, **kwargs):
        raise AssertionError("weights loaded before the refusal")

    monkeypatch.setattr(engine_module, "load_transformer_planned", no_loading)
    monkeypatch.setattr(TextEncoders, "model", no_loading)
    battery = write_battery(tmp_path / "b.jsonl", [{"id": "fox", "prompt": "a red fox", "size": "128x128"}])
    variants = tmp_path / "v.variants"
    variants.write_text(f"# sweep\nplain:recipe=fast,steps=1\n{variant}\n")
    result = run_eval(battery, tmp_path / "run", "--variants-file", str(variants))
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    name = variant.split(":")[0]
    assert lines[-1].startswith(f"error: variant '{name}' ({variants}:3): {named}"), result.output
    assert "HiDream-O1 option" in lines[-1] and "Traceback" not in result.output
    assert not (tmp_path / "run" / "results.jsonl").exists()


@pytest.mark.parametrize("line, message", [
    ({"id": "edit", "prompt": "a fox", "recipe": "dev-2604"}, "recipe"),
    ({"id": "odd", "prompt": "a fox", "size": "120x128"}, "multiples of 16"),
])
def test_battery_lines_an_i1_model_cannot_run_are_refused_naming_file_and_line(tmp_path, line, message):
    battery = write_battery(tmp_path / "b.jsonl", [{"id": "ok", "prompt": "a cat", "size": "128x128"}, line])
    result = run_eval(battery, tmp_path / "run", "--variant", "v:steps=1")
    assert result.exit_code == 1
    lines = [entry for entry in result.output.splitlines() if entry.strip()]
    assert lines[-1].startswith(f"error: {battery}:2 (id {line['id']}): ") and message in lines[-1], result.output


def test_i1_sizes_in_multiples_of_16_run_though_o1_would_refuse_them(tmp_path):
    battery = write_battery(tmp_path / "b.jsonl", [{"id": "wide", "prompt": "a fox", "size": "144x112"}])
    result = run_eval(battery, tmp_path / "run", "--variant", "v:recipe=fast,steps=1")
    assert result.exit_code == 0, result.output
    row = read_results(tmp_path / "run")["v/wide/42"]
    assert (row["width"], row["height"]) == (144, 112)
