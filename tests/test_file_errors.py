"""Every error about a file names the file: one ``error:`` line, a non-zero exit, no traceback.

Each input file the CLI reads is fed bytes that are not UTF-8, malformed JSON and a folder in
its place; an unreadable file is simulated (the tests may run as root, which reads anything).
"""

from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import FIXTURES

from hidream_mlx.cli import main
from hidream_mlx.files import read_json_file, read_text_file

REF = str(FIXTURES / "edit_ref.png")
NOT_UTF8 = b"\xff\xfe\x00 not text\n"
SMALL = ["--no-snap", "--width", "256", "--height", "256", "--steps", "1"]


def bad_input(path: Path, kind: str) -> Path:
    if kind == "not-utf8":
        path.write_bytes(NOT_UTF8)
    elif kind == "malformed":
        path.write_text('{"bits": 4,\n', encoding="utf-8")
    else:
        path.mkdir()
    return path


def run(args) -> "object":
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_names_the_file(result, path: Path) -> None:
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    errors = [line for line in result.output.splitlines() if line.startswith(("error:", "Error:"))]
    assert len(errors) == 1, result.output
    assert str(path) in errors[0] or f"'{path}'" in errors[0], errors[0]


KINDS = ["not-utf8", "malformed", "folder"]


def _generate(tmp_path, *args):
    return ["generate", "--model", FIXTURES, "--prompt", "x", "-o", tmp_path / "o.png", *args, *SMALL]


# (name, make the command from the bad file's path and tmp_path); each reads the file before any model loads.
COMMANDS = {
    "quantize --recipe-file": lambda f, t: ["quantize", "--model", FIXTURES, "--recipe-file", f, "-o", t / "q"],
    "generate --layout FILE": lambda f, t: _generate(t, "--ref", REF, "--ref", REF, "--layout", f),
    "generate --prompt-file": lambda f, t: ["generate", "--model", FIXTURES, "--prompt-file", f,
                                            "-o", t / "o.png", *SMALL],
    "eval --battery": lambda f, t: ["eval", "--battery", f, "--model", FIXTURES, "-o", t / "run"],
    "eval --variants-file": lambda f, t: ["eval", "--battery", "evals/batteries/showcase.jsonl",
                                          "--variants-file", f, "--model", FIXTURES, "-o", t / "run"],
    "generate --ref": lambda f, t: _generate(t, "--ref", f),
    "generate --from-image": lambda f, t: ["generate", "--from-image", f, "-o", t / "o.png"],
    "info IMAGE": lambda f, t: ["info", f],
    "generate --lora": lambda f, t: _generate(t, "--lora", f),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_bad_input_file_is_named_in_one_line(tmp_path, monkeypatch, command, kind):
    monkeypatch.chdir(Path(__file__).parent.parent)  # the battery path above is relative to the repository
    suffix = ".safetensors" if "lora" in command else ".png" if command in ("generate --ref", "info IMAGE",
                                                                             "generate --from-image") else ".json"
    bad = bad_input(tmp_path / f"bad{suffix}", kind)
    result = run(COMMANDS[command](bad, tmp_path))
    assert_names_the_file(result, bad)
    assert not (tmp_path / "o.png").exists() and not (tmp_path / "q").exists()


def model_copy(tmp_path: Path) -> Path:
    """The fixture model as links, so one of its files can be replaced."""
    folder = tmp_path / "model"
    folder.mkdir()
    for item in FIXTURES.iterdir():
        if item.suffix not in (".npz", ".png"):
            (folder / item.name).symlink_to(item.resolve())
    return folder


# Any UTF-8 text is a template, so a changed chat_template.jinja is test_source's template probe.
@pytest.mark.parametrize("name, kind", [(name, kind) for name in ("config.json", "model.safetensors.index.json",
                                                                  "tokenizer.json")
                                        for kind in ("not-utf8", "malformed")] + [("chat_template.jinja", "not-utf8")])
def test_a_broken_file_in_a_model_folder_is_named(tmp_path, name, kind):
    folder = model_copy(tmp_path)
    target = folder / name
    target.unlink(missing_ok=True)
    bad_input(target, kind)
    for args in (["info", "--model", folder, "--width", "256", "--height", "256"],
                 _generate(tmp_path, "--model", folder)):
        if args[0] == "info" and name == "tokenizer.json":
            continue  # info reads headers and configs only, never the tokenizer
        assert_names_the_file(run(args), target)


def test_a_broken_image_processor_config_is_named(tmp_path):
    folder = model_copy(tmp_path)
    target = folder / "preprocessor_config.json"
    target.unlink(missing_ok=True)
    bad_input(target, "not-utf8")
    assert_names_the_file(run(_generate(tmp_path, "--model", folder, "--ref", REF)), target)


def test_an_unreadable_recipe_file_is_named(tmp_path, monkeypatch):
    recipe = tmp_path / "recipe.json"
    recipe.write_text('{"bits": 4}', encoding="utf-8")
    real = Path.read_text

    def denied(self, *args, **kwargs):
        if self == recipe:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", denied)
    result = run(["quantize", "--model", FIXTURES, "--recipe-file", recipe, "-o", tmp_path / "q"])
    assert_names_the_file(result, recipe)
    assert "not readable" in result.output


@pytest.mark.parametrize("kind, message", [("not-utf8", "not UTF-8 text"), ("malformed", "not valid JSON"),
                                           ("folder", "is a folder"), ("missing", "no such")])
def test_the_readers_say_what_is_wrong_and_where(tmp_path, kind, message):
    path = tmp_path / "thing.json"
    if kind != "missing":
        bad_input(path, kind)
    with pytest.raises((OSError, ValueError), match=message) as caught:
        read_json_file(path, "thing")
    assert str(caught.value).startswith(f"{path}: ")
    if kind == "malformed":
        assert "line 2 column 1" in str(caught.value)


def test_read_text_file_returns_utf8_text(tmp_path):
    path = tmp_path / "ok.txt"
    path.write_text("naïve café", encoding="utf-8")
    assert read_text_file(path) == "naïve café"


@pytest.mark.parametrize("kind", ["not-utf8", "malformed"])
@pytest.mark.parametrize("name", ["run.json", "results.jsonl"])
def test_a_broken_eval_run_folder_file_is_named_by_report_and_compare(tmp_path, name, kind):
    rundir = tmp_path / "run"
    rundir.mkdir()
    (rundir / "run.json").write_text("{}", encoding="utf-8")
    target = rundir / name
    target.unlink(missing_ok=True)
    if name == "results.jsonl" and kind == "malformed":
        target.write_text('{"prompt": "a row without its key"}\n', encoding="utf-8")  # whole JSON, not a record
    else:
        bad_input(target, kind)
    assert_names_the_file(run(["eval", "report", rundir]), target)
    assert_names_the_file(run(["eval", "compare", rundir, rundir, "-o", tmp_path / "c.md"]), target)


@pytest.mark.parametrize("kind", ["not-utf8", "malformed"])
def test_a_broken_hostfile_is_named_before_anything_launches(tmp_path, monkeypatch, kind):
    monkeypatch.chdir(Path(__file__).parent.parent)
    hostfile = bad_input(tmp_path / "hosts.json", kind)
    result = run(["eval", "--battery", "evals/batteries/showcase.jsonl", "--model", FIXTURES,
                  "-o", tmp_path / "run", "--hosts", hostfile])
    assert_names_the_file(result, hostfile)
    assert "launching" not in result.output and not (tmp_path / "run").exists()
