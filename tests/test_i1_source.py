"""What an I1 model is before anything loads: family, variant and recipe, sizes, Llama, dims."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from hidream_mlx.cli import main
from hidream_mlx.images import read_metadata
from hidream_mlx.families import family_of
from hidream_mlx.families.i1.source import I1, LLAMA_REPO
from hidream_mlx.families.i1.config import TransformerConfig
from hidream_mlx.families.i1.sizes import snap_size
from hidream_mlx.families.i1.source import I1Source
from hidream_mlx.weights.loading import ModelLoadError
from hidream_mlx.requests import build_request
from hidream_mlx.family import RequestError
from i1_support import FIXTURES, golden

PARTS = [p.name for p in FIXTURES.iterdir() if p.is_dir()] + ["model_index.json"]


def pipeline_copy(root: Path, name: str = "pipeline", drop=(), edit=None) -> Path:
    """The fixture pipeline as links, minus ``drop``; ``edit = (component, key, fn)`` copies that
    component and rewrites one key of its config.json."""
    folder = root / name
    folder.mkdir()
    for part in PARTS:
        if part in drop or (edit and part == edit[0]):
            continue
        (folder / part).symlink_to(FIXTURES / part)
    if edit:
        component, key, change = edit
        shutil.copytree(FIXTURES / component, folder / component)
        config = folder / component / "config.json"
        data = json.loads(config.read_text())
        data[key] = change(data[key])
        config.write_text(json.dumps(data))
    return folder


def request(model, **options):
    return build_request(model, prompt="a red fox", seed=1, **options)


def tcfg():
    return TransformerConfig.load(FIXTURES / "transformer")


def test_family_comes_from_model_index_or_the_repo_name():
    assert family_of(FIXTURES).name == I1
    assert family_of("HiDream-ai/HiDream-I1-Dev").name == I1
    assert family_of("HiDream-ai/HiDream-O1-Image-Dev").name == "o1"


@pytest.mark.parametrize("name,recipe,mu_shift", [("HiDream-I1-Full", "full", True), ("HiDream-I1-Dev", "dev", False),
                                                  ("HiDream-I1-Fast", "fast", False), ("i1-tiny", "full", True)])
def test_the_default_recipe_follows_the_variant_in_the_name(tmp_path, name, recipe, mu_shift):
    source = I1Source.resolve(pipeline_copy(tmp_path, name))
    rec = request(source).recipe
    assert (source.variant, rec.name, rec.mu_shift, rec.official) == (recipe, recipe, mu_shift, True)
    assert request(source, recipe="fast").recipe.name == "fast"


def test_an_o1_recipe_name_is_refused_for_i1():
    with pytest.raises(RequestError, match="--recipe dev-2604 is not a HiDream-I1 recipe; choose one of "
                                           "full, dev, fast"):
        request(I1Source.resolve(FIXTURES), recipe="dev-2604")


def test_shift_replaces_both_unipc_shifts_and_leaves_the_official_recipe():
    source = I1Source.resolve(FIXTURES)
    official = request(source, recipe="full").recipe
    assert official.second_shift(tcfg().max_seq) == pytest.approx(math.exp(0.5 + (tcfg().max_seq - 256) * 0.65 / 3840))
    given = request(source, recipe="full", shift=official.shift).recipe
    assert (given.mu_shift, given.official, given.second_shift(tcfg().max_seq)) == (False, False, official.shift)
    dev = request(source, recipe="dev", shift=request(source, recipe="dev").recipe.shift).recipe
    assert dev.official  # flash shifts twice by the config shift in both pipelines: same value, same recipe


def test_presets_set_the_effort_and_leave_the_size_to_the_i1_rule():
    source = I1Source.resolve(FIXTURES)
    quick = request(source, recipe="full", preset="quick")
    assert (quick.recipe.steps, quick.recipe.guidance, quick.recipe.uses_cfg, quick.recipe.official) == (
        24, 1.0, False, False)
    assert request(source, recipe="dev", preset="quick").recipe.steps == 14
    assert (quick.width, quick.height) == (1024, 1024)  # not the preset's O1 size
    high = request(source, recipe="full", preset="high").recipe
    assert high == request(source, recipe="full").recipe and high.official


def test_sizes_are_rescaled_to_the_official_area_as_the_pipeline_does():
    assert snap_size(1024, 1024) == (1024, 1024)
    assert snap_size(1360, 768) == (1360, 768)
    assert snap_size(512, 512) == (1024, 1024)
    assert snap_size(2048, 1024) == (1440, 720)  # sqrt(1024^2 / 2048 / 1024) = 0.7071, floored to 16
    source = I1Source.resolve(FIXTURES)
    r = request(source)
    assert (r.width, r.height) == (1024, 1024) and "official 1024x1024 area" in r.size_note
    r = request(source, width=512, height=512)
    assert (r.width, r.height) == (1024, 1024) and "rescaled from 512x512" in r.size_note


def test_no_snap_keeps_the_exact_size_which_must_be_a_multiple_of_16():
    c = golden("full_sampling.npz")
    w, h = int(c["width"]), int(c["height"])
    r = request(I1Source.resolve(FIXTURES), width=w, height=h, no_snap=True)
    assert (r.width, r.height) == (w, h) and "exact size" in r.size_note
    with pytest.raises(RequestError, match="multiples of 16"):
        request(I1Source.resolve(FIXTURES), width=w + 8, height=h, no_snap=True)


def test_a_non_square_size_beyond_max_seq_is_refused_naming_it():
    cfg = tcfg()
    patch_px = cfg.patch_size * 8  # one patch of the 8x latent
    with pytest.raises(RequestError, match=f"max_seq {cfg.max_seq}"):  # one row of max_seq + 1 patches
        request(I1Source.resolve(FIXTURES), width=(cfg.max_seq + 1) * patch_px, height=patch_px, no_snap=True)


def test_a_pipeline_without_llama_and_no_access_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    folder = pipeline_copy(tmp_path, drop=("text_encoder_4", "tokenizer_4"))
    with pytest.raises(ModelLoadError) as e:
        I1Source.resolve(folder)
    message = str(e.value)
    assert message.startswith("Llama not found:") and "no text_encoder_4/" in message
    assert "--llama PATH_OR_ID" in message and LLAMA_REPO in message and "hf auth login" in message
    result = CliRunner().invoke(main, ["generate", "--model", str(folder), "--prompt", "a fox", "-o",
                                       str(tmp_path / "x.png")])
    assert result.exit_code == 1 and result.output.strip().splitlines() == [f"error: {message}"]
    with pytest.raises(ModelLoadError, match="Llama not found: --llama /nowhere/llama"):
        I1Source.resolve(folder, llama="/nowhere/llama")


def test_llama_from_a_separate_folder_gives_the_same_image(tmp_path):
    llama = tmp_path / "llama"
    shutil.copytree(FIXTURES / "text_encoder_4", llama)
    for f in (FIXTURES / "tokenizer_4").iterdir():
        shutil.copy(f, llama / f.name)
    folder = pipeline_copy(tmp_path, drop=("text_encoder_4", "tokenizer_4"))
    c = golden("fast_sampling.npz")
    args = ["generate", "--prompt", str(c["prompt"]), "--width", str(int(c["width"])), "--height",
            str(int(c["height"])), "--no-snap", "--recipe", "fast", "--steps", "2", "--seed", "4", "--dtype", "float32"]
    own = CliRunner().invoke(main, [*args, "--model", str(FIXTURES), "-o", str(tmp_path / "own.png")])
    separate = CliRunner().invoke(main, [*args, "--model", str(folder), "--llama", str(llama),
                                         "-o", str(tmp_path / "sep.png")])
    assert own.exit_code == 0 and separate.exit_code == 0, separate.output
    np.testing.assert_array_equal(np.array(Image.open(tmp_path / "own.png")),
                                  np.array(Image.open(tmp_path / "sep.png")))
    assert read_metadata(tmp_path / "sep.png")["llama"] == llama.name  # by name: an image keeps no path
    assert f"Llama from {llama}" in separate.output


MISMATCHES = [
    (("text_encoder_3", "d_model", lambda v: v + 8), "text_encoder_3: T5 width"),
    (("text_encoder_4", "hidden_size", lambda v: v + 16), "Llama hidden size"),
    (("text_encoder_4", "num_hidden_layers", lambda v: max(tcfg().llama_layers)), "Llama has"),
    (("transformer", "text_emb_dim", lambda v: v + 4), r"pooled CLIP-L \+ CLIP-G projections"),
    (("vae", "latent_channels", lambda v: v * 2), "latent channels"),
]


@pytest.mark.parametrize("edit,words", MISMATCHES, ids=lambda x: x[0] if isinstance(x, tuple) else x)
def test_an_encoder_transformer_mismatch_is_one_line_naming_the_component(tmp_path, edit, words):
    folder = pipeline_copy(tmp_path, edit=edit)
    with pytest.raises(ModelLoadError, match=words) as e:
        I1Source.resolve(folder)
    assert "\n" not in str(e.value)
