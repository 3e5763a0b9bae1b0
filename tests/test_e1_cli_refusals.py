"""What a HiDream-E1 edit cannot run is refused in one `error:` line before any weight loads: no
source or several, a base that is no HiDream-I1-Full pipeline, the other families' options (an
init image or a mask: the source is --ref), numbers out of range, a size the resize rule cannot
make, an edit that will not fit; and the E1 options given to another family's model."""

from pathlib import Path

import pytest
from click.testing import CliRunner

from e1_support import FIXTURES, e1_1_budget, user_layout
from hidream_mlx.cli import main
from hidream_mlx.families.i1.e1 import engine as engine_module
from hidream_mlx.families.i1 import phases
from hidream_mlx.families.i1.e1 import memory as edit_memory
from hidream_mlx.families.i1.text_encoding import TextEncoders

REPO_FIXTURES = Path(__file__).parent / "fixtures"  # beside any E1 set HIDREAM_E1_FIXTURES names
I1_FIXTURES = REPO_FIXTURES / "i1-tiny"
O1_FIXTURES = REPO_FIXTURES / "o1-tiny"


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    return user_layout(tmp_path_factory.mktemp("e1"))


@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("weights loaded before the refusal")

    monkeypatch.setattr(engine_module, "load_transformer_planned", refuse)
    monkeypatch.setattr(phases, "load_vae", refuse)
    monkeypatch.setattr(TextEncoders, "model", refuse)


def refused(*args) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return errors[0]


def edit(layout, *extra, kind="e1_1", ref=True, base=None):
    width, height = e1_1_budget()
    args = ["generate", "--model", layout[kind], "--base", base or layout["base"], "--prompt", "Make it blue.",
            "--width", width, "--height", height, "--dtype", "float32", "--steps", 1]
    return args + (["--ref", layout["source"]] if ref else []) + list(extra)


@pytest.mark.parametrize("extra, message", [
    ([], "give it with --ref SOURCE"),
])
def test_an_edit_without_its_source_is_refused(layout, no_loading, tmp_path, extra, message):
    assert message in refused(*edit(layout, *extra, "-o", tmp_path / "x.png", ref=False))


def test_several_sources_are_refused(layout, no_loading, tmp_path):
    line = refused(*edit(layout, "--ref", layout["source"], "-o", tmp_path / "x.png"))
    assert "takes one --ref (the source image), got 2" in line


@pytest.mark.parametrize("flags, named", [
    (["--init-image", "SOURCE"], "--init-image"),
    (["--init-image", "SOURCE", "--mask", "SOURCE"], "--init-image"),
    (["--strength", "0.5"], "--strength"),
    (["--shift", "3"], "--shift"),
    (["--step-noise-seed", "2"], "--step-noise-seed"),
    (["--layout", "[[0, 1, 0, 1]]"], "--layout"),
    (["--keep-aspect"], "--keep-aspect"),
    (["--blend-seams", "2"], "--blend-seams"),
    (["--seam-smoothing", "0.5"], "--seam-smoothing"),
    (["--noise-scale", "1.1"], "--noise-scale"),
    (["--editing-scheduler", "flash"], "--editing-scheduler"),
    (["--preset", "quick"], "--preset quick"),
    (["--recipe", "full"], "--recipe full"),
])
def test_another_family_s_option_is_refused_naming_it(layout, no_loading, tmp_path, flags, named):
    flags = [str(layout["source"]) if f == "SOURCE" else f for f in flags]
    line = refused(*edit(layout, *flags, "-o", tmp_path / "x.png"))
    assert line.startswith(f"error: {named}"), line
    if named in ("--init-image", "--strength"):
        assert "--ref" in line and "source" in line


@pytest.mark.parametrize("flags, message", [
    (["--refine-strength", "1.5"], "--refine-strength must be >= 0 and <= 1, got 1.5"),
    (["--refine-strength", "-0.1"], "--refine-strength must be >= 0 and <= 1"),
    (["--image-guidance", "-1"], "--image-guidance must be >= 0"),
    (["--image-guidance", "nan"], "--image-guidance must be a finite number"),
])
def test_numbers_out_of_range_are_refused(layout, no_loading, tmp_path, flags, message):
    assert message in refused(*edit(layout, *flags, "-o", tmp_path / "x.png"))


def test_an_exact_size_off_the_16_pixel_grid_and_an_unreadable_source_are_refused(layout, no_loading, tmp_path):
    line = refused("generate", "--model", layout["e1_full"], "--base", layout["base"], "--ref", layout["source"],
                   "--prompt", "x", "--width", 100, "--height", 96, "-o", tmp_path / "x.png")
    assert "multiple of 16" in line
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    line = refused("generate", "--model", layout["e1_1"], "--base", layout["base"], "--ref", text, "--prompt", "x",
                   "-o", tmp_path / "y.png")
    assert line.startswith("error: --ref") and "notes.png" in line


def test_a_base_that_is_not_an_i1_full_pipeline_is_refused(layout, no_loading, tmp_path):
    out = tmp_path / "x.png"
    assert "not a HiDream-I1 pipeline" in refused(*edit(layout, "-o", out, base=O1_FIXTURES))
    assert "not a HiDream-I1 pipeline" in refused(*edit(layout, "-o", out, base=layout["e1_1"]))
    assert refused(*edit(layout, "-o", out, base=tmp_path / "nowhere")).startswith("error: --base")
    dev = tmp_path / "dev"
    dev.mkdir()
    for part in layout["base"].iterdir():
        if part.name != "scheduler":
            (dev / part.name).symlink_to(part.resolve())
    (dev / "scheduler").symlink_to((I1_FIXTURES / "scheduler_dev").resolve())
    line = refused(*edit(layout, "-o", out, base=dev))
    assert "FlashFlowMatchEulerDiscreteScheduler" in line and "HiDream-I1-Full as --base" in line


def test_an_edit_that_will_not_fit_is_refused_before_loading(layout, no_loading, tmp_path, monkeypatch):
    monkeypatch.setattr(edit_memory, "machine_memory", lambda: 1024)
    line = refused(*edit(layout, "-o", tmp_path / "x.png"))
    assert "this edit needs about" in line and "--force" in line


@pytest.mark.parametrize("flags, message", [
    (["--image-guidance", "2"], "--image-guidance 2.0 is a HiDream-E1 option and means nothing for HiDream-I1"),
    (["--no-clip-cfg-norm"], "--no-clip-cfg-norm is a HiDream-E1 option"),
    (["--base", "somewhere"], "--base is for HiDream-E1 models"),
])
def test_e1_options_are_refused_for_an_i1_model(no_loading, tmp_path, flags, message):
    assert message in refused("generate", "--model", I1_FIXTURES, "--prompt", "a fox", "--width", 128, "--height",
                              128, "--no-snap", "--steps", 1, "--dtype", "float32", *flags, "-o", tmp_path / "x.png")


def test_a_reference_given_to_an_i1_model_is_still_named_as_o1_s(no_loading, tmp_path):
    line = refused("generate", "--model", I1_FIXTURES, "--prompt", "a fox", "--ref", FIXTURES / "source.png",
                   "-o", tmp_path / "x.png")
    assert "--ref is a HiDream-O1 option" in line
