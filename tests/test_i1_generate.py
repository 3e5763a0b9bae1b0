"""`hidream-mlx generate` on a HiDream-I1 pipeline: golden images, phases, seeds, metadata, refusals.

Every size, seed and prompt comes from the fixture set (HIDREAM_I1_FIXTURES picks another set).
"""

import math

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from hidream_mlx.cli import main
from hidream_mlx.images import read_metadata
from hidream_mlx.families.i1 import engine as engine_module
from hidream_mlx.families.i1.config import TransformerConfig
from hidream_mlx.families.i1.sampling import calculate_shift
from hidream_mlx.families.i1.text_encoding import TextEncoders
from i1_support import FIXTURES, golden


def case(name):
    return golden(f"{name}_sampling.npz")


def base_args(name="full"):
    c = case(name)
    return ["generate", "--model", str(FIXTURES), "--prompt", str(c["prompt"]), "--width", str(int(c["width"])),
            "--height", str(int(c["height"])), "--no-snap", "--dtype", "float32"]


def invoke(*args):
    return CliRunner().invoke(main, list(args))


def pixels(path):
    return np.array(Image.open(path)).astype(int)


def assert_golden(path, expected):
    diff = np.abs(pixels(path) - expected.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() >= 0.99


def test_full_recipe_reproduces_the_golden_image(tmp_path):
    """The acceptance run: Full, the case's generator seed and size, --shift 3.0 as recorded, float32."""
    c = case("full")
    out = tmp_path / "full.png"
    result = invoke(*base_args(), "--recipe", "full", "--seed", str(int(c["generator_seed"])), "--shift", "3.0",
                    "-o", str(out))
    assert result.exit_code == 0, result.output
    assert_golden(out, c["image"])
    meta = read_metadata(out)
    assert meta["family"] == "i1" and meta["recipe"] == "full" and meta["steps"] == int(c["num_inference_steps"])
    assert meta["shift"] == 3.0 and meta["second_shift"] == 3.0 and meta["mu_shift"] is False
    assert meta["official_recipe"] is False  # --shift replaced the official exp(mu) second shift
    assert "UniPC shifts twice by 3" in result.output


@pytest.mark.parametrize("name", ["dev", "fast"])
def test_flash_recipes_reproduce_the_golden_image_with_the_recorded_global_seed(name, tmp_path):
    c = case(name)
    out = tmp_path / f"{name}.png"
    result = invoke(*base_args(name), "--recipe", name, "--seed", str(int(c["generator_seed"])),
                    "--step-noise-seed", str(int(c["global_seed"])), "-o", str(out))
    assert result.exit_code == 0, result.output
    assert_golden(out, c["image"])
    meta = read_metadata(out)
    assert meta["official_recipe"] is True and meta["step_noise_seed"] == int(c["global_seed"])


def test_metadata_records_what_a_rerun_needs_and_from_image_rerenders(tmp_path):
    out, again = tmp_path / "a.png", tmp_path / "b.png"
    result = invoke(*base_args(), "--recipe", "full", "--steps", "3", "--seed", "11", "-o", str(out))
    assert result.exit_code == 0, result.output
    meta = read_metadata(out)
    cfg = TransformerConfig.load(FIXTURES / "transformer")
    assert meta["mu_shift"] is True
    assert math.isclose(meta["second_shift"], math.exp(calculate_shift(cfg.max_seq)))
    for key in ("family", "recipe", "shift", "seed", "width", "height", "model", "dtype", "quantization",
                "model_fingerprint", "recipe_settings", "step_noise_seed"):
        assert key in meta, key
    assert (meta["width"], meta["height"], meta["seed"], meta["dtype"]) == (
        int(case("full")["width"]), int(case("full")["height"]), 11, "float32")
    rerun = invoke("generate", "--model", str(FIXTURES), "--from-image", str(out), "-o", str(again))
    assert rerun.exit_code == 0, rerun.output
    np.testing.assert_array_equal(pixels(out), pixels(again))
    assert read_metadata(again)["mu_shift"] is True  # leaving --shift out kept the official second shift


def test_from_image_with_a_new_seed_redraws_the_step_noise_too(tmp_path):
    out, again = tmp_path / "a.png", tmp_path / "b.png"
    assert invoke(*base_args("fast"), "--recipe", "fast", "--steps", "2", "--seed", "3", "--step-noise-seed", "9",
                  "-o", str(out)).exit_code == 0
    assert invoke("generate", "--model", str(FIXTURES), "--from-image", str(out), "--seed", "4",
                  "-o", str(again)).exit_code == 0
    meta = read_metadata(again)
    assert meta["seed"] == 4 and meta["step_noise_seed"] == 4 and meta["steps"] == 2


def test_prompts_are_encoded_once_before_the_transformer_loads_once(tmp_path, monkeypatch):
    """Three seeds of one prompt (CFG on): one encode of [negative, prompt], encoders freed, one load."""
    events = []
    real_encode, real_load = TextEncoders.encode, engine_module.load_transformer_planned

    def encode(self, texts):
        events.append(("encode", tuple(texts)))
        return real_encode(self, texts)

    def load(*args, **kwargs):
        resident = [name for e in encoders for name in e._models]
        events.append(("transformer", tuple(resident)))
        return real_load(*args, **kwargs)

    encoders = []
    real_init = TextEncoders.__post_init__

    def init(self):
        encoders.append(self)
        real_init(self)

    monkeypatch.setattr(TextEncoders, "encode", encode)
    monkeypatch.setattr(TextEncoders, "__post_init__", init)
    monkeypatch.setattr(engine_module, "load_transformer_planned", load)
    prompt = str(case("full")["prompt"])
    result = invoke(*base_args(), "--recipe", "full", "--steps", "2", "--seed", "5", "--count", "3",
                    "-o", str(tmp_path / "s{seed}.png"))
    assert result.exit_code == 0, result.output
    assert events == [("encode", ("", prompt)), ("transformer", ())]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s5.png", "s6.png", "s7.png"]
    assert not np.array_equal(pixels(tmp_path / "s5.png"), pixels(tmp_path / "s6.png"))


def test_a_prompt_file_encodes_every_distinct_text_in_one_pass(tmp_path, monkeypatch):
    calls = []
    real_encode = TextEncoders.encode
    monkeypatch.setattr(TextEncoders, "encode",
                        lambda self, texts: calls.append(list(texts)) or real_encode(self, texts))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\na blue bird\na red fox\n")
    result = invoke(*[a for a in base_args("fast") if a not in ("--prompt", str(case("fast")["prompt"]))],
                    "--prompt-file", str(prompts), "--recipe", "fast", "--steps", "1", "--seed", "1",
                    "-o", str(tmp_path / "{n}.png"))
    assert result.exit_code == 0, result.output
    assert calls == [["a red fox", "a blue bird"]]
    assert "2 distinct texts" in result.output
    np.testing.assert_array_equal(pixels(tmp_path / "1.png"), pixels(tmp_path / "3.png"))


O1_FLAGS = [
    ("--ref", "{tmp}/ref.png"), ("--layout", "[[0, 1, 0, 1]]"), ("--keep-aspect",), ("--editing-scheduler", "flash"),
    ("--blend-seams", "2"), ("--seam-smoothing", "0.5"), ("--seam-window", "mean"), ("--seam-strength", "0.5"),
    ("--noise", "mlx"), ("--s-noise", "1"),
    ("--noise-clip", "1"), ("--noise-scale", "2"), ("--dtype", "mixed"),
]


@pytest.mark.parametrize("flag", O1_FLAGS, ids=lambda f: f[0])
def test_o1_only_flags_are_refused_in_one_line_before_any_weight_loads(flag, tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("weights loaded before the refusal")

    monkeypatch.setattr(engine_module, "load_transformer_planned", no_loading)
    monkeypatch.setattr(TextEncoders, "model", no_loading)
    args = [a.format(tmp=tmp_path) for a in flag]
    result = invoke(*base_args(), "--seed", "1", *args, "-o", str(tmp_path / "x.png"))
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and flag[0] in lines[0], result.output
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("name", ["full", "fast"])
def test_previews_decode_the_x0_prediction_without_changing_the_image(name, tmp_path):
    plain, previewed = tmp_path / "plain.png", tmp_path / "out.png"
    common = [*base_args(name), "--recipe", name, "--steps", "3", "--seed", "2"]
    assert invoke(*common, "-o", str(plain)).exit_code == 0
    result = invoke(*common, "--preview-every", "1", "-o", str(previewed))
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(pixels(plain), pixels(previewed))
    previews = sorted(p.name for p in tmp_path.glob("out.step*.png"))
    assert previews == ["out.step001.png", "out.step002.png"]  # none after the last step
    first, second = (pixels(tmp_path / p) for p in previews)
    assert first.shape == pixels(plain).shape and not np.array_equal(first, second)


def test_recipe_only_options_name_the_recipes_that_read_them(tmp_path):
    result = invoke(*base_args(), "--recipe", "full", "--step-noise-seed", "3", "-o", str(tmp_path / "x.png"))
    assert result.exit_code == 1 and "--step-noise-seed has no effect with the full recipe" in result.output
    assert "dev, fast" in result.output


def test_i1_options_are_refused_for_an_o1_model(tmp_path):
    from conftest import FIXTURES as O1_FIXTURES
    for flag in (("--llama", "somewhere"), ("--encoder-bits", "8")):
        result = invoke("generate", "--model", str(O1_FIXTURES), "--prompt", "a fox", *flag, "-o",
                        str(tmp_path / "x.png"))
        assert result.exit_code == 1 and f"{flag[0]} is for HiDream-I1 models" in result.output
    result = invoke("generate", "--model", str(O1_FIXTURES), "--prompt", "a fox", "--step-noise-seed", "2",
                    "-o", str(tmp_path / "x.png"))
    assert result.exit_code == 1 and "--step-noise-seed is for HiDream-I1" in result.output


def test_encoder_and_transformer_quantization_are_recorded(tmp_path):
    out = tmp_path / "q.png"
    result = invoke(*base_args("fast"), "--recipe", "fast", "--steps", "1", "--seed", "1", "-q", "8",
                    "--encoder-bits", "8", "-o", str(out))
    assert result.exit_code == 0, result.output
    meta = read_metadata(out)
    assert meta["quantize_bits"] == 8 and meta["encoder_bits"] == 8 and meta["quantization"]["bits"] == 8
