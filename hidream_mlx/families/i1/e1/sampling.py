"""The HiDream-E1 editing sampler (``HiDreamImageEditingPipeline``'s denoising loop).

Two stages share one UniPC run:

* editing (steps ``0 .. refine_start - 1``): the noisy latent x [1, C, h, w] and the source's
  latent side by side along the **width**, ``[x, image] -> [B, C, h, 2w]``; the transformer's
  output is cut back to its **left** half (the noisy latent's) and negated. With CFG the batch
  is 3: image latents ``[zeros, image, image]`` and text rows ``[pos, neg, pos]`` with the norm
  clip (``clip_cfg_norm``) or ``[neg, neg, pos]`` without, combined by :func:`guide_edit`;
* refine (``refine_start .. steps - 1``): x alone, text rows ``[neg, target]``, plain 2-way CFG
  (:func:`guide_refine`). The caller's ``on_stage("refine")`` runs first: the official scripts
  swap weights there (E1-Full: its LoRA off; E1.1: the same weights again).

Without CFG (guidance <= 1) both stages run one row: ``[pos]`` with the image, then ``[target]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import mlx.core as mx

from hidream_mlx.families.i1.e1.recipes import E1Recipe, target_prompt
from hidream_mlx.families.i1.sampling import Conditioning
from hidream_mlx.schedulers import Schedule, UniPCSampler

EDIT, REFINE = "edit", "refine"
NORM_EPS = 1e-8


def edit_texts(prompt: str, negative: str, recipe: E1Recipe) -> tuple[list[str], list[str]]:
    """The text rows of each stage, in batch order: (editing rows, refine rows)."""
    target = target_prompt(prompt)
    if not recipe.uses_cfg:
        return [prompt], [target]
    editing = [prompt, negative, prompt] if recipe.clip_cfg_norm else [negative, negative, prompt]
    return editing, [negative, target]


@dataclass
class EditConditioning:
    """The transformer's text inputs of both stages, batched as :func:`edit_texts` orders them
    (``refine`` None when the run has no refine stage)."""

    edit: Conditioning
    refine: Optional[Conditioning]


def image_rows(image_latents: mx.array, uses_cfg: bool) -> mx.array:
    """The source latent [1, C, h, w] as the editing batch takes it: ``[zeros, image, image]``
    with CFG (the unconditional row sees zero latents, not an encoded black image)."""
    if not uses_cfg:
        return image_latents
    return mx.concatenate([mx.zeros_like(image_latents), image_latents, image_latents], axis=0)


def guide_edit(pred: mx.array, recipe: E1Recipe) -> mx.array:
    """The editing stage's 3-way guidance of ``pred`` = the negated left half, rows
    ``(u, ic, fc)``. Norm clip: ``p = ic + g (fc - ic)`` scaled by
    ``clip(|fc| / (|p| + 1e-8), 0, 1)`` (L2 over channels, per latent pixel), then
    ``u + ig (p s - u)``; without it ``u + ig (ic - u) + g (fc - ic)``."""
    if not recipe.uses_cfg:
        return pred
    u, ic, fc = mx.split(pred, 3, axis=0)
    g, ig = recipe.guidance, recipe.image_guidance
    if recipe.clip_cfg_norm:
        text = ic + g * (fc - ic)
        norm_full = mx.sqrt(mx.sum(fc * fc, axis=1, keepdims=True))
        norm_text = mx.sqrt(mx.sum(text * text, axis=1, keepdims=True))
        scale = mx.clip(norm_full / (norm_text + NORM_EPS), 0.0, 1.0)
        return u + ig * (text * scale - u)
    return u + ig * (ic - u) + g * (fc - ic)


def guide_refine(pred: mx.array, recipe: E1Recipe) -> mx.array:
    """The refine stage's 2-way guidance ``u + g (c - u)`` of rows ``(neg, target)``."""
    if not recipe.uses_cfg:
        return pred
    u, c = mx.split(pred, 2, axis=0)
    return u + recipe.guidance * (c - u)


@dataclass
class EditStep:
    """One finished step as ``sample_edit``'s ``on_step`` sees it."""

    index: int
    stage: str  # EDIT or REFINE
    output: mx.array  # the raw transformer output this step used (editing: the left half), not negated
    guided: mx.array  # what went into the scheduler
    latent: mx.array  # x after the step


def edit_model_input(x: mx.array, image_batch: mx.array, rows: int) -> mx.array:
    """``[x] * rows`` beside the image rows along the width: [rows, C, h, 2w]."""
    return mx.concatenate([mx.concatenate([x] * rows, axis=0), image_batch.astype(x.dtype)], axis=-1)


def sample_edit(model: Callable, cond: EditConditioning, image_latents: mx.array, latents: mx.array,
                recipe: E1Recipe, schedule: Schedule, max_seq: int, on_stage: Optional[Callable[[str], None]] = None,
                on_step: Optional[Callable[[EditStep], None]] = None) -> mx.array:
    """Edit from ``latents`` [1, C, h, w]; ``image_latents`` [1, C, h, w] is the encoded source.
    ``model(x, t, t5, llama, pooled, max_seq)`` is the raw transformer. ``on_stage(EDIT)`` runs
    before the first step and ``on_stage(REFINE)`` before the first refine step."""
    if image_latents.shape != latents.shape:
        raise ValueError(f"the source latent {tuple(image_latents.shape)} and the noise {tuple(latents.shape)} "
                         "must have one shape")
    sampler = UniPCSampler(schedule)
    state = sampler.start()
    images = image_rows(image_latents, recipe.uses_cfg)
    edit_rows = images.shape[0]
    refine_rows = 2 if recipe.uses_cfg else 1
    start_refine = min(recipe.refine_start, len(schedule))
    if start_refine < len(schedule) and cond.refine is None:
        raise ValueError("a run with a refine stage needs its text batch (EditConditioning.refine)")
    x = latents.astype(mx.float32)
    width = x.shape[-1]
    if on_stage is not None:
        on_stage(EDIT)
    for i in range(len(schedule)):
        refining = i >= start_refine
        if i == start_refine and on_stage is not None:
            on_stage(REFINE)
        c = cond.refine if refining else cond.edit
        batch = mx.concatenate([x] * refine_rows, axis=0) if refining else edit_model_input(x, images, edit_rows)
        t = mx.full((batch.shape[0],), float(schedule.timesteps[i]), dtype=mx.float32)
        output = model(batch, t, c.t5, c.llama_stack, c.pooled, max_seq)[..., :width]
        guided = (guide_refine if refining else guide_edit)(-output.astype(mx.float32), recipe)
        x = sampler.step(state, i, x, guided)
        mx.eval(x)
        if on_step is not None:
            on_step(EditStep(i, REFINE if refining else EDIT, output, guided, x))
    return x
