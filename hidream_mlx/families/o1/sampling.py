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

from hidream_mlx.families.o1.patches import grid_size, patchify
from hidream_mlx.families.o1.positions import t2i_positions
from hidream_mlx.families.o1.prompt import (
    SYNTHETIC_TEMPLATE_TOKENS,
    UNCOND_PROMPT,
    Tokenizer,
    encode_prompt,
    synthetic_prompt_tokens,
)
from hidream_mlx.families.o1.recipes import Recipe
from hidream_mlx.family import uses_cfg
from hidream_mlx.families.o1.seam_smoothing import SeamSmoothing, ShiftedPass, shifted_grid_positions
from hidream_mlx.schedulers import (
    FlashEulerSampler,
    FlowMatchEulerSampler,
    Schedule,
    UniPCSampler,
    dev_timesteps,
    noised,
    pipeline_schedule,
)
from hidream_mlx.families.o1.transformer import HiDreamO1, PrefixCache, stack_prefix_caches
from hidream_mlx.families.o1.references import edit_prompt_text, edit_sequence
from hidream_mlx.families.o1.synthetic import synthetic_prompt_ids


@dataclass
class PromptState:
    """One prompt's prefix cache and the positions of its generation tokens (tms + patches)."""

    cache: PrefixCache
    positions: np.ndarray  # [3, 1 + N (+ refs)]
    rope: tuple[mx.array, mx.array]  # their rotary tables, built once instead of at every step


@dataclass
class Conditioning:
    cond: PromptState
    uncond: Optional[PromptState] = None
    # Editing: reference patches appended after the target patches at every step.
    ref_patches: Optional[mx.array] = None

    @property
    def arrays(self) -> list[mx.array]:
        states = [s for s in (self.cond, self.uncond) if s is not None]
        return [a for s in states for a in (*s.rope, *(t for kv in s.cache.layers for t in (kv.keys, kv.values)))]


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


def prompt_state(model: HiDreamO1, ids, positions, n_prefix: int, image_embeds: Optional[mx.array] = None,
                 deepstack: Sequence[mx.array] = ()) -> PromptState:
    """Cache the first ``n_prefix`` tokens of ``ids`` at their ``positions`` [3, L]; the rest of
    the positions belong to the generation tokens. ``image_embeds`` (editing) replace the
    ``<|image_pad|>`` rows of the prefix."""
    prefix = np.asarray(ids).reshape(1, -1)[:, :n_prefix]
    positions = np.asarray(positions).reshape(3, -1)
    image_mask = None if image_embeds is None else prefix == model.config.image_token_id
    cache = model.encode_prefix(mx.array(prefix), positions[:, :n_prefix], image_embeds, image_mask, deepstack)
    generation = positions[:, n_prefix:]
    return PromptState(cache, generation, model.rope(generation))


def encode_prompt_state(model: HiDreamO1, ids: np.ndarray, grid: tuple[int, int]) -> PromptState:
    """Prefix cache for text ids (ending with boi, tms) and the generation-token positions."""
    return prompt_state(model, ids, t2i_positions(len(ids), *grid), len(ids) - 1)


def encode(model: HiDreamO1, tokenizer: Tokenizer, prompt: str, height: int, width: int,
           guidance: float, uncond_prompt: str = UNCOND_PROMPT) -> Conditioning:
    """The prompt side of a text-to-image run, computed once."""
    if not prompt or not prompt.strip():
        raise ValueError("the prompt is empty")
    grid = grid_size(height, width)
    cond = encode_prompt_state(model, encode_prompt(tokenizer, prompt), grid)
    uncond = None
    if uses_cfg(guidance):
        uncond = encode_prompt_state(model, encode_prompt(tokenizer, uncond_prompt), grid)
    return Conditioning(cond, uncond)


def encode_with_references(model: HiDreamO1, vision, tokenizer: Tokenizer, prompt: str, refs,
                           guidance: float, uncond_prompt: str = UNCOND_PROMPT) -> Conditioning:
    """The prompt side of an editing / subject-driven run (``refs`` from ``prepare_references``).

    The vision tower runs once; its embeddings replace the ``<|image_pad|>`` rows of both the
    prompt and the unconditional prompt (which carries the same images), and the reference
    patches ride along after the target patches at every step.
    """
    if not prompt or not prompt.strip():
        raise ValueError("the prompt is empty")
    cfg = model.config
    embeds, deepstack = vision(mx.array(refs.pixel_values), refs.image_grid_thw)
    embeds = embeds.astype(model.dtype)

    def state(text: str) -> PromptState:
        ids = tokenizer.encode(edit_prompt_text(text, refs.token_counts))
        seq = edit_sequence(ids, refs.image_grid_thw, (refs.height, refs.width), refs.ref_grids,
                            image_token_id=cfg.image_token_id, vision_start_token_id=cfg.vision_start_token_id,
                            spatial_merge_size=cfg.vision.spatial_merge_size)
        return prompt_state(model, ids, seq.position_ids, seq.text_len - 1, embeds, deepstack)

    uncond = state(uncond_prompt) if uses_cfg(guidance) else None
    return Conditioning(state(prompt), uncond, mx.array(refs.ref_patches)[None])


def encode_synthetic(model: HiDreamO1, prompt: str, height: int, width: int, guidance: float) -> Conditioning:
    """Like ``encode`` for tokenizer-less (random-weight) models: about one token per word."""
    grid = grid_size(height, width)
    text_len = SYNTHETIC_TEMPLATE_TOKENS + synthetic_prompt_tokens(prompt)  # chat template overhead + words
    cond = encode_prompt_state(model, synthetic_prompt_ids(text_len), grid)
    uncond = encode_prompt_state(model, synthetic_prompt_ids(13, seed=1), grid) if uses_cfg(guidance) else None
    return Conditioning(cond, uncond)


def initial_noise(noise, height: int, width: int) -> mx.array:
    """The unit noise N(0,1) of a run, drawn as a (1, 3, H, W) image (as the reference), patchified."""
    return patchify(noise.initial((3, height, width)).astype(mx.float32))


def initial_latent(noise, recipe: Recipe, height: int, width: int) -> mx.array:
    """``noise_scale * N(0,1)``: the state the text-to-image run starts from (scaling before or
    after patchifying gives the same values: it only moves them)."""
    return initial_noise(noise, height, width) * recipe.noise_scale


@dataclass
class Start:
    """Image-to-image in patch space: the step the run starts at, the source, the unit noise it is
    brought to a noise level with, and (inpainting) where the source is kept."""

    first: int  # index of the first step that runs
    source: mx.array  # the source's patches [1, N, 3072], in [-1, 1]
    noise: mx.array  # the text-to-image run's initial noise before its scale, in patch layout
    repaint: Optional[mx.array] = None  # inpainting: the mask in patch layout (1 repaints); None: no mask
    keep: Optional[mx.array] = field(init=False, default=None)  # 1 - repaint

    def __post_init__(self):
        self.keep = None if self.repaint is None else 1.0 - self.repaint


def source_patches(pixels: np.ndarray) -> mx.array:
    """uint8 HWC -> [1, N, 3072] patches in [-1, 1], the space O1 samples in (``to_uint8``'s inverse)."""
    image = np.asarray(pixels, dtype=np.float32).transpose(2, 0, 1) / np.float32(127.5) - np.float32(1.0)
    return mx.array(patchify(image))[None]


def mask_patches(mask: np.ndarray) -> mx.array:
    """A [H, W] mask on each of the 3 channels, in patch layout [1, N, 3072]."""
    return mx.array(patchify(np.broadcast_to(np.asarray(mask, dtype=np.float32), (3, *mask.shape))))[None]


def state_noise_scale(recipe: Recipe, sampler, i: int) -> float:
    """The scale of the noise in the sampler's state entering step ``i``: the initial noise's scale,
    except after a flash step, which re-noises with its own ``s_noise`` of that step."""
    if recipe.scheduler == "flash" and i > 0:
        return sampler.s_noise(i - 1)
    return recipe.noise_scale


def source_at(start: Start, recipe: Recipe, sampler, schedule: Schedule, i: int) -> mx.array:
    """The source brought to the state of step ``i`` (``i`` = the step count: clean, sigma 0):
    ``(1 - sigma) * source + sigma * scale * noise``, the pixel-space flow every O1 sampler steps along."""
    scale = state_noise_scale(recipe, sampler, i)
    return noised(start.source, scale * start.noise, float(schedule.sigmas[i]))


def _x_pred(model: HiDreamO1, state: PromptState, z: mx.array, t_model: float,
            ref_patches: Optional[mx.array]) -> mx.array:
    patches = z if ref_patches is None else mx.concatenate([z, ref_patches.astype(z.dtype)], axis=1)
    return model.denoise(state.cache, mx.array([t_model], dtype=mx.float32), patches, state.positions,
                         num_target=z.shape[1], rope=state.rope)


# Measured with ``hidream-mlx bench --guidance 5 --compare-cfg`` (CPU, mid dims): the batch of 2
# runs at the same speed as two passes (512²: 1.57 vs 1.53 s/step; 1024²: 8.33 vs 8.29). On
# Metal the step's matmuls are compute-bound already at 257 tokens, so batching gains nothing
# there either; two passes need no padded copies of the caches and no mask, so they are the default.
BATCHED_CFG = False


def cfg_batch(cond: Conditioning) -> tuple[PrefixCache, mx.array, np.ndarray]:
    """The cond and uncond prompts as one batch of 2: padded caches, key mask, positions."""
    cache, key_mask = stack_prefix_caches(cond.cond.cache, cond.uncond.cache)
    return cache, key_mask, np.stack([cond.cond.positions, cond.uncond.positions])


def velocity(model: HiDreamO1, cond: Conditioning, z: mx.array, t_model: float, sigma: float,
             guidance: float, batched: Optional[bool] = None) -> mx.array:
    """The guided flow velocity v = (x_pred - z)/sigma, with CFG on v when there is an uncond pass.

    With CFG, ``batched`` (default :data:`BATCHED_CFG`) runs cond and uncond as one batch of
    2 over padded prefix caches instead of two passes; both give the same v up to rounding.
    """
    if cond.uncond is None:
        return (_x_pred(model, cond.cond, z, t_model, cond.ref_patches) - z) / sigma
    if BATCHED_CFG if batched is None else batched:
        cache, key_mask, positions = cfg_batch(cond)
        patches = mx.concatenate([z, z], axis=0)
        if cond.ref_patches is not None:
            refs = mx.broadcast_to(cond.ref_patches.astype(z.dtype), (2, *cond.ref_patches.shape[1:]))
            patches = mx.concatenate([patches, refs], axis=1)
        x_pred = model.denoise(cache, mx.array([t_model], dtype=mx.float32), patches, positions,
                               num_target=z.shape[1], key_mask=key_mask)
        v, v_u = (x_pred[:1] - z) / sigma, (x_pred[1:] - z) / sigma
    else:
        v = (_x_pred(model, cond.cond, z, t_model, cond.ref_patches) - z) / sigma
        v_u = (_x_pred(model, cond.uncond, z, t_model, cond.ref_patches) - z) / sigma
    return v_u + guidance * (v - v_u)


def shifted_conditioning(model: HiDreamO1, cond: Conditioning, num_target: int) -> tuple[Conditioning, tuple]:
    """``cond`` for the half-patch-shifted pass: the same prefix caches and references, the
    target positions of the grid one patch row and column larger. Also returns the grid."""
    def shifted(s: PromptState):
        positions, gh, gw = shifted_grid_positions(s.positions, num_target)
        return PromptState(s.cache, positions, model.rope(positions)), (gh, gw)

    state, grid = shifted(cond.cond)
    uncond = shifted(cond.uncond)[0] if cond.uncond is not None else None
    return Conditioning(state, uncond, cond.ref_patches), grid


def sample(
    model: HiDreamO1,
    cond: Conditioning,
    recipe: Recipe,
    z: mx.array,
    noise=None,
    step_noise: Optional[Callable[[int, tuple], mx.array]] = None,
    seams: Optional[SeamSmoothing] = None,
    start: Optional[Start] = None,
) -> Iterator[Step]:
    """Denoise ``z`` [1, N, 3072] with the recipe's sampler, yielding each step (not evaluated).

    With ``start`` (image-to-image) the run begins at step ``start.first`` from the source brought
    to that step's state (at step 0 from ``z`` itself: the text-to-image noise, so strength 1
    reproduces text-to-image); with a mask, after every step the kept region is replaced by the
    source at the next step's state (clean after the last). Steps are numbered from the run's first.

    Flash noise comes from ``step_noise(i, shape)`` if given (replay injects recorded draws),
    else from ``noise.step(shape)``. With ``seams`` enabled, the final steps also run the model
    on the half-patch-shifted grid and continue from the mixed prediction (see
    :mod:`hidream_mlx.families.o1.seam_smoothing`); the mix is linear, so mixing the guided v equals
    mixing each CFG branch's x0.
    """
    schedule = schedule_for(recipe)
    sampler = sampler_for(recipe, schedule)
    state = sampler.start()
    times, sigmas = schedule.model_times, schedule.velocity_sigmas
    z = z.astype(mx.float32)
    total = len(schedule)
    first = 0 if start is None else start.first
    if first > 0:
        z = source_at(start, recipe, sampler, schedule, first)
    first_smoothed = seams.first_step(total) if seams is not None else total
    shifted_cond = shifter = None
    for i in range(first, total):
        sigma = float(sigmas[i])
        v = velocity(model, cond, z, float(times[i]), sigma, recipe.guidance)
        if i >= first_smoothed:
            if shifter is None:
                shifted_cond, grid = shifted_conditioning(model, cond, z.shape[1])
                shifter = ShiftedPass(seams, grid)
            z_shifted = shifter.shift(z)
            v_shifted = velocity(model, shifted_cond, z_shifted, float(times[i]), sigma, recipe.guidance)
            v = shifter.mix(v, shifter.unshift(v_shifted))
        preview = z + sigma * v
        draw = None
        if sampler.needs_noise:
            draw = step_noise(i, z.shape) if step_noise is not None else noise.step(z.shape)
        z = sampler.step(state, i, z, -v, draw)
        if start is not None and start.repaint is not None:
            # mask * z + keep * source (not z + keep * (source - z)): exactly the source where kept.
            z = start.repaint * z + start.keep * source_at(start, recipe, sampler, schedule, i + 1)
        yield Step(i - first, total - first, float(schedule.timesteps[i]), z, preview)
