"""Gaussian noise for sampling: torch's CPU ``randn`` stream reproduced in numpy, or MLX's own.

The official pipeline draws its initial noise ``scale * randn(1, 3, H, W)`` from a CPU
generator seeded ``seed + 1``, and the flash scheduler draws its per-step noise from torch's
global generator, also seeded ``seed + 1``. Matching those draws is what makes our images
equal the reference for the same seed, so :class:`TorchNoise` replays that arithmetic exactly
(up to float rounding) without needing torch. :class:`MlxNoise` is the faster, non-matching
alternative behind ``--noise mlx``.
"""

from __future__ import annotations

from typing import Protocol

import mlx.core as mx
import numpy as np

# torch turns every 16 uniforms into 16 normals (Box-Muller on pairs j, j+8).
_BLOCK = 16
_HALF = _BLOCK // 2
_MANTISSA_MASK = (1 << 24) - 1
_TWO_PI_F32 = np.float32(2.0 * np.pi)


def _mt19937(seed: int) -> np.random.MT19937:
    """An mt19937 seeded like ``std::mt19937(seed)`` (torch's CPU generator).

    numpy's legacy ``RandomState(seed)`` uses the same ``init_genrand``; its state is copied
    into a bare ``MT19937`` so the raw 32-bit outputs can be read with ``random_raw``.
    torch keeps only the low 32 bits of a seed.
    """
    _, key, pos, _, _ = np.random.RandomState(seed & 0xFFFFFFFF).get_state()
    generator = np.random.MT19937()
    generator.state = {"bit_generator": "MT19937", "state": {"key": key, "pos": pos}}
    return generator


class TorchRandn:
    """``torch.randn(..., dtype=float32)`` on a CPU generator, as a numpy stream.

    The generator position persists between calls, so successive ``randn`` calls give the
    same values as successive torch draws from one generator.
    """

    def __init__(self, seed: int):
        self._mt = _mt19937(seed)

    def _uniforms(self, count: int) -> np.ndarray:
        # torch's uniform float: the low 24 bits of one 32-bit output, times 2^-24 (exact).
        raw = self._mt.random_raw(count).astype(np.uint32)
        return (raw & _MANTISSA_MASK).astype(np.float32) * np.float32(2.0**-24)

    @staticmethod
    def _box_muller(blocks: np.ndarray) -> np.ndarray:
        """[B, 16] uniforms -> [B, 16] normals, float32 arithmetic as in torch's fill."""
        u1 = np.float32(1.0) - blocks[:, :_HALF]
        u2 = blocks[:, _HALF:]
        radius = np.sqrt(np.float32(-2.0) * np.log(u1))
        theta = _TWO_PI_F32 * u2
        return np.concatenate([radius * np.cos(theta), radius * np.sin(theta)], axis=1)

    def randn(self, shape: tuple[int, ...]) -> np.ndarray:
        """Standard normal float32 array of ``shape``, filled in C (row-major) order."""
        count = int(np.prod(shape, dtype=np.int64))
        if count < _BLOCK:
            # torch switches to a double-precision sampler for tiny tensors; real shapes
            # (3*H*W, N*3072) are never that small, so it is not reproduced.
            raise ValueError(f"torch-compatible randn needs at least {_BLOCK} values, got shape {shape}")
        values = self._uniforms(count)
        whole = count - count % _BLOCK
        values[:whole] = self._box_muller(values[:whole].reshape(-1, _BLOCK)).ravel()
        if whole != count:
            # torch redoes the last 16 values (overlapping the previous block) from 16 fresh uniforms.
            tail = self._uniforms(_BLOCK).reshape(1, _BLOCK)
            values[count - _BLOCK:] = self._box_muller(tail).ravel()
        return values.reshape(shape)


class NoiseSource(Protocol):
    """What the sampling loop asks for: one initial noise image, then noise for each step."""

    def initial(self, shape_chw: tuple[int, int, int]) -> mx.array:
        """Unit-variance noise image of shape (1, C, H, W); the caller scales and patchifies it."""
        ...

    def step(self, shape: tuple[int, ...]) -> mx.array:
        """Unit-variance noise for one scheduler step, in patch layout, e.g. (1, N, 3072)."""
        ...


class TorchNoise:
    """The official pipeline's noise: two independent torch generators, both seeded ``seed + 1``.

    One makes the initial image, the other (torch's global generator in the reference) feeds
    every flash-scheduler step in turn. Each draw is filled in its own memory order, so the
    per-step noise is drawn directly in patch layout.
    """

    def __init__(self, seed: int):
        self.seed = seed
        self._initial = TorchRandn(seed + 1)
        self._steps = TorchRandn(seed + 1)

    def initial(self, shape_chw: tuple[int, int, int]) -> mx.array:
        return mx.array(self._initial.randn((1, *shape_chw)))

    def step(self, shape: tuple[int, ...]) -> mx.array:
        return mx.array(self._steps.randn(tuple(shape)))


class MlxNoise:
    """Noise from ``mx.random``: fast and deterministic per seed, but not the reference images.

    The key for ``seed + 1`` is split into an initial-image key and a step key; every step
    splits the step key again, so draws never repeat within a run.
    """

    def __init__(self, seed: int):
        self.seed = seed
        self._initial_key, self._step_key = mx.random.split(mx.random.key(seed + 1))

    def initial(self, shape_chw: tuple[int, int, int]) -> mx.array:
        return mx.random.normal((1, *shape_chw), dtype=mx.float32, key=self._initial_key)

    def step(self, shape: tuple[int, ...]) -> mx.array:
        self._step_key, key = mx.random.split(self._step_key)
        return mx.random.normal(tuple(shape), dtype=mx.float32, key=key)


NOISE_KINDS = ("torch", "mlx")


def make_noise_source(kind: str, seed: int) -> NoiseSource:
    """``"torch"`` reproduces the official images; ``"mlx"`` uses MLX's generator."""
    if kind == "torch":
        return TorchNoise(seed)
    if kind == "mlx":
        return MlxNoise(seed)
    raise ValueError(f"unknown noise kind {kind!r}; choose one of {', '.join(NOISE_KINDS)}")
