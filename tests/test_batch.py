"""Many images per load: repeated --seed, --count, --prompt-file, output-name placeholders."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import FIXTURES
from PIL import Image

from hidream_mlx.workflow.batch import Job, expand_seeds, output_names, read_prompt_file, slug
from hidream_mlx.cli import main
from hidream_mlx.families.o1.engine import Engine
from hidream_mlx.images import read_metadata
from hidream_mlx.family import RequestError

BASE = ["generate", "--model", str(FIXTURES), "--no-snap", "--width", "256", "--height", "256",
        "--steps", "2", "--dtype", "float32"]


def run(*args):
    return CliRunner().invoke(main, [*BASE, *args])


def pixels(path):
    return np.array(Image.open(path))


@pytest.fixture
def counted(monkeypatch):
    """Counts weight loads and prompt encodes."""
    calls = {"load": 0, "encode": 0}
    load, encode = Engine.load.__func__, Engine.encode

    def counting_load(cls, *args, **kwargs):
        calls["load"] += 1
        return load(cls, *args, **kwargs)

    def counting_encode(self, *args, **kwargs):
        calls["encode"] += 1
        return encode(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "load", classmethod(counting_load))
    monkeypatch.setattr(Engine, "encode", counting_encode)
    return calls


def test_two_seeds_in_one_load_match_two_separate_runs(tmp_path, counted):
    batch = run("--prompt", "a red fox", "-o", str(tmp_path / "out_{seed}.png"), "--seed", "1", "--seed", "2")
    assert batch.exit_code == 0, batch.output
    assert counted == {"load": 1, "encode": 1}  # one load, the prompt encoded once for both seeds
    assert batch.output.count("model loaded once") == 1 and "for 2 images" in batch.output
    for seed in (1, 2):
        single = run("--prompt", "a red fox", "-o", str(tmp_path / f"single_{seed}.png"), "--seed", str(seed))
        assert single.exit_code == 0, single.output
        np.testing.assert_array_equal(pixels(tmp_path / f"out_{seed}.png"), pixels(tmp_path / f"single_{seed}.png"))
        assert read_metadata(tmp_path / f"out_{seed}.png")["seed"] == seed
    assert not np.array_equal(pixels(tmp_path / "out_1.png"), pixels(tmp_path / "out_2.png"))
    assert f"wrote 2 images: {tmp_path / 'out_1.png'}, {tmp_path / 'out_2.png'}" in batch.output


def test_count_takes_the_next_seeds_and_names_without_placeholder_get_an_index(tmp_path):
    result = run("--prompt", "a red fox", "--count", "3", "--seed", "5", "-o", str(tmp_path / "fox.png"))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fox-1.png", "fox-2.png", "fox-3.png"]
    assert [read_metadata(tmp_path / f"fox-{n}.png")["seed"] for n in (1, 2, 3)] == [5, 6, 7]
    assert "[image 3/3, ETA" in result.output


def test_count_without_seed_draws_distinct_seeds_and_prints_them():
    seeds = expand_seeds((), 4)
    assert len(set(seeds)) == 4
    assert expand_seeds((9,), 2) == [9, 10] and expand_seeds((3, 1), None) == [3, 1]
    with pytest.raises(RequestError, match="at most one --seed"):
        expand_seeds((1, 2), 3)


def test_prompt_file_lines_and_jsonl_settings(tmp_path, counted):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('a red fox\n\n{"prompt": "a blue bird", "seed": 11, "steps": 1}\n', encoding="utf-8")
    result = run("--prompt-file", str(prompts), "--seed", "4", "-o", str(tmp_path / "{n}_{prompt}_{seed}.png"))
    assert result.exit_code == 0, result.output
    assert counted["load"] == 1 and counted["encode"] == 2
    fox, bird = read_metadata(tmp_path / "1_a-red-fox_4.png"), read_metadata(tmp_path / "2_a-blue-bird_11.png")
    assert (fox["prompt"], fox["steps"]) == ("a red fox", 2)
    assert (bird["prompt"], bird["seed"], bird["steps"]) == ("a blue bird", 11, 1)


@pytest.mark.parametrize("content, args, message", [
    (None, ["--prompt-file", "{d}/missing.txt"], "missing.txt: no such prompt file"),
    ("", ["--prompt-file", "{d}/p.txt"], "p.txt: no prompts in this file"),
    ('fox\n{"prompt": "x", "stepz": 2}\n', ["--prompt-file", "{d}/p.txt"], "p.txt:2: unknown key 'stepz'"),
    (None, ["--prompt", "x", "--seed", "1", "--seed", "1", "-o", "{d}/a_{seed}.png"], "would both be written"),
    (None, ["--prompt", "x", "-o", "{d}/a_{sed}.png"], "unknown placeholder {sed}"),
    (None, ["--prompt", "x", "--seed", "1", "--seed", "2", "-o", "{d}/a.gif"], "unsupported image extension"),
    (None, ["--prompt", "x", "--recipe", "dev", "--negative-prompt", "blur"], "--negative-prompt needs CFG"),
    (None, ["--prompt", "x", "--prompt-file", "{d}/p.txt"], "--prompt or --prompt-file, not both"),
    (None, [], "--prompt is required"),
])
def test_bad_batch_input_is_one_line_and_writes_nothing(tmp_path, content, args, message):
    if content is not None:
        (tmp_path / "p.txt").write_text(content, encoding="utf-8")
    before = sorted(tmp_path.iterdir())
    result = run(*[a.replace("{d}", str(tmp_path)) if a.startswith("{d}") else a for a in args])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert sorted(tmp_path.iterdir()) == before


def test_existing_target_in_a_batch_is_refused_before_any_image(tmp_path):
    (tmp_path / "b-2.png").write_bytes(b"keep")
    result = run("--prompt", "x", "--seed", "1", "--seed", "2", "-o", str(tmp_path / "b.png"))
    assert result.exit_code == 1 and "b-2.png: already exists" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b-2.png"]


def test_names_and_slugs():
    jobs = [Job(1, "A Red Fox, at dawn!", 3), Job(2, "A Red Fox, at dawn!", 4)]
    assert slug("A Red Fox, at dawn!") == "a-red-fox-at-dawn" and slug("!!!") == "prompt"
    assert len(slug("word " * 40)) <= 40
    assert [str(p) for p in output_names("x/{prompt}_{seed}.webp", jobs)] == \
        ["x/a-red-fox-at-dawn_3.webp", "x/a-red-fox-at-dawn_4.webp"]
    assert [str(p) for p in output_names("one.png", jobs[:1])] == ["one.png"]
    with pytest.raises(RequestError, match="images 1 and 2 would both be written to p_a-red-fox-at-dawn.png"):
        output_names("p_{prompt}.png", jobs)


def test_prompt_file_json_line_must_be_an_object_with_a_prompt(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"seed": 3}) + "\n", encoding="utf-8")
    with pytest.raises(RequestError, match=r"p.jsonl:1: no \"prompt\" text"):
        read_prompt_file(path)
    path.write_text("{not json\n", encoding="utf-8")
    with pytest.raises(RequestError, match="p.jsonl:1: not a JSON object"):
        read_prompt_file(path)
