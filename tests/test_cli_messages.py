"""Small truths of the command line: every refusal is one line before anything loads, help texts
and the README say what the code does, and even an unexpected failure is one line."""

import re
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import FIXTURES

from hidream_mlx import requests as prompts
from hidream_mlx.cli import main
from hidream_mlx.families.o1.prompt import MAX_PROMPT_TOKENS
from hidream_mlx.harness.batteries import VARIANT_KEYS

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
GENERATE = ["generate", "--model", str(FIXTURES), "--prompt", "a red fox", "--no-snap", "--width", "256",
            "--height", "256", "--seed", "3", "--steps", "2", "--dtype", "float32"]


def invoke(*args):
    result = CliRunner().invoke(main, list(args))
    return result, [line for line in result.output.splitlines() if line.strip()]


@pytest.mark.parametrize("quality, name, message", [
    ("80", "out.png", "--quality applies to .jpg/.jpeg and .webp outputs; {out} is a PNG"),
    ("0", "out.jpg", "--quality must be between 1 and 100, got 0"),
    ("101", "out.webp", "--quality must be between 1 and 100, got 101"),
])
def test_quality_is_checked_before_loading_and_refused_where_it_would_be_ignored(tmp_path, quality, name, message):
    out = tmp_path / name
    result, lines = invoke(*GENERATE, "--quality", quality, "-o", str(out))
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: " + message.format(out=out))
    assert list(tmp_path.iterdir()) == []


def test_an_output_name_too_long_once_the_temporary_suffix_is_added_is_refused_before_loading(tmp_path):
    out = tmp_path / ("n" * 240 + ".png")  # fits the file system's 255 bytes, not with .NAME.PID.partial
    result, lines = invoke(*GENERATE, "-o", str(out))
    assert result.exit_code == 1 and len(lines) == 1 and "the file name is too long for this file system" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_quantize_without_bits_says_the_default_flat_plan_needs_them_as_the_readme_does(tmp_path):
    result, lines = invoke("quantize", "--model", str(FIXTURES), "-o", str(tmp_path / "q"))
    assert result.exit_code == 1 and len(lines) == 1
    assert lines[0].startswith("error: --bits is required with the flat plan (the default)")
    assert "`flat` (the default; it quantizes to the width `--bits` gives, so it needs `--bits`)" in README
    assert not (tmp_path / "q").exists()


def test_info_on_a_model_folder_says_that_a_model_goes_with_model():
    result, lines = invoke("info", str(FIXTURES))
    assert result.exit_code == 1 and lines == [f"error: {FIXTURES} is a folder; IMAGE is an image hidream-mlx wrote. "
                                               f"To describe a model, give it with --model: hidream-mlx info --model "
                                               f"{FIXTURES}"]


def test_eval_help_lists_every_variant_key_the_parser_and_readme_accept():
    text = " ".join(invoke("eval", "--help")[0].output.split())
    listed = re.search(r"keys: ([a-z_, ]+)\)", text).group(1).split(", ")
    assert listed == list(VARIANT_KEYS)
    readme = " ".join(README.split())
    assert f"(keys: {', '.join(VARIANT_KEYS)})" in readme


def test_the_prompt_limits_are_stated_in_every_help_and_the_readme():
    stated = [f"at most {prompts.MAX_PROMPT_CHARS:,} characters", f"at most {MAX_PROMPT_TOKENS:,} of its tokens"]
    for command in ("generate", "eval", "serve"):
        text = " ".join(invoke(command, "--help")[0].output.split())
        assert all(s in text for s in stated), command
    readme = " ".join(README.split())
    assert f"at most {prompts.MAX_PROMPT_CHARS:,} characters" in readme and f"more than {MAX_PROMPT_TOKENS:,} tokens" in readme


def test_a_hub_failure_is_one_line(tmp_path, monkeypatch):
    import huggingface_hub  # lazy: only this test stands in for the hub

    def unreachable(repo_id, **kwargs):
        raise OSError("Got: ConnectError: [Errno -2] Name or service not known\nAn error happened while trying "
                      "to locate the files on the Hub.\nPlease check your internet connection and try again.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    result, lines = invoke("generate", "--model", "someone/no-such-model", "--prompt", "x", "-o", str(tmp_path / "o.png"))
    assert result.exit_code == 1 and lines == [
        "error: someone/no-such-model: could not download from Hugging Face (OSError: Got: ConnectError: [Errno -2] "
        "Name or service not known)"]


def test_an_unexpected_failure_is_still_one_line_and_never_a_traceback(tmp_path, monkeypatch):
    for error in (TypeError("unsupported operand"), RecursionError("maximum recursion depth exceeded")):
        def broken(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(sys.modules["hidream_mlx.cli.generate"], "lora_memory", broken)
        result, lines = invoke(*GENERATE, "-o", str(tmp_path / "o.png"))
        assert result.exit_code == 1 and lines == [f"error: internal error ({type(error).__name__}: {error}); "
                                                   "please report it"]
    assert invoke("generate", "--help")[0].exit_code == 0  # click's own exits pass through untouched
