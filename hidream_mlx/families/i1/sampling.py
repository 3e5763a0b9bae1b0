"""HiDream-I1 schedules and the sampling loop (Full: UniPC + CFG; Dev/Fast: flash Euler).

The transformer predicts ``x0 - noise``; the samplers take its negation. CFG (guidance > 1)
runs the batch ``[uncond, cond]`` and combines ``u + g (c - u)`` after the negation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import mlx.core as mx
import numpy as np

from hidream_mlx.noise import TorchRandn
from hidream_mlx.family import uses_cfg
from hidream_mlx.schedulers import (NUM_TRAIN_TIMESTEPS, FlashEulerSampler, Schedule, UniPCSampler,
                                    flow_match_schedule)

_F32 = np.float32


@dataclass(frozen=True)
class Recipe:
    sampler: str  # "unipc" or "flash"
    steps: int
    guidance: float
    shift: float

    @property
    def uses_cfg(self) -> bool:
        return uses_cfg(self.guidance)


RECIPES = {
    "full": Recipe("unipc", 50, 5.0, 3.0),
    "dev": Recipe("flash", 28, 0.0, 6.0),
    "fast": Recipe("flash", 16, 0.0, 3.0),
}


def _shift(x, s):
    return s * x / (1 + (s - 1) * x)


def calculate_shift(seq_len: int, base_seq: int = 256, max_seq: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """The pipeline's ``mu``: linear in the token count between (256, 0.5) and (4096, 1.15)."""
    slope = (max_shift - base_shift) / (max_seq - base_seq)
    return seq_len * slope + base_shift - slope * base_seq


def unipc_i1_schedule(num_steps: int, shift: float, second_shift: Optional[float] = None) -> Schedule:
    """``FlowUniPCMultistepScheduler``: the constructor shifts the 1000-point grid by
    ``shift``; ``set_timesteps`` spreads its bounds and shifts again by ``second_shift``
    (``shift`` in diffusers' pipeline, ``exp(mu)`` in the official one). Timesteps int64."""
    second = shift if second_shift is None else second_shift
    grid = (1.0 - np.linspace(1, 1 / NUM_TRAIN_TIMESTEPS, NUM_TRAIN_TIMESTEPS)[::-1]).astype(_F32)
    grid = _shift(grid, _F32(shift))
    sigmas = _shift(np.linspace(float(grid[0]), float(grid[-1]), num_steps + 1)[:-1], second)
    timesteps = (sigmas * NUM_TRAIN_TIMESTEPS).astype(np.int64)
    return Schedule(timesteps, np.append(sigmas, 0.0).astype(_F32))


def i1_schedule(recipe: Recipe, steps: Optional[int] = None, official_mu: bool = False,
                max_seq: int = 4096) -> Schedule:
    """Schedule of a recipe. ``official_mu`` selects the official pipeline's UniPC variant
    (second shift ``exp(calculate_shift(max_seq))``, max_seq from the transformer config);
    the default follows diffusers' pipeline (config shift twice)."""
    n = recipe.steps if steps is None else steps
    if recipe.sampler == "flash":
        return flow_match_schedule(n, recipe.shift)
    second = math.exp(calculate_shift(max_seq)) if official_mu else None
    return unipc_i1_schedule(n, recipe.shift, second)


def make_sampler(recipe: Recipe, schedule: Schedule):
    if recipe.sampler == "flash":
        return FlashEulerSampler(schedule, noise_scale_start=1.0)
    return UniPCSampler(schedule)


def initial_latents(seed: int, shape: tuple) -> mx.array:
    """``randn(shape)`` of ``torch.Generator("cpu").manual_seed(seed)``, float32."""
    return mx.array(TorchRandn(seed).randn(tuple(shape)))


class GlobalTorchNoise:
    """The flash sampler's per-step noise: ``torch.randn`` from the global RNG seeded with
    ``seed`` (independent of the pipeline's generator)."""

    def __init__(self, seed: int):
        self._rng = TorchRandn(seed)

    def __call__(self, i: int, shape: tuple) -> mx.array:
        return mx.array(self._rng.randn(tuple(shape)))


class RecordedNoise:
    """Per-step noise taken from an array [N-1, ...] (e.g. a fixture's ``step_noise``)."""

    def __init__(self, noise):
        self.noise = noise

    def __call__(self, i: int, shape: tuple) -> mx.array:
        return mx.array(self.noise[i])


def guided_prediction(output: mx.array, guidance: float) -> mx.array:
    """Negate the raw output; with CFG (rows [uncond, cond]) combine ``u + g (c - u)``."""
    pred = -output
    if uses_cfg(guidance):
        u, c = mx.split(pred, 2, axis=0)
        return u + guidance * (c - u)
    return pred


@dataclass
class Conditioning:
    """Transformer text inputs; with CFG the batch is already ``[uncond, cond]``."""

    t5: mx.array
    llama_stack: mx.array
    pooled: mx.array


def sample(model: Callable, cond: Conditioning, latents: mx.array, recipe: Recipe, schedule: Schedule,
           step_noise: Optional[Callable] = None, on_step: Optional[Callable] = None, first: int = 0,
           after_step: Optional[Callable] = None) -> mx.array:
    """Run the sampler from ``latents`` [1, C, h, w]. ``model(x, t, t5, llama, pooled)`` is
    the raw transformer. Flash draws ``step_noise(i, shape)`` on every step but the last,
    which returns its input unchanged. ``on_step(i, output, latents)`` sees each step
    (output None on the skipped last flash step).

    Image-to-image: the run starts at step ``first`` (``latents`` is then the source's state
    there; a multistep sampler starts at first order), and ``after_step(i, latents)`` (inpainting)
    returns the latents with the kept region replaced, after every step the last too."""
    sampler = make_sampler(recipe, schedule)
    if sampler.needs_noise and step_noise is None and len(schedule) - first > 1:
        raise ValueError("the flash sampler needs a per-step noise source")
    state = sampler.start()
    cfg = recipe.uses_cfg
    x = latents.astype(mx.float32)
    n = len(schedule)
    for i in range(first, n):
        if sampler.needs_noise and i == n - 1:
            # The I1 flash reference leaves the sample unchanged on its last step (no x0 jump,
            # no noise): the result keeps the noise of sigma_{N-1}. Its model call there is
            # wasted work, so it is skipped.
            if after_step is not None:
                x = after_step(i, x)
                mx.eval(x)
            if on_step is not None:
                on_step(i, None, x)
            break
        batch = mx.concatenate([x, x], axis=0) if cfg else x
        t = mx.full((batch.shape[0],), float(schedule.timesteps[i]), dtype=mx.float32)
        output = model(batch, t, cond.t5, cond.llama_stack, cond.pooled)
        noise = step_noise(i, x.shape) if sampler.needs_noise else None
        x = sampler.step(state, i, x, guided_prediction(output, recipe.guidance), noise)
        if after_step is not None:
            x = after_step(i, x)
        mx.eval(x)
        if on_step is not None:
            on_step(i, output, x)
    return x
