"""Text (and reference images) -> image: the sampling loop as a generator of steps.

``encode`` runs the prompt side once (prefix caches for the prompt and, with CFG, the
unconditional prompt). ``sample`` then yields one :class:`Step` per scheduler step with the
new latent and the x0 preview; the caller forces ``mx.eval`` and times each step, so progress
bars, previews and benchmarks all live outside the library.

Per step, exactly as the reference: ``t_model = 1 - t/1000``, ``sigma = max(t/1000, 0.001)``,
``v = (x_pred - z)/sigma``, CFG on v, and the scheduler steps with ``-v``; all in float32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import mlx.core as mx
import numpy as np

from .config import PATCH_DIM
from .patches import grid_size, patchify
from .positions import patch_positions, text_positions
from .prompt import UNCOND_PROMPT, Tokenizer, encode_prompt
from .recipes import Recipe
from .schedulers import (
    FlashEulerSampler,
    FlowMatchEulerSampler,
    Schedule,
    UniPCSampler,
    dev_timesteps,
    pipeline_schedule,
)
from .transformer import HiDreamO1, PrefixCache


@dataclass
class PromptState:
    """One prompt's prefix cache and the positions of its generation tokens (tms + patches)."""

    cache: PrefixCache
    positions: np.ndarray  # [3, 1 + N (+ refs)]


@dataclass
class Conditioning:
    cond: PromptState
    uncond: Optional[PromptState] = None
    # Editing: reference patches appended after the target patches at every step.
    ref_patches: Optional[mx.array] = None

    @property
    def arrays(self) -> list[mx.array]:
        states = [s for s in (self.cond, self.uncond) if s is not None]
        return [a for s in states for kv in s.cache.layers for a in (kv.keys, kv.values)]


@dataclass
class Step:
    index: int  # 0-based
    total: int
    timestep: float
    latent: mx.array  # z after this step, [1, N, 3072] float32
    preview: mx.array  # the guided x0 prediction at this step, [1, N, 3072]


def schedule_for(recipe: Recipe) -> Schedule:
    if recipe.distilled:
        return pipeline_schedule("flash", recipe.steps, recipe.shift, timesteps=dev_timesteps(recipe.steps))
    scheduler = "default" if recipe.scheduler == "unipc" else recipe.scheduler
    return pipeline_schedule(scheduler, recipe.steps, recipe.shift)


def sampler_for(recipe: Recipe, schedule: Optional[Schedule] = None):
    schedule = schedule or schedule_for(recipe)
    if recipe.scheduler == "flash":
        return FlashEulerSampler(schedule, recipe.s_noise, recipe.s_noise, recipe.noise_clip)
    if recipe.scheduler == "flow_match":
        return FlowMatchEulerSampler(schedule)
    return UniPCSampler(schedule)


def encode_prompt_state(model: HiDreamO1, ids: np.ndarray, grid: tuple[int, int],
                        extra_positions: Optional[np.ndarray] = None) -> PromptState:
    """Prefix cache for text ids (ending with boi, tms) and the generation-token positions."""
    n_prefix = len(ids) - 1
    cache = model.encode_prefix(mx.array(ids[None, :n_prefix]), text_positions(n_prefix))
    parts = [text_positions(1, start=n_prefix), patch_positions(*grid)]
    if extra_positions is not None:
        parts.append(extra_positions)
    return PromptState(cache, np.concatenate(parts, axis=1))


def encode(model: HiDreamO1, tokenizer: Tokenizer, prompt: str, height: int, width: int,
           guidance: float, uncond_prompt: str = UNCOND_PROMPT) -> Conditioning:
    """The prompt side of a text-to-image run, computed once."""
    if not prompt or not prompt.strip():
        raise ValueError("the prompt is empty")
    grid = grid_size(height, width)
    cond = encode_prompt_state(model, encode_prompt(tokenizer, prompt).input_ids, grid)
    uncond = None
    if guidance > 1.0:
        uncond = encode_prompt_state(model, encode_prompt(tokenizer, uncond_prompt).input_ids, grid)
    return Conditioning(cond, uncond)


def encode_synthetic(model: HiDreamO1, prompt: str, height: int, width: int, guidance: float) -> Conditioning:
    """Like ``encode`` for tokenizer-less (random-weight) models: about one token per word."""
    from .synthetic import synthetic_prompt_ids

    grid = grid_size(height, width)
    text_len = 14 + len(prompt.split()) * 4 // 3  # chat template overhead + words
    cond = encode_prompt_state(model, synthetic_prompt_ids(text_len), grid)
    uncond = encode_prompt_state(model, synthetic_prompt_ids(13, seed=1), grid) if guidance > 1.0 else None
    return Conditioning(cond, uncond)


def initial_latent(noise, recipe: Recipe, height: int, width: int) -> mx.array:
    """``noise_scale * N(0,1)`` drawn as a (1, 3, H, W) image, then patchified, as the reference."""
    image = noise.initial((3, height, width))
    return patchify(image.astype(mx.float32) * recipe.noise_scale)


def _x_pred(model: HiDreamO1, state: PromptState, z: mx.array, t_model: float,
            ref_patches: Optional[mx.array]) -> mx.array:
    patches = z if ref_patches is None else mx.concatenate([z, ref_patches.astype(z.dtype)], axis=1)
    return model.denoise(state.cache, mx.array([t_model], dtype=mx.float32), patches, state.positions,
                         num_target=z.shape[1])


def velocity(model: HiDreamO1, cond: Conditioning, z: mx.array, t_model: float, sigma: float,
             guidance: float) -> mx.array:
    """The guided flow velocity v = (x_pred - z)/sigma, with CFG on v when there is an uncond pass."""
    v = (_x_pred(model, cond.cond, z, t_model, cond.ref_patches) - z) / sigma
    if cond.uncond is None:
        return v
    v_u = (_x_pred(model, cond.uncond, z, t_model, cond.ref_patches) - z) / sigma
    return v_u + guidance * (v - v_u)


def sample(
    model: HiDreamO1,
    cond: Conditioning,
    recipe: Recipe,
    z: mx.array,
    noise=None,
    step_noise: Optional[Callable[[int, tuple], mx.array]] = None,
) -> Iterator[Step]:
    """Denoise ``z`` [1, N, 3072] with the recipe's sampler, yielding each step (not evaluated).

    Flash noise comes from ``step_noise(i, shape)`` if given (replay injects recorded draws),
    else from ``noise.step(shape)``.
    """
    schedule = schedule_for(recipe)
    sampler = sampler_for(recipe, schedule)
    state = sampler.start()
    times, sigmas = schedule.model_times, schedule.velocity_sigmas
    z = z.astype(mx.float32)
    total = len(schedule)
    for i in range(total):
        sigma = float(sigmas[i])
        v = velocity(model, cond, z, float(times[i]), sigma, recipe.guidance)
        preview = z + sigma * v
        draw = None
        if sampler.needs_noise:
            draw = step_noise(i, z.shape) if step_noise is not None else noise.step(z.shape)
        z = sampler.step(state, i, z, -v, draw)
        yield Step(i, total, float(schedule.timesteps[i]), z, preview)
