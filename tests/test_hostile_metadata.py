"""Images whose hidream-mlx object was tampered with, and images that keep no local path (#29 items 6, 9).

`info IMAGE`, `info IMAGE --json` and `generate --from-image` read the stored object through one
schema: each broken variant is one line naming the key, exit 1, no traceback, nothing written and
nothing loaded. What an image records names the model (repo id or folder name) with its
fingerprint, and every input by file name and sha256: never a path.
"""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import FIXTURES
from i1_support import FIXTURES as I1_FIXTURES, golden
from PIL import Image, PngImagePlugin

from hidream_mlx.cli import main
from hidream_mlx.families.i1.family import I1Family
from hidream_mlx.families.o1.family import O1Family
from hidream_mlx.family import RequestError
from hidream_mlx.files import sha256_file
from hidream_mlx.images import EXIF_IMAGE_DESCRIPTION, METADATA_KEY, read_metadata
from hidream_mlx.workflow.metadata import check_image_metadata
from hidream_mlx.workflow.reproduce import recorded_location

O1 = ["generate", "--model", str(FIXTURES), "--prompt", "a red fox", "--no-snap", "--width", "256", "--height", "256",
      "--steps", "2", "--dtype", "float32", "--seed", "5"]


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result, [line for line in result.output.splitlines() if line.strip()]


def i1_args(*more, model=I1_FIXTURES):
    c = golden("fast_sampling.npz")
    return ["generate", "--model", str(model), "--prompt", str(c["prompt"]), "--width", str(int(c["width"])),
            "--height", str(int(c["height"])), "--no-snap", "--dtype", "float32", "--recipe", "fast", "--steps", "1",
            "--seed", "2", *more]


@pytest.fixture(scope="module")
def o1_image(tmp_path_factory):
    folder = tmp_path_factory.mktemp("o1")
    ref = folder / "cat.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(ref)
    out = folder / "made.png"
    result, _ = invoke(*O1, "--recipe", "dev", "--ref", ref, "-o", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def i1_image(tmp_path_factory):
    out = tmp_path_factory.mktemp("i1") / "made.png"
    result, _ = invoke(*i1_args("-o", out))
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def no_loading(monkeypatch):
    """Any weight load fails the test: every refusal here comes before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("loaded a model")

    for family in (O1Family, I1Family):
        monkeypatch.setattr(family, "load_engine", refuse)


def tampered(image, folder, change, name="t.png") -> str:
    """A copy of ``image`` whose stored object is ``change(meta)`` (or the raw text ``change`` gives)."""
    meta = read_metadata(image)
    new = change(meta)
    text = new if isinstance(new, str) else json.dumps(meta if new is None else new)
    info = PngImagePlugin.PngInfo()
    info.add_text(METADATA_KEY, text)
    out = folder / name
    with Image.open(image) as im:
        im.save(out, pnginfo=info)
    return out


def setting(key, value):
    def change(meta):
        meta[key] = value
    return change


def deleting(key):
    def change(meta):
        del meta[key]
    return change


def raw(text):
    return lambda meta: text


# (change, what the one line says after "error: IMAGE: ")
O1_VARIANTS = {
    "null": (raw("null"), "its hidream-mlx metadata is null, not the JSON object"),
    "list": (raw("[1, 2]"), "its hidream-mlx metadata is [1, 2], not the JSON object"),
    "text": (raw('"abc"'), "its hidream-mlx metadata is \"abc\""),
    "model number": (setting("model", 5), "model must be text, got 5"),
    "prompt number": (setting("prompt", 5), "prompt must be text, got 5"),
    "prompt missing": (deleting("prompt"), "prompt is missing"),
    "seed text": (setting("seed", "1"), 'seed must be a whole number, got "1"'),
    "seed negative": (setting("seed", -1), "seed must be >= 0"),
    "seed float": (setting("seed", 1.5), "seed must be a whole number, got 1.5"),
    "width null": (setting("width", None), "width must be a whole number, got null"),
    "steps zero": (setting("steps", 0), "steps must be >= 1 and <= 1000 (as --steps), got 0"),
    "references text": (setting("references", "abc"), 'references must be a list of text, got "abc"'),
    "references numbers": (setting("references", [1]), "references[0] must be text, got 1"),
    "reference_files text": (setting("reference_files", "abc"), "reference_files must be a list of objects"),
    "reference_files path": (setting("reference_files", [{"name": "../../etc/passwd", "sha256": "0" * 64}]),
                             'reference_files[0].name must be a file name without a folder, got "../../etc/passwd"'),
    "reference_files absolute": (setting("reference_files", [{"name": "/etc/passwd", "sha256": "0" * 64}]),
                                 "reference_files[0].name must be a file name without a folder"),
    "reference_files no sha": (setting("reference_files", [{"name": "cat.png"}]), "reference_files[0].sha256 is missing"),
    "loras text": (setting("loras", "x"), 'loras must be a list of objects with "name", "sha256" and "scale"'),
    "loras number": (setting("loras", [5]), "loras[0] must be an object"),
    "lora name number": (setting("loras", [{"name": 5, "sha256": "0" * 64}]), "loras[0].name must be a file name"),
    "lora scale text": (setting("loras", [{"name": "l.safetensors", "sha256": "0" * 64, "scale": "x"}]),
                        'loras[0].scale must be a finite number, got "x"'),
    "lora scale nan": (setting("loras", [{"name": "l.safetensors", "sha256": "0" * 64, "scale": float("nan")}]),
                       "loras[0].scale must be a finite number, got NaN"),
    "recipe_settings list": (setting("recipe_settings", [1]), "recipe_settings must be an object of recipe settings"),
    "recipe_settings steps": (setting("recipe_settings", {"steps": "x"}), "recipe_settings.steps must be a whole number"),
    "recipe_settings guidance": (setting("recipe_settings", {"guidance": True}),
                                 "recipe_settings.guidance must be a finite number or null, got true"),
    "recipe_settings nested": (setting("recipe_settings", {"name": {"a": 1}}), "recipe_settings.name must be text, a number"),
    "family null": (setting("family", None), "family must be text, got null"),
    "family number": (setting("family", 5), "family must be text, got 5"),
    "family unknown": (setting("family", "e9"), 'made by a model family this version does not know ("e9")'),
    "dtype": (setting("dtype", "float8"), 'dtype must be one of "bfloat16", "float32", "mixed", got "float8"'),
    "quantize_bits": (setting("quantize_bits", 7), "quantize_bits must be one of 2, 3, 4, 5, 6, 8 or null, got 7"),
    "recipe": (setting("recipe", "zz"), 'recipe must be one of "full"'),
    "noise": (setting("noise", "zz"), 'noise must be one of "torch", "mlx", got "zz"'),
    "keep_aspect": (setting("keep_aspect", "yes"), 'keep_aspect must be true or false, got "yes"'),
    "layout": (setting("layout", 5), "layout must be JSON boxes as text or null, got 5"),
    "layout file": (setting("layout", "/etc/passwd"), 'layout must be JSON boxes as text or null, got "/etc/passwd"'),
    "seam_smoothing fraction": (setting("seam_smoothing", {"fraction": 5, "window": "hann", "strength": 1.0}),
                                "seam_smoothing.fraction must be a number >= 0 and <= 1, got 5"),
    "seam_smoothing window": (setting("seam_smoothing", {"fraction": 0.5, "window": "box", "strength": 1.0}),
                              'seam_smoothing.window must be one of "hann", "mean", got "box"'),
    "lora scale range": (setting("loras", [{"name": "l.safetensors", "sha256": "0" * 64, "scale": 1000}]),
                         "loras[0].scale must be >= -100 and <= 100, got 1000"),
    "recipe_settings range": (setting("recipe_settings", {"guidance": -1}),
                              "recipe_settings.guidance must be >= 0 and <= 100 (as --guidance), got -1"),
    "width range": (setting("width", 10**9), "width must be >= 1 and <= 16384 (as --width), got 1000000000"),
    "init_image path": (setting("init_image", {"name": "/tmp/photo.png", "sha256": "0" * 64}),
                        'init_image.name must be a file name without a folder, got "/tmp/photo.png"'),
    "mask text": (setting("mask", "mask.png"), 'mask must be an object with "name" and "sha256", got "mask.png"'),
    "strength range": (setting("strength", 5), "strength must be > 0 and <= 1 (as --strength), got 5"),
    "mask_blur kind": (setting("mask_blur", 1.5), "mask_blur must be a whole number, got 1.5"),
    "seam_smoothing": (setting("seam_smoothing", "x"), 'seam_smoothing must be a JSON object, got "x"'),
    "negative_prompt": (setting("negative_prompt", 5), "negative_prompt must be text or null, got 5"),
}


@pytest.mark.parametrize("variant", sorted(O1_VARIANTS))
@pytest.mark.parametrize("command", ["info", "info --json", "from-image", "from-image --model"])
def test_every_reader_refuses_a_tampered_object_in_one_line_naming_the_key(o1_image, tmp_path, no_loading, variant,
                                                                           command):
    change, says = O1_VARIANTS[variant]
    image = tampered(o1_image, tmp_path, change)
    out = tmp_path / "out.png"
    args = {"info": ["info", image], "info --json": ["info", image, "--json"],
            "from-image": ["generate", "--from-image", image, "-o", out],
            "from-image --model": ["generate", "--model", FIXTURES, "--from-image", image, "-o", out]}[command]
    result, lines = invoke(*args)
    assert result.exit_code == 1 and lines == [lines[0]] and "Traceback" not in result.output, result.output
    assert lines[0].startswith(f"error: {image}") and says in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.png"]


def test_a_tampered_jpeg_is_refused_the_same_way(o1_image, tmp_path, no_loading):
    meta = read_metadata(o1_image)
    meta["references"] = "abc"
    exif = Image.Exif()
    exif[EXIF_IMAGE_DESCRIPTION] = f"{METADATA_KEY}:{json.dumps(meta)}"
    image = tmp_path / "t.jpg"
    Image.open(o1_image).convert("RGB").save(image, exif=exif.tobytes())
    for args in (["info", image], ["generate", "--model", FIXTURES, "--from-image", image, "-o", tmp_path / "o.png"]):
        result, lines = invoke(*args)
        assert result.exit_code == 1 and lines == [f'error: {image}: hidream-mlx metadata: references must be a list of '
                                                   f'text, got "abc"']


def test_references_given_as_text_never_become_one_reference_per_letter(o1_image, tmp_path, no_loading):
    for letter in "abc":
        Image.new("RGB", (8, 8)).save(tmp_path / letter, format="PNG")
    image = tampered(o1_image, tmp_path, setting("references", "abc"))
    result, lines = invoke("generate", "--model", FIXTURES, "--from-image", image, "-o", tmp_path / "o.png")
    assert result.exit_code == 1 and "references must be a list of text" in lines[0]
    assert "a, b, c" not in result.output


def test_an_unknown_family_is_said_before_any_other_key(o1_image, tmp_path, no_loading):
    def newer(meta):
        meta.update(family="e9", noise_scale="high", references="abc")
    image = tampered(o1_image, tmp_path, newer)
    for args in (["info", image], ["generate", "--from-image", image, "-o", tmp_path / "o.png"],
                 ["generate", "--model", I1_FIXTURES, "--from-image", image, "-o", tmp_path / "o.png"]):
        result, lines = invoke(*args)
        assert result.exit_code == 1 and len(lines) == 1, result.output
        assert 'made by a model family this version does not know ("e9")' in lines[0]
        assert "--s-noise" not in lines[0] and "--noise-scale" not in lines[0]


def test_an_image_of_one_family_with_a_model_of_another_says_so_not_which_option_it_lacks(o1_image, i1_image,
                                                                                          tmp_path, no_loading):
    for image, model, says in ((o1_image, I1_FIXTURES, "was made by a HiDream-O1 model (o1-tiny"),
                               (i1_image, FIXTURES, "was made by a HiDream-I1 model (i1-tiny")):
        result, lines = invoke("generate", "--model", model, "--from-image", image, "-o", tmp_path / "o.png")
        assert result.exit_code == 1 and len(lines) == 1 and says in lines[0], result.output
        assert "give a HiDream" in lines[0] and "--noise" not in lines[0] and "--s-noise" not in lines[0]
    assert list(tmp_path.iterdir()) == []


I1_VARIANTS = {
    "llama": (setting("llama", 5), "llama must be text or null, got 5"),
    "encoder_bits": (setting("encoder_bits", 3), "encoder_bits must be one of 4, 8 or null, got 3"),
    "mu_shift": (setting("mu_shift", "yes"), 'mu_shift must be true or false, got "yes"'),
    "step_noise_seed": (setting("step_noise_seed", "x"), 'step_noise_seed must be a whole number, got "x"'),
    "shift": (setting("shift", -1.0), "shift must be > 0"),
    "recipe": (setting("recipe", "dev-2604"), 'recipe must be one of "full", "dev", "fast"'),
}


@pytest.mark.parametrize("variant", sorted(I1_VARIANTS))
def test_an_i1_image_s_own_keys_are_the_family_s_to_check(i1_image, tmp_path, no_loading, variant):
    change, says = I1_VARIANTS[variant]
    image = tampered(i1_image, tmp_path, change)
    for args in (["info", image], ["generate", "--model", I1_FIXTURES, "--from-image", image, "-o", tmp_path / "o.png"]):
        result, lines = invoke(*args)
        assert result.exit_code == 1 and len(lines) == 1 and says in lines[0], result.output


def test_an_image_that_reads_back_is_accepted_and_unknown_keys_of_a_newer_version_are_left_alone(o1_image, tmp_path):
    meta = read_metadata(o1_image)
    assert check_image_metadata(meta).name == "o1"
    meta["something_new"] = {"a": [1, None]}
    assert check_image_metadata(meta).name == "o1"
    with pytest.raises(RequestError, match="the image: hidream-mlx metadata: prompt must be text"):
        check_image_metadata({**meta, "prompt": None})


# --- no local path in what an image records (item 9) ----------------------------------------------

def no_path_in(meta: dict, *folders) -> bool:
    text = json.dumps(meta)
    return all(str(folder) not in text for folder in folders)


def test_an_image_records_the_model_and_its_inputs_by_name_and_content_never_a_path(o1_image):
    meta = read_metadata(o1_image)
    assert meta["model"] == meta["model_name"] == FIXTURES.name and meta["model_fingerprint"].startswith("sha256:")
    assert meta["references"] == ["cat.png"]
    assert meta["reference_files"] == [{"name": "cat.png", "sha256": sha256_file(o1_image.parent / "cat.png")}]
    assert no_path_in(meta, FIXTURES.parent, o1_image.parent)
    assert "/" not in json.dumps({k: v for k, v in meta.items() if k not in ("prompt", "layout")})


def test_an_i1_image_records_its_llama_folder_by_name_and_a_rerun_asks_for_it(i1_image, tmp_path):
    llama = tmp_path / "my-llama"
    llama.mkdir()
    for part in ("text_encoder_4", "tokenizer_4"):
        for file in (I1_FIXTURES / part).iterdir():
            (llama / file.name).symlink_to(file)
    pipeline = tmp_path / "pipeline"
    pipeline.mkdir()
    for entry in I1_FIXTURES.iterdir():
        if entry.name not in ("text_encoder_4", "tokenizer_4"):
            (pipeline / entry.name).symlink_to(entry)
    out = tmp_path / "with_llama.png"
    result, _ = invoke(*i1_args("--llama", llama, "-o", out, model=pipeline))
    assert result.exit_code == 0, result.output
    meta = read_metadata(out)
    assert (meta["model"], meta["llama"]) == ("pipeline", "my-llama") and no_path_in(meta, tmp_path)
    again = tmp_path / "again.png"
    asked, lines = invoke("generate", "--model", pipeline, "--from-image", out, "-o", again)
    assert asked.exit_code == 1 and lines == [f"error: {out}: made with the local Llama my-llama; images record a folder "
                                              "by its name only, so give it with --llama FOLDER"]
    rerun, _ = invoke("generate", "--model", pipeline, "--llama", llama, "--from-image", out, "-o", again)
    assert rerun.exit_code == 0, rerun.output
    np.testing.assert_array_equal(np.array(Image.open(again)), np.array(Image.open(out)))


def test_a_model_recorded_by_folder_name_needs_model_naming_the_name_and_fingerprint(o1_image, tmp_path, no_loading):
    meta = read_metadata(o1_image)
    result, lines = invoke("generate", "--from-image", o1_image, "-o", tmp_path / "o.png")
    assert result.exit_code == 1 and lines == [
        f"error: {o1_image}: made with the local model {FIXTURES.name}, fingerprint {meta['model_fingerprint']}; images "
        "record a folder by its name only, so give it with --model FOLDER"]


def test_a_model_given_as_dot_is_recorded_by_the_folder_s_name(tmp_path, monkeypatch):
    monkeypatch.chdir(FIXTURES)
    out = tmp_path / "dot.png"
    result, _ = invoke(*["." if a == str(FIXTURES) else a for a in O1], "-o", out)
    assert result.exit_code == 0, result.output
    assert read_metadata(out)["model"] == FIXTURES.name


def test_an_older_image_with_a_path_still_re_runs_from_it(o1_image, tmp_path):
    def old(meta):
        meta["model"] = str(FIXTURES)
        meta["references"] = [str(o1_image.parent / "cat.png")]
        del meta["reference_files"]
    image = tampered(o1_image, o1_image.parent, old, name="old.png")
    shown = invoke("info", image)[0]
    assert shown.exit_code == 0 and f"model {FIXTURES.name}" in shown.output
    again = tmp_path / "again.png"
    result, _ = invoke("generate", "--from-image", image, "-o", again)
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(np.array(Image.open(again)), np.array(Image.open(o1_image)))
    assert no_path_in(read_metadata(again), FIXTURES.parent, o1_image.parent)


@pytest.mark.parametrize("value, gives", [("HiDream-ai/HiDream-O1-Image-Dev", "HiDream-ai/HiDream-O1-Image-Dev"),
                                          (str(FIXTURES), str(FIXTURES))])
def test_a_recorded_repo_id_is_loaded_as_model_would_be_and_an_old_path_while_it_is_there(value, gives):
    assert recorded_location(value, "x.png", "--model", "model", {}) == gives


@pytest.mark.parametrize("value, says", [("o1-tiny", "made with the local model o1-tiny"),
                                         ("/gone/o1-tiny", "the recorded model /gone/o1-tiny is not on this machine"),
                                         ("../o1", "the recorded model ../o1 is not on this machine")])
def test_a_folder_name_or_a_path_that_is_gone_asks_for_model(value, says):
    with pytest.raises(RequestError, match=says):
        recorded_location(value, "x.png", "--model", "model", {})


def test_an_init_image_and_a_mask_are_recorded_by_name_and_content(tmp_path):
    folder = tmp_path / "inputs"
    folder.mkdir()
    Image.new("RGB", (256, 256), (20, 120, 200)).save(folder / "photo.png")
    Image.new("L", (256, 256), 255).save(folder / "mask.png")
    out = tmp_path / "out.png"
    result, _ = invoke(*O1, "--init-image", folder / "photo.png", "--mask", folder / "mask.png", "-o", out)
    assert result.exit_code == 0, result.output
    meta = read_metadata(out)
    assert meta["init_image"] == {"name": "photo.png", "sha256": sha256_file(folder / "photo.png")}
    assert meta["mask"]["name"] == "mask.png" and no_path_in(meta, tmp_path, FIXTURES.parent)


def test_a_lora_and_a_converted_folder_are_recorded_by_name(tmp_path):
    from test_lora import fresh, lora_tensors, write_lora

    lora = write_lora(tmp_path / "loras", lora_tensors(fresh()), "peft")
    converted = tmp_path / "q8"
    made, _ = invoke("quantize", "--model", FIXTURES, "--bits", "8", "-o", converted)
    assert made.exit_code == 0, made.output
    out = tmp_path / "out.png"
    result, _ = invoke("generate", "--model", converted, "--prompt", "a red fox", "--no-snap", "--width", "256",
                       "--height", "256", "--steps", "1", "--dtype", "float32", "--lora", lora, "-o", out)
    assert result.exit_code == 0, result.output
    meta = read_metadata(out)
    assert (meta["model"], meta["converted_from"], meta["loras"][0]["name"]) == ("q8", FIXTURES.name,
                                                                                  "lora.safetensors")
    assert no_path_in(meta, tmp_path, FIXTURES.parent)


def test_the_server_checks_each_record_before_queueing_and_keeps_serving(tmp_path):
    import httpx
    from server_helpers import running_server

    body = {"prompt": "a red fox", "size": "256x256", "no_snap": True, "steps": 1, "seed": 3}
    with running_server(FIXTURES, tmp_path / "out") as (url, studio):
        real = studio.engine.describe
        studio.engine.describe = lambda: {**real(), "dtype": "float8"}  # a record no reader would take
        broken = httpx.post(f"{url}/v1/images/generations", json=body, timeout=60)
        assert broken.status_code == 500 and "dtype must be one of" in broken.json()["error"]["message"]
        studio.engine.describe = real
        fine = httpx.post(f"{url}/v1/images/generations", json=body, timeout=60)
        assert fine.status_code == 200, fine.text
    [saved] = list((tmp_path / "out").glob("*.png"))
    assert check_image_metadata(read_metadata(saved)).name == "o1"
    assert no_path_in(read_metadata(saved), FIXTURES.parent, tmp_path)
