"""The shared rules of starting from an image: which steps run, where a multistep sampler starts,
how a mask is read, how far its edge blends, and which option combinations are refused."""

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from hidream_mlx.family import RequestError, start_image
from hidream_mlx.images import composite, edge_blend, read_mask
from hidream_mlx.schedulers import (UniPCSampler, noised, smallest_strength, start_step, steps_to_run,
                                    unipc_schedule)


# --- which steps run -----------------------------------------------------------------------------

@pytest.mark.parametrize("steps,strength,runs", [(10, 0.3, 3), (10, 1.0, 10), (28, 0.8, 22), (50, 0.75, 37),
                                                 (3, 0.3, 0), (10, 0.05, 0)])
def test_a_strength_runs_the_last_int_steps_times_strength_steps(steps, strength, runs):
    assert steps_to_run(steps, strength) == runs
    assert start_step(steps, strength) == steps - runs


def test_the_smallest_strength_named_in_a_refusal_runs_exactly_one_step_and_a_thousandth_less_none():
    for steps in range(1, 1001):
        smallest = smallest_strength(steps)
        assert steps_to_run(steps, smallest) == 1, steps
        assert steps_to_run(steps, round(smallest - 0.001, 3)) == 0, steps
    assert smallest_strength(3) == 0.334 and smallest_strength(49) == 0.021  # 49 * (1/49) rounds below 1


def test_noised_is_the_clean_sample_exactly_at_sigma_zero_and_the_noise_at_one():
    clean, noise = mx.array([0.25, -1.0, 3.5]), mx.array([7.0, -2.0, 0.5])
    assert np.array_equal(np.array(noised(clean, noise, 0.0)), np.array(clean))
    assert np.array_equal(np.array(noised(clean, noise, 1.0)), np.array(noise))
    np.testing.assert_allclose(np.array(noised(clean, noise, 0.25)), 0.25 * np.array(noise) + 0.75 * np.array(clean))


def test_unipc_started_mid_schedule_takes_a_first_order_step_then_second_order():
    """As diffusers' multistep schedulers count their own steps: no x0 history, no second order."""
    schedule = unipc_schedule(10, 3.0)
    sampler = UniPCSampler(schedule)
    state, x = sampler.start(), mx.ones((1, 4, 8))
    orders = []
    for i in range(6, 10):
        x = sampler.step(state, i, x, mx.full(x.shape, 0.1 * i))
        orders.append((state.order, state.corrected))
    assert orders == [(1, False), (2, True), (2, True), (1, True)]  # the schedule's last step is first order


def test_unipc_from_step_zero_keeps_its_official_orders():
    sampler = UniPCSampler(unipc_schedule(4, 3.0))
    state, x = sampler.start(), mx.ones((1, 2, 8))
    orders = []
    for i in range(4):
        x = sampler.step(state, i, x, mx.full(x.shape, 0.5))
        orders.append(state.order)
    assert orders == [1, 2, 2, 1]


# --- masks ---------------------------------------------------------------------------------------

def test_the_edge_blend_reaches_at_most_the_radius_into_the_kept_region_and_leaves_the_repainted_whole():
    mask = np.zeros((40, 50), np.float32)
    mask[10:20, 20:30] = 1.0
    for radius in (0, 1, 4, 9):
        weight = edge_blend(mask, radius)
        assert np.array_equal(weight[mask == 1], np.ones(100, np.float32))
        ys, xs = np.nonzero(weight > 0)
        # Chessboard distance from the white square: never more than the radius.
        distance = np.maximum(np.maximum(10 - ys, ys - 19), np.maximum(20 - xs, xs - 29)).clip(min=0)
        assert distance.max() == radius
        assert weight[15, 30 + radius - 1 if radius else 29] > 0 and weight[15, 30 + radius] == 0
    ramp = edge_blend(mask, 3)[15, 29:35]
    np.testing.assert_allclose(ramp, [1.0, 0.75, 0.5, 0.25, 0.0, 0.0])


def test_the_composite_is_the_source_where_the_weight_is_zero_and_the_generated_where_it_is_one():
    rng = np.random.default_rng(0)
    generated, source = (rng.integers(0, 256, (6, 7, 3), dtype=np.uint8) for _ in range(2))
    weight = np.zeros((6, 7), np.float32)
    weight[:, 4:] = 1.0
    weight[:, 3] = 0.5
    out = composite(generated, source, weight)
    assert np.array_equal(out[:, :3], source[:, :3]) and np.array_equal(out[:, 4:], generated[:, 4:])
    expected = np.round(source[:, 3].astype(np.float32) * 0.5 + generated[:, 3].astype(np.float32) * 0.5)
    assert np.abs(out[:, 3].astype(int) - expected).max() <= 1


def test_a_mask_is_its_grey_level_resized_to_the_render_size(tmp_path):
    picture = np.zeros((10, 20), np.uint8)
    picture[:, 10:] = 255
    picture[0, 0] = 128
    Image.fromarray(picture).convert("RGB").save(tmp_path / "m.png")
    same = read_mask(tmp_path / "m.png", 20, 10)
    assert same.dtype == np.float32 and same[5, 15] == 1.0 and same[5, 2] == 0.0
    assert abs(same[0, 0] - 128 / 255) < 1e-6
    larger = read_mask(tmp_path / "m.png", 40, 20)
    assert larger.shape == (20, 40) and larger[10, 35] == 1.0 and larger[10, 4] == 0.0


def test_a_mask_with_transparency_repaints_where_it_is_transparent_as_openai_masks_do(tmp_path):
    """The OpenAI edits API's masks: the source itself with a transparent hole where to edit."""
    rgba = np.full((8, 8, 4), 255, np.uint8)
    rgba[..., :3] = 90  # opaque content of any colour keeps
    rgba[2:6, 2:6, 3] = 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "hole.png")
    mask = read_mask(tmp_path / "hole.png", 8, 8)
    assert mask[3, 3] == 1.0 and mask[0, 0] == 0.0 and mask.sum() == 16


# --- the option rules (before any weight loads) -------------------------------------------------

@pytest.fixture()
def picture(tmp_path):
    path = tmp_path / "pic.png"
    Image.fromarray(np.zeros((24, 40, 3), np.uint8)).save(path)
    return str(path)


def test_the_default_strength_is_0_8_without_a_mask_and_1_with_one(picture):
    assert start_image({"init_image": picture}, 10).strength == 0.8
    start = start_image({"init_image": picture, "mask": picture}, 10)
    assert start.strength == 1.0 and start.mask_blur == 4 and start.size == (40, 24)
    assert start_image({}, 10) is None


@pytest.mark.parametrize("options,message", [
    ({"mask": "PIC"}, "--mask needs --init-image"),
    ({"strength": 0.5}, "--strength needs --init-image"),
    ({"mask_blur": 2}, "--mask-blur needs --init-image"),
    ({"init_image": "PIC", "mask_blur": 2}, "--mask-blur needs --mask"),
    ({"init_image": "PIC", "strength": 0.0}, "--strength must be > 0 and <= 1, got 0.0"),
    ({"init_image": "PIC", "strength": 1.5}, "--strength must be > 0 and <= 1, got 1.5"),
    ({"init_image": "PIC", "strength": float("nan")}, "--strength must be a finite number"),
    ({"init_image": "PIC", "mask": "PIC", "mask_blur": -1}, "--mask-blur must be >= 0"),
    ({"init_image": "missing.png"}, "--init-image missing.png: image not found"),
    ({"init_image": "PIC", "mask": "NOT_AN_IMAGE"}, "--mask NOT_AN_IMAGE: not a readable image"),
    ({"init_image": "PIC", "strength": 0.3, "steps": 3}, "--strength 0.3 runs no step of 3 (int(3 x 0.3) = 0); "
                                                         "the smallest strength that runs one is 0.334"),
])
def test_bad_start_options_are_refused_in_one_line(picture, tmp_path, options, message):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    steps = options.pop("steps", 10)
    options = {k: picture if v == "PIC" else str(junk) if v == "NOT_AN_IMAGE" else v for k, v in options.items()}
    with pytest.raises(RequestError) as error:
        start_image(options, steps)
    assert str(error.value).replace(str(junk), "NOT_AN_IMAGE").startswith(message)
    assert "\n" not in str(error.value)
