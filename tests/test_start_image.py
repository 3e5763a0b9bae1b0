"""Start from an image, on both tiny models: constructions whose answers are known.

* strength 1 is the text-to-image image of the seed;
* an all-black mask gives back the source's pixels exactly;
* a half mask keeps its half exactly beyond the blur and repaints the other half;
* strength 0.3 of 10 steps runs 3 steps, from the source brought to the 8th step's noise level,
  and gives another image than text-to-image.

Sizes come from the fixture sets (HIDREAM_FIXTURES / HIDREAM_I1_FIXTURES pick others); the
source and the masks are drawn here at the render size, so nothing is resized.
"""

import dataclasses

import mlx.core as mx
import numpy as np
import pytest
from conftest import FIXTURES as O1_FIXTURES
from i1_support import FIXTURES as I1_FIXTURES
from i1_support import golden
from PIL import Image

from hidream_mlx.families.i1.engine import I1Engine
from hidream_mlx.families.i1.sampling import i1_schedule, initial_latents
from hidream_mlx.families.o1.engine import Engine
from hidream_mlx.families.o1.patches import patchify
from hidream_mlx.families.o1.sampling import sampler_for, schedule_for
from hidream_mlx.noise import make_noise_source
from hidream_mlx.requests import build_request
from hidream_mlx.schedulers import start_step

PROMPT = "a lighthouse on a cliff"
SEED = 11
# Recipes per family: each sampler kind once (flash, UniPC with CFG, flow-match Euler).
RECIPES = {"o1": ("dev", "full", "dev-edit"), "i1": ("fast", "full")}


def o1_size():
    # Free sizes are whole 32 px patches from 256 px; a non-square one catches a transposed layout.
    return 320, 256


def i1_size():
    case = golden("fast_sampling.npz")
    return int(case["width"]), int(case["height"])


@pytest.fixture(scope="module")
def engines():
    return {"o1": Engine.load(O1_FIXTURES, dtype="float32"), "i1": I1Engine.load(I1_FIXTURES, dtype="float32")}


def size_of(family):
    return o1_size() if family == "o1" else i1_size()


def source_pixels(width, height):
    """A picture with gradients and an 8 px checker: every pixel differs from its neighbours."""
    y, x = np.mgrid[0:height, 0:width]
    checker = ((x // 8 + y // 8) % 2) * 150 + 40
    return np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), checker], axis=-1).astype(np.uint8)


@pytest.fixture()
def files(tmp_path):
    def make(family, mask=None):
        w, h = size_of(family)
        src = tmp_path / f"{family}-source.png"
        Image.fromarray(source_pixels(w, h)).save(src)
        paths = {"init_image": str(src)}
        if mask is not None:
            paths["mask"] = str(tmp_path / f"{family}-mask.png")
            Image.fromarray(mask).save(paths["mask"])
        return paths
    return make


def request(engines, family, recipe, steps=10, **options):
    w, h = size_of(family)
    return build_request(engines[family], prompt=PROMPT, seed=SEED, width=w, height=h, no_snap=True,
                         recipe=recipe, steps=steps, **options)


def image(engines, family, req, on_step=None):
    return engines[family].run(req, on_step).image.astype(int)


def close(a, b):
    """The tolerance of a re-run in float32: |d| <= 1 everywhere, at least 99 % identical."""
    diff = np.abs(a - b)
    return diff.max() <= 1 and (diff == 0).mean() >= 0.99


@pytest.mark.parametrize("family,recipe", [(f, r) for f, rs in RECIPES.items() for r in rs])
def test_strength_one_gives_the_text_to_image_image_of_the_seed(engines, files, family, recipe):
    text_to_image = image(engines, family, request(engines, family, recipe))
    started = request(engines, family, recipe, strength=1.0, **files(family))
    assert started.run_steps == 10 and started.start.first_step(10) == 0
    assert close(image(engines, family, started), text_to_image)


@pytest.mark.parametrize("family", RECIPES)
def test_an_all_black_mask_gives_back_the_source_pixels_exactly(engines, files, family):
    w, h = size_of(family)
    req = request(engines, family, RECIPES[family][0], **files(family, mask=np.zeros((h, w), np.uint8)))
    assert req.start.strength == 1.0  # with a mask the default runs every step
    np.testing.assert_array_equal(image(engines, family, req), source_pixels(w, h))


@pytest.mark.parametrize("family", RECIPES)
@pytest.mark.parametrize("blur", [0, 4])
def test_a_half_mask_keeps_its_half_exactly_beyond_the_blur_and_repaints_the_other(engines, files, family, blur):
    w, h = size_of(family)
    split = w // 2 + 3  # not on a patch or latent-cell boundary
    mask = np.zeros((h, w), np.uint8)
    mask[:, split:] = 255
    req = request(engines, family, RECIPES[family][-1], mask_blur=blur, **files(family, mask=mask))
    out, src = image(engines, family, req), source_pixels(w, h).astype(int)
    np.testing.assert_array_equal(out[:, :split - blur], src[:, :split - blur])
    assert (out[:, split:] != src[:, split:]).mean() > 0.9  # repainted: nearly every value moved


@pytest.mark.parametrize("family", RECIPES)
def test_strength_0_3_of_10_steps_runs_3_steps_and_gives_another_image(engines, files, family):
    recipe = RECIPES[family][0]
    text_to_image = image(engines, family, request(engines, family, recipe))
    req = request(engines, family, recipe, strength=0.3, **files(family))
    seen = []
    out = image(engines, family, req, on_step=lambda step, seconds: seen.append((step.index, step.total)))
    assert req.run_steps == 3 and seen == [(0, 3), (1, 3), (2, 3)]
    assert req.metadata()["steps_run"] == 3 and req.metadata()["strength"] == 0.3
    assert (out != text_to_image).mean() > 0.5
    assert (out != source_pixels(*size_of(family))).mean() > 0.5  # 3 steps of noise change the source too


def test_o1_starts_from_the_source_at_the_first_step_s_noise_level_with_the_sampler_s_own_scale(
        engines, files, monkeypatch):
    """Flash re-noises with --s-noise after each step, so the state it defines at step 7 carries
    that scale, not the initial --noise-scale: the first model call sees exactly
    (1 - sigma_7) * source + sigma_7 * s_noise * noise, the noise being the text-to-image draw."""
    engine = engines["o1"]
    req = request(engines, "o1", "dev", strength=0.3, noise_scale=9.0, s_noise=5.0, **files("o1"))
    seen = []
    real = type(engine.model).denoise

    def recording(self, cache, timestep, patches, *args, **kwargs):
        seen.append(np.array(patches))
        return real(self, cache, timestep, patches, *args, **kwargs)

    monkeypatch.setattr(type(engine.model), "denoise", recording)
    engine.run(req)
    first = start_step(10, 0.3)
    sigma = float(schedule_for(req.recipe).sigmas[first])
    assert sampler_for(req.recipe).s_noise(first - 1) == 5.0
    w, h = size_of("o1")
    noise = np.array(make_noise_source("torch", SEED).initial((3, h, w)))[0]
    source = source_pixels(w, h).transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0
    expected = patchify((1 - sigma) * source + sigma * 5.0 * noise)
    np.testing.assert_allclose(seen[0][0], expected, atol=1e-4)


def test_i1_starts_from_the_vae_latents_at_the_first_step_s_noise_level(engines, files, monkeypatch):
    """The transformer's first input is (1 - sigma_7) * encode(source) + sigma_7 * noise, the noise
    being the text-to-image run's initial latents (unit scale in both I1 samplers)."""
    engine = engines["i1"]
    req = request(engines, "i1", "fast", strength=0.3, **files("i1"))
    engine.prepare([req], lambda line: None)  # prompts encoded, transformer loaded: nothing reloads it
    seen, real = [], engine.transformer
    monkeypatch.setattr(engine, "transformer", lambda x, *rest: seen.append(np.array(x)) or real(x, *rest))
    engine.run(req)
    rec = req.recipe
    schedule = i1_schedule(rec.sampler_recipe(), official_mu=rec.mu_shift, max_seq=engine.source.transformer.max_seq)
    sigma = float(schedule.sigmas[start_step(10, 0.3)])
    w, h = size_of("i1")
    latents = np.array(engine._load_vae().encode_uint8(source_pixels(w, h)))
    noise = np.array(initial_latents(SEED, engine.latent_shape(req)))
    np.testing.assert_allclose(seen[0], (1 - sigma) * latents + sigma * noise, atol=1e-4)


@pytest.mark.parametrize("family", RECIPES)
def test_a_grey_mask_repaints_partly_and_the_request_records_both_files(engines, files, family):
    w, h = size_of(family)
    req = request(engines, family, RECIPES[family][0], strength=0.5,
                  **files(family, mask=np.full((h, w), 128, np.uint8)))
    meta = req.metadata()
    assert meta["init_image"]["name"] == f"{family}-source.png" and len(meta["init_image"]["sha256"]) == 64
    assert meta["mask"]["name"] == f"{family}-mask.png" and meta["mask_blur"] == 4 and meta["strength"] == 0.5
    out, src = image(engines, family, req), source_pixels(w, h).astype(int)
    assert (out != src).mean() > 0.5  # half of the generated image is mixed in everywhere


def test_without_a_start_image_a_request_records_none_of_its_keys(engines):
    for family in RECIPES:
        meta = request(engines, family, RECIPES[family][0]).metadata()
        assert not {"init_image", "strength", "mask", "mask_blur", "steps_run"} & set(meta)


def test_warm_up_requests_drop_the_start_image(engines, files):
    """What eval's warm-up does to a request (2 steps): a start image could then run no step."""
    req = request(engines, "o1", "dev", strength=0.3, **files("o1"))
    short = dataclasses.replace(req, recipe=req.recipe.with_overrides(steps=2), start=None)
    assert short.run_steps == 2
    mx.eval(mx.array(image(engines, "o1", short)))
