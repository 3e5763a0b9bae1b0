"""Every check that needs no weights runs before they load (#29 item 8): generate, eval, serve and
quantize refuse in one line, exit 1, with nothing loaded and nothing written."""

import json
import os
import socket

import pytest
from click.testing import CliRunner
from conftest import FIXTURES
from i1_support import FIXTURES as I1_FIXTURES

from hidream_mlx.cli import main
from hidream_mlx.cli import eval as eval_cli
from hidream_mlx.families.i1.family import I1Family
from hidream_mlx.families.o1.family import O1Family

GENERATE = ["generate", "--model", str(FIXTURES), "--prompt", "a red fox", "--no-snap", "--width", "256",
            "--height", "256", "--steps", "2", "--dtype", "float32", "--seed", "3"]
BATTERY = {"id": "cat", "prompt": "a ginger cat", "size": "64x64"}


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result, [line for line in result.output.splitlines() if line.strip()]


@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("loaded a model")

    for family in (O1Family, I1Family):
        monkeypatch.setattr(family, "load_engine", refuse)
    monkeypatch.setattr(eval_cli, "load_engine", refuse)  # the name eval calls


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    from test_lora import fresh, lora_tensors, write_lora

    return write_lora(tmp_path_factory.mktemp("lora"), lora_tensors(fresh()), "peft")


@pytest.fixture(scope="module")
def misfit_lora(tmp_path_factory):
    """A LoRA whose down matrix is one column short for the layer it names."""
    from test_lora import fresh, lora_tensors, write_lora

    tensors = {path: (A[:, :-1], B) for path, (A, B) in lora_tensors(fresh()).items()}
    return write_lora(tmp_path_factory.mktemp("misfit"), tensors, "peft")


def deep_folder(root, length: int):
    """A new folder under ``root`` whose path is ``length`` bytes long."""
    folder = root
    while len(os.fsencode(str(folder))) + 151 < length:
        folder = folder / ("d" * 150)
    folder = folder / ("e" * (length - len(os.fsencode(str(folder))) - 1))
    folder.mkdir(parents=True)
    assert len(os.fsencode(str(folder))) == length
    return folder


@pytest.mark.parametrize("flags", [["--lora-scale", "nan"], ["--lora-scale", "inf"], ["--lora-scale", "-1e400"],
                                   ["--lora-scales", "nan"], ["--lora-scale", "101"]])
def test_a_lora_scale_that_is_no_strength_is_refused_before_loading(tmp_path, lora, no_loading, flags):
    result, lines = invoke(*GENERATE, "--lora", lora, *flags, "-o", tmp_path / "o.png")
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: --lora-scale must be")
    assert list(tmp_path.iterdir()) == []


def test_a_lora_that_does_not_fit_the_model_is_refused_before_loading(tmp_path, misfit_lora, no_loading):
    result, lines = invoke(*GENERATE, "--lora", misfit_lora, "-o", tmp_path / "o.png")
    assert result.exit_code == 1 and len(lines) == 1 and str(misfit_lora) in lines[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("quality, name", [("0", "o.jpg"), ("101", "o.webp"), ("-5", "o.jpeg")])
def test_quality_out_of_range_is_refused_before_loading_with_from_image_too(tmp_path, no_loading, quality, name):
    result, lines = invoke(*GENERATE, "--quality", quality, "-o", tmp_path / name)
    assert result.exit_code == 1 and lines == [f"error: --quality must be between 1 and 100, got {quality}"]
    assert list(tmp_path.iterdir()) == []


def test_a_path_too_long_for_the_file_system_with_the_temporary_name_is_refused_before_loading(tmp_path, no_loading):
    name = "n" * 100 + ".png"  # each name fits; the whole path fits, but not with .NAME.PID.partial
    folder = deep_folder(tmp_path, os.pathconf(tmp_path, "PC_PATH_MAX") - len(name) - 10)
    out = folder / name
    result, lines = invoke(*GENERATE, "-o", out)
    assert result.exit_code == 1 and len(lines) == 1 and "the path is too long for this file system" in lines[0]
    assert list(folder.iterdir()) == []


def eval_args(tmp_path, lines, *more, model=FIXTURES):
    battery = tmp_path / "b.jsonl"
    battery.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return ["eval", "--battery", battery, "--model", model, "--dtype", "float32", "--output", tmp_path / "run", *more]


def test_eval_refuses_an_image_name_too_long_for_the_file_system_before_loading(tmp_path, no_loading):
    result, lines = invoke(*eval_args(tmp_path, [{**BATTERY, "id": "c" * 240}]))
    assert result.exit_code == 1 and len(lines) == 1 and "the file name is too long for this file system" in lines[0]
    assert not (tmp_path / "run").exists()


def test_eval_refuses_an_image_folder_that_is_a_file_before_loading(tmp_path, no_loading):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "images").write_text("mine")
    result, lines = invoke(*eval_args(tmp_path, [BATTERY]))
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert lines[0] == f"error: {tmp_path / 'run' / 'images'}: exists and is not a folder; default/cat/42's image goes there"
    assert (tmp_path / "run" / "images").read_text() == "mine"


def test_eval_refuses_an_earlier_image_that_is_a_folder_before_loading(tmp_path, no_loading):
    (tmp_path / "run" / "images" / "default" / "cat_s42.png").mkdir(parents=True)
    result, lines = invoke(*eval_args(tmp_path, [BATTERY]))
    assert result.exit_code == 1 and len(lines) == 1 and "is a folder, expected a file path" in lines[0]


@pytest.mark.parametrize("model", [FIXTURES, I1_FIXTURES])
def test_eval_reads_the_battery_s_loras_against_the_model_before_loading(tmp_path, misfit_lora, no_loading, model):
    line = {**BATTERY, "size": "64x64" if model == FIXTURES else "128x128", "loras": [{"path": str(misfit_lora)}]}
    result, lines = invoke(*eval_args(tmp_path, [line], model=model))
    assert result.exit_code == 1 and len(lines) == 1 and str(misfit_lora) in lines[0], result.output
    assert not (tmp_path / "run").exists()


def test_eval_refuses_a_battery_lora_scale_that_is_no_number(tmp_path, lora, no_loading):
    battery = tmp_path / "b.jsonl"  # JSON as Python reads it: NaN is a number there
    battery.write_text(f'{{"id": "cat", "prompt": "a cat", "loras": [{{"path": "{lora}", "scale": NaN}}]}}\n')
    result, lines = invoke("eval", "--battery", battery, "--model", FIXTURES, "--output", tmp_path / "run")
    assert result.exit_code == 1 and len(lines) == 1 and "scale must be a finite number" in lines[0], result.output
    assert not (tmp_path / "run").exists()


def test_serve_refuses_an_output_dir_that_is_a_file_before_loading(tmp_path, no_loading):
    taken = tmp_path / "taken"
    taken.write_text("mine")
    result, lines = invoke("serve", "--model", FIXTURES, "--output-dir", taken, "--port", "0")
    assert result.exit_code == 2 and len(lines) <= 3 and "is a file" in lines[-1]  # click's own check
    for folder in (taken / "sub", taken / "sub" / "deeper"):
        result, lines = invoke("serve", "--model", FIXTURES, "--output-dir", folder, "--port", "0")
        assert result.exit_code == 1 and lines == [f"error: {taken}: is not a folder, so --output-dir {folder} cannot "
                                                   "be made"], result.output
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "references").write_text("mine")
    result, lines = invoke("serve", "--model", FIXTURES, "--output-dir", tmp_path / "out", "--port", "0")
    assert result.exit_code == 1 and len(lines) == 1 and "references: exists and is not a folder" in lines[0]
    assert taken.read_text() == "mine" and (tmp_path / "out" / "references").read_text() == "mine"


def test_serve_refuses_an_address_it_cannot_listen_on_before_loading(tmp_path, no_loading):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result, lines = invoke("serve", "--model", FIXTURES, "--output-dir", tmp_path / "out", "--port", port)
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert lines[0].startswith(f"error: --host 127.0.0.1 --port {port}: cannot listen there")
    result, lines = invoke("serve", "--model", FIXTURES, "--output-dir", tmp_path / "out", "--host", "no-such-host.invalid",
                           "--token", "t")
    assert result.exit_code == 1 and len(lines) == 1 and "cannot listen there" in lines[0], result.output
    assert not (tmp_path / "out").exists()


def test_quantize_refuses_an_output_name_too_long_for_its_temporary_folder_before_reading(tmp_path):
    out = tmp_path / ("q" * 240)
    result, lines = invoke("quantize", "--model", FIXTURES, "--bits", "8", "-o", out)
    assert result.exit_code == 1 and len(lines) <= 3 and "the file name is too long for this file system" in lines[-1]
    assert "temporary name .NAME.XXXXXXXX.partial" in lines[-1] and list(tmp_path.iterdir()) == []
