"""In-sampler seam smoothing: the half-patch-shifted second pass in the final steps."""

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import FIXTURES
from PIL import Image

from hidream_mlx.cli import main
from hidream_mlx.families.o1.engine import Engine, Request
from hidream_mlx.families.o1.config import PATCH_SIZE
from hidream_mlx.families.o1.transformer import PrefixCache
from hidream_mlx.families.o1.patches import patchify
from hidream_mlx.families.o1.sampling import Conditioning, PromptState, sample
from hidream_mlx.images import read_metadata
from hidream_mlx.families.o1.positions import t2i_positions
from hidream_mlx.families.o1.recipes import get_recipe
from hidream_mlx.families.o1.seam_smoothing import SeamSmoothing, SeamSmoothingError, extra_passes, shifted_weight
from hidream_mlx.harness.grid import grid_energy, grid_energy_axes, seam_energy

REF = str(FIXTURES / "edit_ref.png")
WIDTH, HEIGHT = 10 * PATCH_SIZE, 8 * PATCH_SIZE  # not square, so a swapped axis shows


def flat_patch_engine() -> Engine:
    """The fixture model with a pixel head that paints every patch one colour per channel."""
    engine = Engine.load(str(FIXTURES), dtype="float32")
    head = engine.model.final_layer2.linear
    weight, bias = np.array(head.weight), np.array(head.bias)
    per_pixel = PATCH_SIZE * PATCH_SIZE
    head.weight = mx.array(np.repeat(weight.reshape(3, per_pixel, -1)[:, :1], per_pixel, axis=1).reshape(weight.shape))
    head.bias = mx.array(np.repeat(bias.reshape(3, per_pixel)[:, :1], per_pixel, axis=1).reshape(-1))
    return engine


def patch_interiors(height: int, width: int, margin: int = 8) -> np.ndarray:
    """Pixels at least ``margin`` px from every patch edge."""
    def axis(n):
        p = np.arange(n) % PATCH_SIZE
        return (p >= margin) & (p < PATCH_SIZE - margin)

    return axis(height)[:, None] & axis(width)[None, :]


@pytest.fixture(scope="module")
def flat_runs():
    engine = flat_patch_engine()
    recipe = get_recipe("full").with_overrides(steps=8)
    runs = {}
    for name, settings in {"off": {}, "hann": {"seam_smoothing": 0.5},
                           "mean": {"seam_smoothing": 0.5, "seam_window": "mean"}}.items():
        runs[name] = engine.run(Request("a quiet lake at dawn", WIDTH, HEIGHT, 3, recipe, **settings)).image
    return runs


def test_flat_patches_leave_seams_that_smoothing_removes(flat_runs):
    plain = flat_runs["off"]
    assert grid_energy(plain) > 10  # nearly flat patches: steps inside are a tenth of those across seams
    before = seam_energy(plain)
    assert before > 20  # levels of 255: a grid anyone sees
    assert seam_energy(flat_runs["hann"]) <= 0.6 * before  # the default settings
    assert seam_energy(flat_runs["mean"]) <= 0.6 * before  # a plain mean halves the steps
    assert seam_energy(flat_runs["hann"]) < seam_energy(flat_runs["mean"])
    assert grid_energy(flat_runs["hann"]) < 0.1 * grid_energy(plain)


def test_away_from_the_seams_the_image_stays_close(flat_runs):
    plain = flat_runs["off"].astype(float)
    inside = patch_interiors(HEIGHT, WIDTH)
    change = {k: np.abs(flat_runs[k] - plain)[inside].mean() for k in ("hann", "mean")}
    assert change["hann"] < 0.25 * seam_energy(flat_runs["off"])
    assert change["hann"] < 0.5 * change["mean"]  # the window keeps patch centres on the plain pass


class PixelwiseModel:
    """Translation-invariant by construction: each output pixel depends only on the same input
    pixel and the timestep, never on its position. Records the positions it is given."""

    def __init__(self):
        self.seen = []

    def rope(self, positions):
        return mx.array(np.asarray(positions, dtype=np.float32)), mx.zeros(1)

    def denoise(self, cache, timestep, patches, positions, num_target=None, key_mask=None, rope=None):
        self.seen.append(np.asarray(positions))
        return (mx.tanh(patches[:, :num_target]) * (1.0 - 0.5 * timestep)).astype(mx.float32)


def pixelwise_conditioning(model, grid, guidance, refs: int = 0) -> Conditioning:
    positions = t2i_positions(12, *grid)[:, 11:]  # tms + patches
    if refs:
        ref_positions = np.stack([np.full(refs, 9000), 9000 + np.arange(refs), 9000 + np.arange(refs)])
        positions = np.concatenate([positions, ref_positions], axis=1)

    def state():
        return PromptState(PrefixCache([]), positions, model.rope(positions))

    ref_patches = mx.random.normal((1, refs, 3 * PATCH_SIZE * PATCH_SIZE)) if refs else None
    return Conditioning(state(), state() if guidance > 1 else None, ref_patches)


@pytest.mark.parametrize("recipe, window, refs", [("full", "hann", 0), ("dev", "mean", 0), ("dev-edit", "hann", 2)])
def test_a_translation_invariant_model_gets_exactly_the_plain_result(recipe, window, refs):
    grid = (HEIGHT // PATCH_SIZE, WIDTH // PATCH_SIZE)
    rec = get_recipe(recipe).with_overrides(steps=5)
    model = PixelwiseModel()
    cond = pixelwise_conditioning(model, grid, rec.guidance, refs)
    z0 = patchify(mx.random.normal((1, 3, HEIGHT, WIDTH), key=mx.random.key(0)))

    def latents(seams):
        noise = iter([mx.random.normal(z0.shape, key=mx.random.key(i)) for i in range(rec.steps)])
        return [np.array(s.latent) for s in sample(model, cond, rec, z0, step_noise=lambda i, shape: next(noise),
                                                   seams=seams)]

    plain = latents(None)
    model.seen.clear()
    smoothed = latents(SeamSmoothing(0.6, window))
    for a, b in zip(plain, smoothed):
        np.testing.assert_array_equal(a, b)

    branches = 2 if rec.uses_cfg else 1
    shifted = [p for p in model.seen if p.shape[1] != cond.cond.positions.shape[1]]
    assert len(shifted) == 3 * branches  # ceil(0.6 * 5) steps
    (gh, gw), base = grid, cond.cond.positions
    expect = t2i_positions(12, gh + 1, gw + 1)[:, 12:]
    np.testing.assert_array_equal(shifted[0][:, 0], base[:, 0])  # the tms token
    np.testing.assert_array_equal(shifted[0][:, 1:1 + (gh + 1) * (gw + 1)], expect)
    np.testing.assert_array_equal(shifted[0][:, 1 + (gh + 1) * (gw + 1):], base[:, 1 + gh * gw:])  # references


def test_the_shifted_pass_weights():
    hann, mean = np.array(shifted_weight("hann", 1.0)), np.array(shifted_weight("mean", 1.0))
    tile = hann[:PATCH_SIZE * PATCH_SIZE].reshape(PATCH_SIZE, PATCH_SIZE)
    assert np.all(mean == 0.5)
    assert tile[PATCH_SIZE // 2, PATCH_SIZE // 2] < 0.01  # the patch centre: the plain pass
    assert tile[0, 0] > 0.99 and tile[-1, -1] > 0.99  # patch corners: the shifted pass
    np.testing.assert_allclose(tile, tile[::-1, ::-1], atol=1e-6)  # symmetric about the patch centre
    assert np.all(np.array(shifted_weight("hann", 0.4)) <= 0.4)


def test_same_settings_give_the_same_image_and_zero_is_the_old_output():
    engine = Engine.load(str(FIXTURES), dtype="float32")
    recipe = get_recipe("full").with_overrides(steps=4)
    smoothed = Request("a lighthouse", WIDTH, HEIGHT, 5, recipe, seam_smoothing=0.5)
    first, second = engine.run(smoothed), engine.run(smoothed)
    np.testing.assert_array_equal(first.image, second.image)
    old = engine.run(Request("a lighthouse", WIDTH, HEIGHT, 5, recipe))
    off = engine.run(Request("a lighthouse", WIDTH, HEIGHT, 5, recipe, seam_smoothing=0.0, seam_window="mean"))
    np.testing.assert_array_equal(old.image, off.image)
    assert not np.array_equal(old.image, first.image)
    assert "seam_smoothing" not in off.metadata and first.metadata["seam_passes"] == 2 * 2  # 2 steps x CFG


def generate(tmp_path, name, *args):
    out = tmp_path / name
    result = CliRunner().invoke(main, ["generate", "--model", str(FIXTURES), "--prompt", "make the sky purple",
                                       "--seed", "1", "--no-snap", "--output", str(out), *args])
    assert result.exit_code == 0, result.output
    return result, np.array(Image.open(out)), read_metadata(out)


def test_cfg_on_a_quantized_model_with_previews(tmp_path):
    common = ["--width", "288", "--height", "256", "--recipe", "full", "--steps", "4", "-q", "8"]
    result, image, meta = generate(tmp_path, "s.png", *common, "--seam-smoothing", "0.5", "--preview-every", "3")
    assert "seam smoothing +4 passes" in result.output  # 2 steps, cond and uncond
    assert meta["seam_smoothing"] == {"fraction": 0.5, "window": "hann", "strength": 1.0} and meta["seam_passes"] == 4
    assert (tmp_path / "s.step003.png").is_file()
    _, plain, _ = generate(tmp_path, "p.png", *common)
    assert not np.array_equal(image, plain)


def test_editing_with_a_reference(tmp_path):
    common = ["--ref", REF, "--width", "256", "--height", "288", "--recipe", "dev", "--steps", "3"]
    result, image, meta = generate(tmp_path, "e.png", *common, "--seam-smoothing", "0.34", "--seam-window", "mean")
    assert meta["references"] == ["edit_ref.png"] and meta["seam_passes"] == 2  # ceil(0.34 * 3), no CFG
    assert image.shape[:2] == (288, 256)
    _, plain, _ = generate(tmp_path, "p.png", *common)
    assert not np.array_equal(image, plain)


@pytest.mark.parametrize("args, message", [
    (["--seam-smoothing", "1.5"], "--seam-smoothing must be between 0 and 1"),
    (["--seam-smoothing", "nan"], "--seam-smoothing must be between 0 and 1"),
    (["--seam-strength", "-0.1"], "--seam-strength must be between 0 and 1"),
    (["--seam-window", "gauss"], "--seam-window"),
])
def test_bad_settings_are_one_line_errors(tmp_path, args, message):
    result = CliRunner().invoke(main, ["generate", "--model", str(FIXTURES), "--prompt", "x", "--output",
                                       str(tmp_path / "o.png"), *args])
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output


def test_cost_and_metric_helpers():
    assert extra_passes(SeamSmoothing(0.5), 28, uses_cfg=False) == 14
    assert extra_passes(SeamSmoothing(0.5), 50, uses_cfg=True) == 50
    assert extra_passes(SeamSmoothing(0.01), 10, uses_cfg=False) == 1  # any fraction smooths a step
    assert extra_passes(SeamSmoothing(0.0), 10, uses_cfg=True) == 0
    assert extra_passes(SeamSmoothing(0.5, strength=0.0), 10, uses_cfg=True) == 0
    with pytest.raises(SeamSmoothingError):
        SeamSmoothing(-0.1)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (HEIGHT, WIDTH, 3)).astype(np.uint8)
    rows = image.astype(int)
    rows[PATCH_SIZE::PATCH_SIZE] = np.clip(rows[PATCH_SIZE::PATCH_SIZE] + 120, 0, 255)  # horizontal seams only
    axes = grid_energy_axes(rows.astype(np.uint8))
    assert axes["y"] > 1.2 and 0.9 < axes["x"] < 1.1
