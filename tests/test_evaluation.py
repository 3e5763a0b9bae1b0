"""The eval harness: batteries and variants are validated up front, every image is measured and
logged as soon as it is done, and an interrupted run resumes with only the missing images."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import FIXTURES

from hidream_mlx.files import sha256_file
from hidream_mlx.harness import evaluation
from hidream_mlx.harness.batteries import (
    DEFAULT_VARIANT,
    parse_seeds,
    parse_variant,
    parse_variants,
    read_battery,
    read_variants_file,
)
from hidream_mlx.cli import eval as eval_cli
from hidream_mlx.cli.eval import eval_group
from hidream_mlx.harness.evaluation import EvalRun, load_engine, plan_jobs, read_results
from hidream_mlx.memory import ru_maxrss_bytes

BATTERIES = Path(__file__).parent.parent / "evals" / "batteries"
STEPS = 3
VARIANTS = [f"three:recipe=dev,steps={STEPS}", "two:recipe=dev,steps=2,size=64x64"]


def write_battery(tmp_path: Path, lines: list) -> Path:
    path = tmp_path / "mini.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


MINI = [
    {"id": "cat", "prompt": "a ginger cat asleep on a windowsill", "genre": "photo", "size": "64x64"},
    {"id": "sky", "prompt": "a flat pale blue sky over a field", "genre": "landscape", "seed": 7, "size": "128x64"},
]


@pytest.fixture(scope="module")
def engine():
    return load_engine(str(FIXTURES), dtype="float32")


def start_run(rundir: Path, battery: Path, engine, variants=VARIANTS, seeds=None):
    parsed = parse_variants(list(variants))
    run = EvalRun(rundir, {"model": "o1-tiny", "dtype": "float32", "quantize": None, "battery": battery.stem},
                  parsed)
    run.start_session(engine)
    return run, plan_jobs(read_battery(battery), parsed, seeds)


# --- batteries ------------------------------------------------------------------------------------

def test_battery_lines_carry_prompt_and_optional_settings(tmp_path):
    items = read_battery(write_battery(tmp_path, MINI + [""]))  # blank lines are skipped
    assert [i.id for i in items] == ["cat", "sky"]
    assert items[1].seed == 7 and items[1].size == (128, 64) and items[0].seed is None


@pytest.mark.parametrize("bad_line, message", [
    ('{"id": "x", "prompt": "a dog"', "not valid JSON"),
    ({"id": "x"}, "missing 'prompt'"),
    ({"id": "x", "prompt": "a dog", "sead": 3}, "unknown field 'sead'"),
    ({"id": "x", "prompt": "a dog", "size": "big"}, "size must look like"),
    ({"id": "x", "prompt": "a dog", "steps": 0}, "steps must be a positive integer"),
    ({"id": "x", "prompt": "a dog", "recipe": "turbo"}, "unknown recipe"),
    ({"id": "cat", "prompt": "a dog"}, "id 'cat' already used on line 1"),
    ({"id": "a/b", "prompt": "a dog"}, "id 'a/b'"),
])
def test_a_malformed_battery_line_is_named_by_its_line_number(tmp_path, bad_line, message):
    path = write_battery(tmp_path, [MINI[0], MINI[1], bad_line])
    with pytest.raises(ValueError, match=message) as err:
        read_battery(path)
    assert f"{path}:3:" in str(err.value)


def test_the_shipped_batteries_parse_and_plan():
    showcase = read_battery(BATTERIES / "showcase.jsonl")
    assert len(showcase) == 10 and len({i.genre for i in showcase}) == 10
    stress = read_battery(BATTERIES / "stress.jsonl")
    assert len(stress) >= 10 and all(i.note for i in stress)
    sweep = read_battery(BATTERIES / "speed_sweep.jsonl")
    variants = parse_variants(read_variants_file(BATTERIES / "speed_sweep.variants"))
    assert len(sweep) == 1 and sweep[0].seed == 42
    jobs = plan_jobs(sweep, variants)
    requests = [job.request("dev") for job in jobs]
    assert variants[0].name == "s50_g5_2048" and requests[0].recipe.steps == 50
    snapped = next(r for j, r in zip(jobs, requests) if j.variant.name == "s20_g5_1024_snapped")
    assert (snapped.width, snapped.height) == (2048, 2048) and "snapped" in snapped.size_note


# --- variants -------------------------------------------------------------------------------------

def test_a_variant_is_a_name_and_typed_overrides():
    v = parse_variant("s20_g5:steps=20,guidance=5,size=1536x1536,snap=true,noise=mlx,blend_seams=1")
    assert v.name == "s20_g5"
    assert v.overrides == {"steps": 20, "guidance": 5.0, "size": (1536, 1536), "snap": True, "noise": "mlx",
                           "blend_seams": 1}
    assert parse_variant(v.spec()) == v
    assert parse_variants([]) == [DEFAULT_VARIANT]


@pytest.mark.parametrize("spec, message", [
    ("fast:stepz=3", "unknown key 'stepz'"),
    ("fast:steps=three", "steps must be an integer"),
    ("fast:guidance=-1", "guidance must be at least 0"),
    ("fast:snap=maybe", "snap must be true or false"),
    ("fast:steps", "steps needs a value"),
    ("bad name:steps=3", "variant name"),
])
def test_bad_variants_fail_with_a_clear_message(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_variant(spec)


def test_duplicate_variant_names_and_bad_seeds_are_refused():
    with pytest.raises(ValueError, match="more than once"):
        parse_variants(["a:steps=2", "a:steps=3"])
    assert parse_seeds("42, 43,42") == [42, 43]
    with pytest.raises(ValueError, match="--seeds"):
        parse_seeds("42,x")


def test_settings_layer_defaults_then_battery_line_then_variant(tmp_path):
    items = read_battery(write_battery(tmp_path, MINI))
    jobs = plan_jobs(items, parse_variants(VARIANTS), seeds=[1, 2])
    assert [(j.item.id, j.seed, j.variant.name) for j in jobs[:4]] == [
        ("cat", 1, "three"), ("cat", 1, "two"), ("cat", 2, "three"), ("cat", 2, "two")]
    sky_two = next(j for j in jobs if j.key == "two/sky/1").request("full")
    assert (sky_two.width, sky_two.height) == (64, 64)  # the variant's size beats the line's
    sky_three = next(j for j in jobs if j.key == "three/sky/2").request("full")
    assert (sky_three.width, sky_three.height, sky_three.recipe.steps) == (128, 64, STEPS)
    assert "free size" in sky_three.size_note


def test_unknown_variant_key_fails_before_any_model_is_loaded(tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(eval_cli, "load_engine", no_loading)  # the name the command calls
    battery = write_battery(tmp_path, MINI)
    result = CliRunner().invoke(eval_group, ["--battery", str(battery), "--model", str(FIXTURES),
                                             "--variant", "a:stepz=3", "--output", str(tmp_path / "run")])
    assert isinstance(result.exception, ValueError)
    assert "unknown key 'stepz'" in str(result.exception)
    assert not (tmp_path / "run").exists()


# --- running --------------------------------------------------------------------------------------

def test_a_run_logs_every_image_with_its_measurements(tmp_path, engine):
    battery = write_battery(tmp_path, MINI)
    rundir = tmp_path / "run"
    run, jobs = start_run(rundir, battery, engine)
    made = run.run(engine, jobs, warmup=True)
    assert len(made) == 4
    records = read_results(rundir)
    assert set(records) == {"three/cat/42", "two/cat/42", "three/sky/7", "two/sky/7"}
    for r in records.values():
        assert len(r["step_times"]) == r["steps"] == {"three": STEPS, "two": 2}[r["variant"]]
        assert all(t > 0 for t in r["step_times"]) and r["total_time"] >= sum(r["step_times"])
        assert r["peak_rss_bytes"] > 0 and r["mlx_peak_bytes"] > 0
        assert r["sha256"] == sha256_file(rundir / r["image"])
        assert r["settings"]["recipe_settings"]["steps"] == r["steps"]
    meta = json.loads((rundir / "run.json").read_text())
    assert meta["sessions"][0]["images"] == 4 and meta["sessions"][0]["warmup_time"] > 0
    assert meta["sessions"][0]["load_time"] == engine.load_time and meta["weight_bytes"] > 0


def test_an_interrupted_run_resumes_with_only_the_missing_images(tmp_path, engine):
    battery = write_battery(tmp_path, MINI)
    rundir = tmp_path / "run"

    def ctrl_c_after_the_first(done, todo, record):
        raise KeyboardInterrupt

    run, jobs = start_run(rundir, battery, engine)
    with pytest.raises(KeyboardInterrupt):
        run.run(engine, jobs, on_image=ctrl_c_after_the_first)
    first = read_results(rundir)
    assert list(first) == ["three/cat/42"] and (rundir / first["three/cat/42"]["image"]).is_file()

    run, jobs = start_run(rundir, battery, engine)
    made = run.run(engine, jobs)
    assert [r["key"] for r in made] == ["two/cat/42", "three/sky/7", "two/sky/7"]
    assert len((rundir / "results.jsonl").read_text().splitlines()) == 4
    assert run.run(engine, jobs) == []  # nothing left to do


def test_a_redefined_variant_or_a_missing_image_is_redone(tmp_path, engine):
    battery = write_battery(tmp_path, MINI[:1])
    rundir = tmp_path / "run"
    run, jobs = start_run(rundir, battery, engine, variants=["only:recipe=dev,steps=2,size=64x64"])
    run.run(engine, jobs)
    with pytest.raises(ValueError, match="variant 'only' was"):
        start_run(rundir, battery, engine, variants=["only:recipe=dev,steps=3,size=64x64"])
    (rundir / "images" / "only" / "cat_s42.png").unlink()
    run, jobs = start_run(rundir, battery, engine, variants=["only:recipe=dev,steps=2,size=64x64"])
    assert [r["key"] for r in run.run(engine, jobs)] == ["only/cat/42"]


def test_a_finished_job_counts_as_done_only_with_its_exact_settings_and_image(tmp_path):
    item = read_battery(write_battery(tmp_path, MINI[:1]))[0]
    job = plan_jobs([item], parse_variants(["v:recipe=dev,steps=2"]))[0]
    request = job.request("dev")
    (tmp_path / "x.png").write_bytes(b"png")
    record = {"image": "x.png", "settings": request.metadata()}
    assert evaluation.is_done(record, request, tmp_path)
    changed = plan_jobs([item], parse_variants(["v:recipe=dev,steps=3"]))[0].request("dev")
    assert not evaluation.is_done(record, changed, tmp_path)
    assert not evaluation.is_done({**record, "image": "gone.png"}, request, tmp_path)
    assert not evaluation.is_done(None, request, tmp_path)


def test_a_battery_line_whose_settings_changed_is_made_again(tmp_path, engine):
    rundir = tmp_path / "run"
    variants = ["only:recipe=dev,steps=2,size=64x64"]
    line = {"id": "cat", "prompt": "a ginger cat asleep on a windowsill"}
    run, jobs = start_run(rundir, write_battery(tmp_path, [line]), engine, variants=variants)
    assert len(run.run(engine, jobs)) == 1
    run, jobs = start_run(rundir, write_battery(tmp_path, [line]), engine, variants=variants)
    assert run.run(engine, jobs) == []  # unchanged: nothing to do
    edited = {**line, "prompt": "a black cat asleep on a windowsill"}
    run, jobs = start_run(rundir, write_battery(tmp_path, [edited]), engine, variants=variants)
    assert [r["prompt"] for r in run.run(engine, jobs)] == [edited["prompt"]]
    retuned = {**edited, "guidance": 0.5}
    run, jobs = start_run(rundir, write_battery(tmp_path, [retuned]), engine, variants=variants)
    assert len(run.run(engine, jobs)) == 1
    assert read_results(rundir)["only/cat/42"]["guidance"] == 0.5  # the later row is the one that counts


def test_a_run_folder_refuses_measurements_of_another_setup(tmp_path):
    EvalRun(tmp_path, {"model": "a", "dtype": "float32"}, [DEFAULT_VARIANT]).save()
    with pytest.raises(ValueError, match="dtype='float32', not 'bfloat16'"):
        EvalRun(tmp_path, {"model": "a", "dtype": "bfloat16"}, [DEFAULT_VARIANT])


def test_a_line_cut_short_by_a_hard_kill_is_redone_not_fatal(tmp_path):
    good = {"key": "v/a/1", "image": "x.png"}
    (tmp_path / "results.jsonl").write_text(json.dumps(good) + '\n{"key": "v/b/1", "ima')
    assert list(read_results(tmp_path)) == ["v/a/1"]
    evaluation.append_result(tmp_path, {"key": "v/b/1", "image": "y.png"})
    assert list(read_results(tmp_path)) == ["v/a/1", "v/b/1"]


def test_random_weights_mode_needs_no_download():
    engine = load_engine(None, random_weights="tiny", layers=1, dtype="float32")
    assert engine.model_arg == "random-tiny" and len(engine.model.language_model.layers) == 1


def test_ru_maxrss_is_reported_in_bytes():
    assert ru_maxrss_bytes() > 10 * (1 << 20)  # any Python process holds more than 10 MiB


def test_the_cli_runs_a_battery_and_reruns_nothing(tmp_path):
    battery = write_battery(tmp_path, MINI)
    args = ["--battery", str(battery), "--model", str(FIXTURES), "--dtype", "float32", "--output",
            str(tmp_path / "run")] + [a for v in VARIANTS for a in ("--variant", v)]
    first = CliRunner().invoke(eval_group, args)
    assert first.exit_code == 0, first.output
    assert (tmp_path / "run" / "report.md").is_file() and (tmp_path / "run" / "contact_mini.png").is_file()
    again = CliRunner().invoke(eval_group, args)
    assert again.exit_code == 0 and "0 images made, 4 already done" in again.output


def test_random_weights_can_be_quantized_in_memory():
    engine = load_engine(None, random_weights="tiny", layers=1, dtype="float32", quantize_bits=8)
    assert engine.quantization["bits"] == 8 and engine.quantization["group_size"] == 64
    assert engine.quantization["mode"] == "affine"  # the same block `generate -q 8` records
    assert type(engine.model.language_model.layers[0].mlp.up_proj).__name__ == "QuantizedLinear"
    assert type(engine.model.x_embedder.proj1).__name__ == "Linear"


def test_a_killed_process_loses_nothing_finished(tmp_path):
    """SIGKILL mid-run (no clean-up at all), then the same command finishes only what is missing."""
    import signal
    import subprocess
    import sys
    import time

    battery = write_battery(tmp_path, [{"id": f"p{i}", "prompt": f"prompt number {i}"} for i in range(4)])
    rundir = tmp_path / "run"
    command = [sys.executable, str(Path(__file__).parents[1] / "evals" / "run_eval.py"), "--battery", str(battery),
               "--model", str(FIXTURES), "--dtype", "float32", "--variant", "v:recipe=dev,steps=28,size=256x256",
               "--output", str(rundir)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = rundir / "results.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (results.is_file() and results.read_text().count("\n") >= 1):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = [json.loads(line)["key"] for line in results.read_text().splitlines() if line.endswith("}")]
    assert 1 <= len(finished) < 4

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    keys = [r["key"] for r in read_results(rundir).values()]
    assert sorted(keys) == [f"v/p{i}/42" for i in range(4)]
    assert f"{4 - len(finished)} images made" in rerun.stdout + rerun.stderr
