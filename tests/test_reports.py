"""What a run reports: per-variant medians and speed-ups, a labelled contact sheet, and image
metrics between runs (MAD, PSNR, brightness shift, 32 px grid-energy ratio)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import FIXTURES
from PIL import Image

from hidream_mlx.harness.batteries import parse_variants, read_battery
from hidream_mlx.cli import main
from hidream_mlx.cli.eval import eval_group
from hidream_mlx.harness.evaluation import EvalRun, load_engine, plan_jobs
from hidream_mlx.harness.reports import (
    compare_runs,
    image_metrics,
    match_records,
    variant_summary,
    write_reports,
)
from hidream_mlx.harness.grid import grid_energy

BATTERY = [
    {"id": "cat", "prompt": "a ginger cat asleep on a windowsill", "size": "64x64"},
    {"id": "sky", "prompt": "a flat pale blue sky over a field", "size": "64x64"},
]


@pytest.fixture(scope="module")
def engine():
    return load_engine(str(FIXTURES), dtype="float32")


def make_run(rundir: Path, engine, variants: list[str], seeds: list[int]) -> Path:
    battery = rundir.parent / "pair.jsonl"
    battery.write_text("".join(json.dumps(line) + "\n" for line in BATTERY))
    parsed = parse_variants(variants)
    run = EvalRun(rundir, {"model": "o1-tiny", "dtype": "float32", "battery": "pair"}, parsed)
    run.start_session(engine)
    run.run(engine, plan_jobs(read_battery(battery), parsed, seeds))
    return rundir


@pytest.fixture(scope="module")
def runs(tmp_path_factory, engine):
    root = tmp_path_factory.mktemp("runs")
    two_variants = ["slow:recipe=dev,steps=4", "fast:recipe=dev,steps=2"]
    return {
        "seed42": make_run(root / "seed42", engine, two_variants, [42]),
        "seed43": make_run(root / "seed43", engine, ["slow:recipe=dev,steps=4"], [43]),
    }


def smooth_image(size=256, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(40, 200, size, dtype=np.float32)
    base = ramp[None, :, None] + ramp[:, None, None] * 0.2 + rng.normal(0, 3, (size, size, 3))
    return np.clip(base, 0, 255).astype(np.uint8)


def with_patch_grid(image: np.ndarray, strength=12.0, patch=32, seed=1) -> np.ndarray:
    """Each 32 px patch shifted by its own constant: the seams the model can leave in flat areas."""
    rng = np.random.default_rng(seed)
    offsets = rng.normal(0, strength, (image.shape[0] // patch, image.shape[1] // patch))
    field = np.kron(offsets, np.ones((patch, patch)))[:, :, None]
    return np.clip(image.astype(np.float32) + field, 0, 255).astype(np.uint8)


# --- metrics ----------------------------------------------------------------------------------------

def test_grid_energy_is_about_one_without_a_grid_and_well_above_with_one():
    clean = smooth_image()
    gridded = with_patch_grid(clean)
    assert 0.9 < grid_energy(clean) < 1.1
    assert grid_energy(gridded) > 2.0
    assert image_metrics(clean, gridded)["grid_energy_ratio"] > 2.0
    assert image_metrics(gridded, clean)["grid_energy_ratio"] < 0.5


def test_identical_images_differ_by_nothing():
    image = smooth_image()
    m = image_metrics(image, image)
    assert m["mad"] == 0 and m["psnr"] == math.inf and m["brightness_shift"] == 0
    assert m["grid_energy_ratio"] == pytest.approx(1.0)


def test_a_uniform_brightening_shows_as_shift_mad_and_finite_psnr():
    image = smooth_image()
    brighter = (image.astype(np.int16) + 10).clip(0, 255).astype(np.uint8)
    m = image_metrics(image, brighter)
    assert m["brightness_shift"] == pytest.approx(10, abs=0.1) and m["mad"] == pytest.approx(10, abs=0.1)
    assert m["psnr"] == pytest.approx(20 * math.log10(255 / 10), abs=0.1)


def test_images_of_different_sizes_compare_only_brightness_and_grid():
    m = image_metrics(smooth_image(256), smooth_image(128))
    assert m["mad"] is None and m["psnr"] is None and m["brightness_shift"] != 0


def test_matching_uses_variant_names_only_when_both_runs_have_several():
    def rec(variant, id_, seed=42):
        return {"variant": variant, "id": id_, "seed": seed}

    several = {f"{v}/{i}": rec(v, i) for v in ("a", "b") for i in ("x", "y")}
    other = {f"{v}/{i}": rec(v, i) for v in ("a", "c") for i in ("x",)}
    assert [(p[0]["variant"], p[1]["variant"]) for p in match_records(several, other)] == [("a", "a")]
    single = {"q8/x": rec("q8", "x"), "q8/y": rec("q8", "y", seed=7)}
    assert [(a["variant"], b["variant"]) for a, b in match_records(single, several)] == [("q8", "a"), ("q8", "b")]
    assert len(match_records(single, several, ignore_seed=True)) == 4


# --- runs -------------------------------------------------------------------------------------------

def test_compare_a_run_with_itself_reports_zero_difference(runs):
    rows = compare_runs(runs["seed42"], runs["seed42"])
    assert len(rows) == 4  # two prompts x two variants, matched by variant name
    assert all(r["mad"] == 0 and r["psnr"] == math.inf and r["brightness_shift"] == 0 for r in rows)


def test_compare_two_seeds_reports_a_difference(runs):
    rows = compare_runs(runs["seed42"], runs["seed43"], ignore_seed=True)
    slow = [r for r in rows if r["variant_a"] == "slow"]
    assert len(slow) == 2 and all(r["mad"] > 0 and math.isfinite(r["psnr"]) for r in slow)
    with pytest.raises(ValueError, match="no images with the same"):
        compare_runs(runs["seed42"], runs["seed43"])


def test_compare_cli_prints_a_markdown_table_and_can_write_it(runs, tmp_path):
    out = tmp_path / "cmp.md"
    result = CliRunner().invoke(eval_group, ["compare", str(runs["seed42"]), str(runs["seed42"]), "--output", str(out)])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert "| id | seed | variant A | variant B | MAD | PSNR |" in text and "| inf |" in text


def test_the_report_has_variant_medians_speedups_and_load_time(runs):
    report = write_reports(runs["seed42"]).read_text()
    assert "model load" in report and "(not in any image's time)" in report
    assert "| `slow` (baseline) |" in report and "vs. slow" in report
    assert report.count("[png](images/") == 4
    rebased = write_reports(runs["seed42"], baseline="fast").read_text()
    assert "| `fast` (baseline) |" in rebased
    with pytest.raises(ValueError, match="not a variant"):
        write_reports(runs["seed42"], baseline="nope")


def test_the_report_command_rewrites_the_report_and_the_contact_sheet(runs):
    rundir = runs["seed42"]
    (rundir / "report.md").unlink(missing_ok=True)
    (rundir / "contact_pair.png").unlink(missing_ok=True)
    result = CliRunner().invoke(eval_group, ["report", str(rundir)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(rundir / "report.md")
    report = (rundir / "report.md").read_text()
    assert "| `slow` (baseline) |" in report and (rundir / "contact_pair.png").is_file()
    rebased = CliRunner().invoke(eval_group, ["report", str(rundir), "--baseline", "fast"])
    assert rebased.exit_code == 0 and "| `fast` (baseline) |" in (rundir / "report.md").read_text()


@pytest.mark.parametrize("args, message", [
    (lambda run, tmp: ["report", str(run), "--baseline", "nope"], "--baseline 'nope' is not a variant of this run"),
    (lambda run, tmp: ["report", str(tmp)], "not an eval run folder"),
])
def test_the_report_command_refuses_in_one_line(runs, tmp_path, args, message):
    result = CliRunner().invoke(main, ["eval", *args(runs["seed42"], tmp_path)])
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output


def test_speedup_is_baseline_median_time_over_each_variants():
    records = [{"variant": v, "variant_overrides": v, "total_time": t, "seconds_per_step": t / 10,
                "peak_rss_bytes": 1, "mlx_peak_bytes": 1} for v, t in (("base", 30), ("base", 34), ("fast", 8))]
    rows = {r["variant"]: r for r in variant_summary(records, "base")}
    assert rows["base"]["total_time"] == 32 and rows["base"]["speedup"] == 1.0
    assert rows["fast"]["speedup"] == pytest.approx(4.0)


def test_the_contact_sheet_has_a_labelled_cell_per_image(runs):
    write_reports(runs["seed42"])
    with Image.open(runs["seed42"] / "contact_pair.png") as sheet:
        # two prompt rows by two variant columns of 256 px thumbnails with a label strip
        assert sheet.size == (2 * 256, 2 * (256 + 28))
        label = np.asarray(sheet.convert("L"))[256:284, :256]
    assert (label < 128).any()  # text was drawn


def _rewrite_rows(rundir: Path, change) -> None:
    path = rundir / "results.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(change(dict(r))) + "\n" for r in rows))


@pytest.mark.parametrize("field, value, named", [
    ("prompt", "a dog instead", "prompt"),
    ("width", 128, "size"),
])
def test_compare_refuses_pairs_whose_prompt_or_size_differ_unless_asked_then_marks_them(
        runs, tmp_path, field, value, named):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(runs["seed42"], other)
    _rewrite_rows(other, lambda r: {**r, field: value} if r["id"] == "cat" else r)
    with pytest.raises(ValueError, match=rf"2 images matched by id differ .*cat \({named}\)"):
        compare_runs(runs["seed42"], other)
    rows = compare_runs(runs["seed42"], other, allow_mismatch=True)
    assert {r["id"]: r["mismatch"] for r in rows} == {"cat": [named], "sky": []}
    result = CliRunner().invoke(eval_group, ["compare", str(runs["seed42"]), str(other)])
    assert result.exit_code != 0 and "not the same battery" in str(result.exception)
    marked = CliRunner().invoke(eval_group, ["compare", str(runs["seed42"]), str(other), "--allow-mismatch"])
    assert marked.exit_code == 0 and f"cat (differs: {named})" in marked.output


def test_compare_with_ignore_seed_does_not_count_the_seed_as_a_mismatch(runs):
    rows = compare_runs(runs["seed42"], runs["seed43"], ignore_seed=True)
    assert all(r["mismatch"] == [] for r in rows)
