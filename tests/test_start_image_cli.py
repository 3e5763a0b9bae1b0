"""`generate --init-image / --strength / --mask / --mask-blur` end to end, on both tiny models: the
summary line, refusals before any weight loads, the render size, --from-image, prompt files,
batteries and ``info IMAGE``."""

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import FIXTURES as O1_FIXTURES
from i1_support import FIXTURES as I1_FIXTURES
from i1_support import golden
from PIL import Image

from hidream_mlx.cli import main
from hidream_mlx.families import family_of
from hidream_mlx.families.i1.family import I1Family
from hidream_mlx.families.o1.family import O1Family
from hidream_mlx.families.o1.sizes import find_closest_resolution
from hidream_mlx.files import sha256_file
from hidream_mlx.harness.batteries import DEFAULT_VARIANT, read_battery
from hidream_mlx.harness.evaluation import Job, check_jobs
from hidream_mlx.images import read_metadata
from hidream_mlx.requests import build_request

MODELS = {"o1": O1_FIXTURES, "i1": I1_FIXTURES}


def size_of(family):
    if family == "o1":
        return 320, 256  # free O1 sizes: whole 32 px patches from 256 px
    case = golden("fast_sampling.npz")
    return int(case["width"]), int(case["height"])


def base(family, *args):
    extra = ["--dtype", "float32"] if family == "i1" else []
    recipe = "fast" if family == "i1" else "dev"
    return ["generate", "--model", str(MODELS[family]), "--prompt", "a boat on a lake", "--seed", "4",
            "--recipe", recipe, "--steps", "10", "--no-snap", *extra, *args]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def write_picture(path, width, height, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_half_mask(path, width, height):
    mask = np.zeros((height, width), np.uint8)
    mask[:, width // 2:] = 255
    Image.fromarray(mask).save(path)
    return path


def pixels(path):
    return np.array(Image.open(path)).astype(int)


@pytest.fixture()
def no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("weights loaded before the refusal")

    monkeypatch.setattr(O1Family, "load_engine", refuse)
    monkeypatch.setattr(I1Family, "load_engine", refuse)


# --- a run ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", MODELS)
def test_the_summary_line_says_how_many_steps_ran_and_the_image_records_its_start(family, tmp_path):
    w, h = size_of(family)
    src = write_picture(tmp_path / "photo.png", w, h)
    mask = write_half_mask(tmp_path / "mask.png", w, h)
    out = tmp_path / "out.png"
    result = invoke(*base(family, "--init-image", src, "--mask", mask, "--strength", "0.3", "--mask-blur", "2",
                          "-o", out))
    assert result.exit_code == 0, result.output
    assert f"{w}x{h} | recipe" in result.output and "| 3 of 10 steps (strength 0.3) |" in result.output
    meta = read_metadata(out)
    assert meta["init_image"] == {"name": "photo.png", "sha256": sha256_file(src)}
    assert meta["mask"] == {"name": "mask.png", "sha256": sha256_file(mask)}
    assert (meta["strength"], meta["mask_blur"], meta["steps_run"], meta["steps"]) == (0.3, 2, 3, 10)
    assert (meta["width"], meta["height"]) == (w, h)
    described = invoke("info", out).output
    assert "init image photo.png" in described and "strength 0.3 (3 of 10 steps ran)" in described
    assert "mask mask.png" in described and "blur 2 px" in described


# --- refusals: one line, exit 1, before any weight loads -----------------------------------------

REFUSALS = [
    (["--mask", "{pic}"], "--mask needs --init-image"),
    (["--init-image", "{pic}", "--strength", "0"], "--strength must be > 0 and <= 1, got 0.0"),
    (["--init-image", "{pic}", "--strength", "1.01"], "--strength must be > 0 and <= 1, got 1.01"),
    (["--init-image", "{tmp}/missing.png"], "--init-image {tmp}/missing.png: image not found"),
    (["--init-image", "{junk}"], "--init-image {junk}: not a readable image"),
    (["--init-image", "{pic}", "--mask", "{junk}"], "--mask {junk}: not a readable image"),
    (["--init-image", "{pic}", "--mask", "{tmp}"], "--mask {tmp}: is a folder"),
    (["--init-image", "{pic}", "--strength", "0.3", "--steps", "3"],
     "--strength 0.3 runs no step of 3 (int(3 x 0.3) = 0); the smallest strength that runs one is 0.334"),
    (["--init-image", "{pic}", "--mask-blur", "3"], "--mask-blur needs --mask"),
    (["--init-image", "{pic}", "--mask", "{pic}", "--mask-blur", "65"], "--mask-blur must be >= 0 and <= 64"),
]


@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("args,message", REFUSALS, ids=[r[1][:32] for r in REFUSALS])
def test_bad_start_options_are_refused_in_one_line_before_any_weight_loads(family, args, message, tmp_path,
                                                                            no_loading):
    names = {"pic": write_picture(tmp_path / "pic.png", *size_of(family)), "tmp": tmp_path,
             "junk": tmp_path / "junk.png"}
    names["junk"].write_bytes(b"GIF89a but not really")
    args = [a.format(**names) for a in args]
    out = tmp_path / "x.png"
    result = invoke(*base(family, *args, "-o", out))
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert lines[0].startswith("error: " + message.format(**names)), lines[0]
    assert not out.exists()


def test_o1_refuses_init_image_with_references_saying_which_is_for_what(tmp_path, no_loading):
    pic = write_picture(tmp_path / "pic.png", *size_of("o1"))
    result = invoke(*base("o1", "--init-image", pic, "--ref", pic, "-o", tmp_path / "x.png"))
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "--init-image cannot be combined with --ref" in result.output
    assert "reference images the model looks at" in result.output and "the picture the sampling starts" in result.output


# --- the render size -----------------------------------------------------------------------------

def resolve(family, **options):
    source = family_of(MODELS[family]).resolve(str(MODELS[family]))
    notes = []
    return build_request(source, prompt="x", seed=1, note=notes.append, **options), notes


def test_o1_renders_the_source_s_own_size_with_no_snap_and_its_closest_bucket_without(tmp_path):
    src = write_picture(tmp_path / "s.png", 384, 256)
    exact, notes = resolve("o1", init_image=str(src), no_snap=True)
    assert (exact.width, exact.height) == (384, 256) and notes == []
    snapped, _ = resolve("o1", init_image=str(src))
    assert (snapped.width, snapped.height) == find_closest_resolution(384, 256)


def test_i1_renders_the_source_through_its_area_rule(tmp_path):
    w, h = size_of("i1")
    source = family_of(I1_FIXTURES).resolve(str(I1_FIXTURES))
    square = write_picture(tmp_path / "square.png", 2 * w, 2 * w)  # square: any set's transformer takes it
    request, _ = resolve("i1", init_image=str(square))
    assert (request.width, request.height) == source.render_size(2 * w, 2 * w, True)[:2]
    exact, _ = resolve("i1", init_image=str(write_picture(tmp_path / "own.png", w, h)), no_snap=True)
    assert (exact.width, exact.height) == (w, h)


@pytest.mark.parametrize("family", MODELS)
def test_a_given_size_resizes_the_source_and_a_note_says_when_its_aspect_changes(family, tmp_path):
    w, h = size_of(family)
    half = write_picture(tmp_path / "half.png", w // 2, h // 2)
    same, notes = resolve(family, init_image=str(half), width=w, height=h, no_snap=True)
    assert (same.width, same.height) == (w, h) and notes == []
    wide = write_picture(tmp_path / "wide.png", 2 * w, h)
    stretched, notes = resolve(family, init_image=str(wide), width=w, height=h, no_snap=True)
    assert (stretched.width, stretched.height) == (w, h)
    assert len(notes) == 1 and notes[0].startswith(f"note: --init-image wide.png is {2 * w}x{h}; it is resized to {w}x{h}")


def test_no_snap_refuses_a_source_size_the_family_cannot_render_and_says_what_to_do(tmp_path, no_loading):
    src = write_picture(tmp_path / "odd.png", 300, 260)
    result = invoke(*base("o1", "--init-image", src, "-o", tmp_path / "x.png"))
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "--init-image odd.png is 300x260, which --no-snap cannot render as it is" in result.output
    assert "give --width/--height" in result.output


# --- --from-image --------------------------------------------------------------------------------

@pytest.fixture()
def made(tmp_path):
    """An O1 inpainting image with its source and mask beside it."""
    w, h = size_of("o1")
    src = write_picture(tmp_path / "photo.png", w, h)
    mask = write_half_mask(tmp_path / "mask.png", w, h)
    out = tmp_path / "made.png"
    result = invoke(*base("o1", "--init-image", src, "--mask", mask, "--strength", "0.6", "-o", out))
    assert result.exit_code == 0, result.output
    return out, src, mask


def test_from_image_re_renders_with_the_files_found_beside_it(made, tmp_path):
    out, _, _ = made
    again = tmp_path / "again.png"
    result = invoke("generate", "--model", O1_FIXTURES, "--from-image", out, "-o", again)
    assert result.exit_code == 0, result.output
    assert "init image found beside the image" in result.output and "6 of 10 steps (strength 0.6)" in result.output
    assert np.array_equal(pixels(again), pixels(out))


def test_from_image_re_renders_with_the_same_files_given_again(made, tmp_path):
    out, src, mask = made
    elsewhere = tmp_path / "moved"
    elsewhere.mkdir()
    shutil.move(out, elsewhere / out.name)
    result = invoke("generate", "--model", O1_FIXTURES, "--from-image", elsewhere / out.name, "--init-image", src,
                    "--mask", mask, "-o", tmp_path / "again.png")
    assert result.exit_code == 0, result.output
    assert np.array_equal(pixels(tmp_path / "again.png"), pixels(elsewhere / out.name))


def test_from_image_refuses_naming_the_file_when_one_is_missing_or_differs(made, tmp_path, no_loading):
    out, src, mask = made
    mask.unlink()
    missing = invoke("generate", "--model", O1_FIXTURES, "--from-image", out, "-o", tmp_path / "x.png")
    assert missing.exit_code == 1 and missing.output.count("\n") == 1
    assert "made from the mask mask.png, not found beside it with the recorded content" in missing.output
    other = write_picture(tmp_path / "other.png", *size_of("o1"), seed=5)
    differs = invoke("generate", "--model", O1_FIXTURES, "--from-image", out, "--init-image", other,
                     "-o", tmp_path / "x.png")
    assert differs.exit_code == 1 and differs.output.count("\n") == 1
    assert f"--init-image {other} differs from the init image photo.png" in differs.output


def test_from_image_of_an_i1_image_re_renders_it(tmp_path):
    w, h = size_of("i1")
    src = write_picture(tmp_path / "photo.png", w, h)
    out = tmp_path / "made.png"
    assert invoke(*base("i1", "--init-image", src, "--strength", "0.5", "-o", out)).exit_code == 0
    result = invoke("generate", "--model", I1_FIXTURES, "--from-image", out, "--dtype", "float32",
                    "-o", tmp_path / "again.png")
    assert result.exit_code == 0, result.output
    assert read_metadata(tmp_path / "again.png")["strength"] == 0.5
    assert np.array_equal(pixels(tmp_path / "again.png"), pixels(out))


# --- prompt files and batteries: paths relative to their file ------------------------------------

def test_a_prompt_file_line_starts_from_an_image_next_to_the_file(tmp_path):
    folder = tmp_path / "job"
    folder.mkdir()
    w, h = size_of("o1")
    write_picture(folder / "photo.png", w, h)
    (folder / "prompts.jsonl").write_text(json.dumps({"prompt": "a boat", "init_image": "photo.png",
                                                      "strength": 0.5}) + "\n")
    out = tmp_path / "out.png"
    result = invoke("generate", "--model", O1_FIXTURES, "--prompt-file", folder / "prompts.jsonl", "--recipe", "dev",
                    "--steps", "4", "--seed", "1", "--no-snap", "-o", out)
    assert result.exit_code == 0, result.output
    meta = read_metadata(out)
    assert meta["init_image"]["name"] == "photo.png" and meta["steps_run"] == 2 and (meta["width"], meta["height"]) == (w, h)


def test_a_prompt_file_line_with_a_bad_start_is_refused_naming_its_line(tmp_path, no_loading):
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "a boat", "mask": "m.png"}) + "\n")
    result = invoke("generate", "--model", O1_FIXTURES, "--prompt-file", tmp_path / "p.jsonl", "-o", tmp_path / "x.png")
    assert result.exit_code == 1 and f"{tmp_path / 'p.jsonl'}:1: --mask needs --init-image" in result.output


def test_a_battery_line_starts_from_an_image_relative_to_the_battery_file(tmp_path):
    folder = tmp_path / "battery"
    folder.mkdir()
    w, h = size_of("o1")
    write_picture(folder / "photo.png", w, h)
    write_half_mask(folder / "mask.png", w, h)
    line = {"id": "boat", "prompt": "a boat", "init_image": "photo.png", "mask": "mask.png", "strength": 0.5,
            "mask_blur": 2, "steps": 4, "recipe": "dev"}
    (folder / "b.jsonl").write_text(json.dumps(line) + "\n")
    item = read_battery(folder / "b.jsonl")[0]
    assert item.init_image == str(folder / "photo.png") and item.mask == str(folder / "mask.png")
    check_jobs([Job(item, DEFAULT_VARIANT, 1)], str(O1_FIXTURES))  # every request builds before loading
    request = Job(item, DEFAULT_VARIANT, 1).request(family_of(O1_FIXTURES).resolve(str(O1_FIXTURES)))
    assert (request.width, request.height) == (w, h)  # no size given: the source's
    assert (request.start.strength, request.start.mask_blur, request.run_steps) == (0.5, 2, 2)


def test_a_battery_line_with_a_strength_that_runs_no_step_is_refused_naming_the_line(tmp_path):
    write_picture(tmp_path / "photo.png", *size_of("o1"))
    line = {"id": "boat", "prompt": "a boat", "init_image": "photo.png", "strength": 0.1, "steps": 4, "recipe": "dev"}
    (tmp_path / "b.jsonl").write_text(json.dumps(line) + "\n")
    item = read_battery(tmp_path / "b.jsonl")[0]
    with pytest.raises(ValueError) as error:
        check_jobs([Job(item, DEFAULT_VARIANT, 1)], str(O1_FIXTURES))
    assert f"{tmp_path / 'b.jsonl'}:1 (id boat): --strength 0.1 runs no step of 4" in str(error.value)
