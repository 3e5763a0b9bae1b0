"""Noise: torch's CPU randn stream reproduced without torch, and the MLX alternative."""

import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import FIXTURES

from hidream_mlx.noise import MlxNoise, TorchNoise, TorchRandn, make_noise_source
from hidream_mlx.families.o1.patches import patchify


def _meta(case: str) -> dict:
    return json.loads((FIXTURES / "manifest.json").read_text())["files"]["_meta"][case]


def _assert_close_to_scale(actual, expected):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-6 * max(1.0, np.abs(expected).max()))


@pytest.mark.parametrize(
    "case, file, scale_key",
    [("dev_sampling", "dev_sampling.npz", "noise_scale_start"), ("full_sampling", "full_sampling.npz", "noise_scale")],
)
def test_initial_noise_matches_the_reference_z0(case, file, scale_key):
    meta = _meta(case)
    z0 = np.load(FIXTURES / file)["z"][0]
    image = TorchNoise(meta["seed"]).initial((3, meta["height"], meta["width"]))
    assert image.shape == (1, 3, meta["height"], meta["width"])
    assert image.dtype == mx.float32
    _assert_close_to_scale(patchify(np.array(image) * np.float32(meta[scale_key])), z0)


def test_dev_scales_initial_noise_by_7_5_and_full_by_8():
    assert _meta("dev_sampling")["noise_scale_start"] == 7.5
    assert _meta("full_sampling")["noise_scale"] == 8.0


def test_step_noise_continues_one_stream_across_steps():
    meta = _meta("dev_sampling")
    recorded = np.load(FIXTURES / "dev_sampling.npz")["noise_raw"]
    noise = TorchNoise(meta["seed"])
    noise.initial((3, meta["height"], meta["width"]))  # its own generator: must not disturb the steps
    for i, expected in enumerate(recorded):
        _assert_close_to_scale(noise.step(expected.shape), expected)


def test_torch_randn_keeps_its_position_between_calls():
    whole = TorchRandn(7).randn((4, 64))
    stream = TorchRandn(7)
    parts = np.concatenate([stream.randn((1, 64)), stream.randn((3, 64))])
    np.testing.assert_array_equal(parts, whole)


def test_torch_randn_is_float32_standard_normal():
    values = TorchRandn(0).randn((64, 1024))
    assert values.dtype == np.float32
    assert abs(values.mean()) < 0.02
    assert abs(values.std() - 1.0) < 0.02


def _uniforms_by_the_book(seed: int, count: int) -> np.ndarray:
    """The first ``count`` uniforms of torch's CPU generator: low 24 bits of each raw mt19937 output."""
    raw = np.random.RandomState(seed).randint(0, 2**32, size=count, dtype=np.uint32)
    return (raw & (2**24 - 1)).astype(np.float64) * 2.0**-24


def _box_muller_by_the_book(block: np.ndarray) -> np.ndarray:
    u1, u2 = 1.0 - block[:8], block[8:]
    radius = np.sqrt(-2.0 * np.log(u1))
    return np.concatenate([radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)])


def _randn_by_the_book(seed: int, count: int) -> np.ndarray:
    """SPEC section 3 written out plainly, in float64: Box-Muller per block of 16; a count not
    divisible by 16 redoes its last 16 values from 16 fresh uniforms."""
    uniform = _uniforms_by_the_book(seed, count + 16)
    out = uniform[:count].copy()
    for start in range(0, count - count % 16, 16):
        out[start : start + 16] = _box_muller_by_the_book(out[start : start + 16])
    if count % 16:
        out[count - 16 :] = _box_muller_by_the_book(uniform[count : count + 16])
    return out


@pytest.mark.parametrize("count", [16, 48, 40, 3 * 32 * 32 + 8])
def test_torch_randn_follows_the_documented_algorithm_including_the_tail(count):
    np.testing.assert_allclose(TorchRandn(3).randn((count,)), _randn_by_the_book(3, count), atol=2e-6)


def test_torch_randn_with_a_tail_moves_the_stream_on_by_count_plus_16():
    stream = TorchRandn(3)
    stream.randn((40,))
    expected = _box_muller_by_the_book(_uniforms_by_the_book(3, 72)[56:])
    np.testing.assert_allclose(stream.randn((16,)), expected, atol=2e-6)


def test_torch_randn_refuses_tiny_tensors_it_cannot_reproduce():
    with pytest.raises(ValueError, match="at least 16"):
        TorchRandn(0).randn((3, 5))


def test_same_seed_gives_same_noise_and_other_seed_differs():
    a, b, c = TorchNoise(5), TorchNoise(5), TorchNoise(6)
    np.testing.assert_array_equal(np.array(a.initial((3, 32, 32))), np.array(b.initial((3, 32, 32))))
    assert not np.array_equal(np.array(a.step((1, 1, 3072))), np.array(c.step((1, 1, 3072))))


def test_mlx_noise_is_deterministic_and_never_repeats_within_a_run():
    a, b = MlxNoise(11), MlxNoise(11)
    first, again = a.step((1, 2, 3072)), b.step((1, 2, 3072))
    np.testing.assert_array_equal(np.array(first), np.array(again))
    assert not np.array_equal(np.array(first), np.array(a.step((1, 2, 3072))))
    image = a.initial((3, 64, 32))
    assert image.shape == (1, 3, 64, 32) and image.dtype == mx.float32
    np.testing.assert_array_equal(np.array(image), np.array(b.initial((3, 64, 32))))


def test_make_noise_source_picks_by_name():
    assert isinstance(make_noise_source("torch", 1), TorchNoise)
    assert isinstance(make_noise_source("mlx", 1), MlxNoise)
    with pytest.raises(ValueError, match="unknown noise kind"):
        make_noise_source("cuda", 1)
