"""Prompts are bounded before any weight loads: in characters first (no tokenizing megabytes), then
in the model's own tokens (HiDream-O1 refuses beyond its limit and counts the prompt in the memory
fit check; HiDream-I1 truncates at its encoders' window, as the official pipeline, and says so).
A blank negative prompt is the recipe's own unconditional prompt."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import FIXTURES
from i1_support import FIXTURES as I1_FIXTURES
from PIL import Image

from hidream_mlx import memory
from hidream_mlx import requests as prompts
from hidream_mlx.families.o1 import memory as o1_memory
from hidream_mlx.families.o1 import requests as o1_requests
from hidream_mlx.cli import main
from hidream_mlx.families.i1.source import I1Source
from hidream_mlx.families.o1.prompt import MAX_PROMPT_TOKENS, load_tokenizer, prompt_tokens
from hidream_mlx.harness.batteries import Variant, read_battery
from hidream_mlx.harness.evaluation import checked_request, plan_jobs
from hidream_mlx.images import read_metadata
from hidream_mlx.requests import RequestError, build_request
from hidream_mlx.families.o1.source import ModelSource

GENERATE = ["generate", "--model", str(FIXTURES), "--no-snap", "--width", "256", "--height", "256", "--seed", "3",
            "--steps", "2", "--dtype", "float32"]


def o1():
    return ModelSource.resolve(FIXTURES)


def generate(tmp_path, *args):
    result = CliRunner().invoke(main, [*GENERATE, *args, "-o", str(tmp_path / "out.png")])
    return result, [line for line in result.output.splitlines() if line.strip()]


def test_a_prompt_over_the_character_bound_is_refused_without_counting_tokens(monkeypatch):
    def no_tokenizing(*args):
        raise AssertionError("a prompt refused by its length must not be tokenized")

    monkeypatch.setattr(o1_requests, "prompt_tokens", no_tokenizing)
    for text in ("word " * (prompts.MAX_PROMPT_CHARS // 5 + 1), "[" * (prompts.MAX_PROMPT_CHARS + 1)):
        with pytest.raises(RequestError, match=f"--prompt is {len(text):,} characters; at most "
                                               f"{prompts.MAX_PROMPT_CHARS:,} are accepted"):
            build_request(o1(), prompt=text)


FOX = "\U0001F98A"  # an emoji: one character, one or more byte-level tokens


def longest_fitting(tokenizer, unit: str = FOX) -> str:
    """The most repeats of ``unit`` whose tokens still fit MAX_PROMPT_TOKENS (counted, not assumed:
    a tokenizer may merge repeats)."""
    low, high = 1, prompts.MAX_PROMPT_CHARS // len(unit)
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if len(tokenizer.encode(unit * mid)) <= MAX_PROMPT_TOKENS else (low, mid - 1)
    return unit * low


def test_an_o1_prompt_is_counted_in_the_models_own_tokens_and_refused_beyond_the_limit():
    tokenizer = load_tokenizer(FIXTURES)
    unit = FOX
    fitting = longest_fitting(tokenizer)
    assert len(fitting) + 1 <= prompts.MAX_PROMPT_CHARS  # refused below for its tokens, not characters
    request = build_request(o1(), prompt=fitting, width=256, height=256, no_snap=True)
    alone, prefix = prompt_tokens(o1(), fitting)
    assert alone == len(tokenizer.encode(fitting)) <= MAX_PROMPT_TOKENS and request.text_tokens == prefix > alone
    over = fitting + unit
    with pytest.raises(RequestError, match=f"--prompt is {len(tokenizer.encode(over)):,} tokens; HiDream-O1 "
                                           f"takes at most {MAX_PROMPT_TOKENS:,}"):
        build_request(o1(), prompt=over)
    with pytest.raises(RequestError, match="--negative-prompt is .* tokens"):
        build_request(o1(), prompt="a fox", negative_prompt=over, recipe="full")


@pytest.mark.parametrize("how", ["prompt", "prompt file line", "JSONL prompt"])
def test_generate_refuses_an_overlong_prompt_in_one_line_before_loading(tmp_path, how):
    text = " ".join(["fox"] * 30_000)
    if how == "prompt":
        result, lines = generate(tmp_path, "--prompt", text)
        where = ""
    else:
        path = tmp_path / "prompts.txt"
        path.write_text(text if how == "prompt file line" else '{"prompt": "%s"}' % text, encoding="utf-8")
        result, lines = generate(tmp_path, "--prompt-file", str(path))
        where = f"{path}:1: "
    assert result.exit_code == 1 and lines == [f"error: {where}--prompt is {len(text):,} characters; at most "
                                               f"{prompts.MAX_PROMPT_CHARS:,} are accepted; shorten it"]
    assert not (tmp_path / "out.png").exists()


def test_the_memory_fit_check_counts_the_prompts_length(tmp_path, monkeypatch):
    source = o1()
    short = o1_memory.predict_peak_bytes(1 << 20, source.config.text, 256, 256, False, text_tokens=20,
                                      dtype_bytes=4, fused_attention=False)
    long = o1_memory.predict_peak_bytes(1 << 20, source.config.text, 256, 256, False, text_tokens=MAX_PROMPT_TOKENS,
                                     dtype_bytes=4, fused_attention=False)
    assert long > short
    weights = sum(s.nbytes for s in o1_memory.checkpoint_sizes(source, 4)[0].values())
    between = weights + (short + long) // 2 - (1 << 20)
    monkeypatch.setattr(memory, "machine_memory", lambda: between)
    result, lines = generate(tmp_path, "--prompt", longest_fitting(load_tokenizer(FIXTURES)), "--recipe", "dev")
    assert result.exit_code == 1 and len(lines) == 1 and "this run needs about" in lines[0]
    result, _ = generate(tmp_path, "--prompt", "a red fox", "--recipe", "dev")  # no CFG, as predicted above
    assert result.exit_code == 0, result.output


def test_an_i1_prompt_longer_than_the_encoders_window_runs_truncated_with_a_note():
    source = I1Source.resolve(I1_FIXTURES)
    notes = []
    long = "a red fox in the snow, " * 40
    request = build_request(source, prompt=long, seed=1, note=notes.append)
    assert request.prompt == long  # the encoders truncate, as the official pipeline's do
    assert len(notes) == 1 and notes[0].startswith("note: --prompt is longer than the 128 tokens HiDream-I1's text "
                                                   "encoders read (") and "Llama" in notes[0]
    short = []
    build_request(source, prompt="a red fox", seed=1, note=short.append)
    assert short == []


@pytest.mark.parametrize("blank", [" ", "", "\t  "])
def test_a_blank_negative_prompt_is_the_recipes_own_unconditional_prompt(tmp_path, blank):
    plain, _ = generate(tmp_path, "--prompt", "a red fox", "--recipe", "full")
    assert plain.exit_code == 0, plain.output
    (tmp_path / "out.png").rename(tmp_path / "plain.png")
    result, _ = generate(tmp_path, "--prompt", "a red fox", "--recipe", "full", "--negative-prompt", blank)
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(np.array(Image.open(tmp_path / "out.png")),
                                  np.array(Image.open(tmp_path / "plain.png")))
    assert "negative_prompt" not in read_metadata(tmp_path / "out.png")
    assert build_request(I1Source.resolve(I1_FIXTURES), prompt="x", negative_prompt=blank,
                         guidance=5).negative_prompt is None


def test_a_battery_prompt_gets_the_same_token_limit_naming_its_line(tmp_path):
    fox = FOX * (prompts.MAX_PROMPT_CHARS - 1)  # within the character bound, far beyond the token limit
    path = tmp_path / "b.jsonl"
    path.write_text(json.dumps({"id": "ok", "prompt": "a fox"}) + "\n" + json.dumps({"id": "long", "prompt": fox}),
                    encoding="utf-8")
    jobs = plan_jobs(read_battery(path), [Variant("default")])
    assert checked_request(jobs[0], o1()).prompt == "a fox"
    with pytest.raises(ValueError, match=rf"{path}:2 \(id long\): --prompt is [\d,]+ tokens; HiDream-O1 takes at most"):
        checked_request(jobs[1], o1())
