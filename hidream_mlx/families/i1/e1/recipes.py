"""The HiDream-E1 editing recipes as requests carry them: ``e1.1`` and ``e1-full``, with overrides.

The defaults are the official scripts' arguments (``inference_e1_1.py``, ``inference.py``):

=================  =================================  ========================
                   e1.1                               e1-full
=================  =================================  ========================
guidance / image   3.0 / 1.5                          5.0 / 4.0
negative prompt    ``low quality, blurry, distorted``  ``low resolution, blur``
steps / refine     28 / 0.3                           28 / 0.3
CFG norm clip      on                                 on (the pipeline default)
source size        aspect kept, 1024x1024 budget      exactly 768x768
=================  =================================  ========================

``refine_strength`` r starts the refine stage at step ``int(steps * (1 - r))`` (0: none).
E1.1 takes plain instructions ("Convert the image into a Ghibli style."); E1-Full was trained on
``Editing Instruction: <instruction>. Target Image Description: <description>`` (the official
script writes it with a vision-language model) and refines with the description alone
(:func:`target_prompt`). ``keep_source_size`` resizes the output back to the source's size, as
both scripts do after the pipeline; it is an output choice and leaves ``official`` alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Optional

from hidream_mlx.families.i1.e1.sizes import BUDGET, EXACT
from hidream_mlx.family import uses_cfg

FAMILY = "e1"
E1_1, E1_FULL = "e1.1", "e1-full"
TARGET_MARKER = "Target Image Description:"


@dataclass(frozen=True)
class E1Recipe:
    """What the editing sampler needs besides the instruction, source, size and seed (fields
    recorded in every edited image's ``recipe_settings``)."""

    name: str  # e1.1 or e1-full
    steps: int
    guidance: float  # text guidance; <= 1 runs no unconditional rows
    image_guidance: float  # image guidance of the 3-way combination
    negative_prompt: str  # used when the request gives none
    refine_strength: float  # fraction of the steps run as the refine stage (0: none)
    clip_cfg_norm: bool  # clip the text-guided prediction's per-pixel norm (and its text rows)
    size_rule: str  # BUDGET (aspect kept) or EXACT
    width: int  # the default request size (budget or exact size)
    height: int
    keep_source_size: bool = False
    official: bool = True
    family: ClassVar[str] = FAMILY
    distilled: ClassVar[bool] = False

    @property
    def uses_cfg(self) -> bool:
        return uses_cfg(self.guidance)

    @property
    def refine_start(self) -> int:
        """The first refine step, ``int(steps * (1 - refine_strength))`` in Python floats as the
        pipeline computes it (0.3 of 28 steps starts at 19); ``steps`` when there is none."""
        return min(int(self.steps * (1.0 - self.refine_strength)), self.steps)

    @property
    def refine_steps(self) -> int:
        return self.steps - self.refine_start

    def with_overrides(self, steps: Optional[int] = None, guidance: Optional[float] = None,
                       image_guidance: Optional[float] = None, refine_strength: Optional[float] = None,
                       clip_cfg_norm: Optional[bool] = None, keep_source_size: Optional[bool] = None) -> "E1Recipe":
        """Apply the user's settings (checked); a change from the released values clears ``official``."""
        changes = {k: v for k, v in {"steps": steps, "guidance": guidance, "image_guidance": image_guidance,
                                     "refine_strength": refine_strength, "clip_cfg_norm": clip_cfg_norm}.items()
                   if v is not None}
        if "steps" in changes and (not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0):
            raise ValueError(f"steps must be a positive integer, got {steps}")
        if changes.get("guidance", 0.0) < 0:
            raise ValueError(f"guidance must not be negative, got {guidance}")
        if changes.get("image_guidance", 0.0) < 0:
            raise ValueError(f"--image-guidance must not be negative, got {image_guidance}")
        if not 0.0 <= changes.get("refine_strength", 0.0) <= 1.0:
            raise ValueError(f"--refine-strength must be between 0 and 1, got {refine_strength}")
        official = self.official and all(getattr(self, k) == v for k, v in changes.items())
        if keep_source_size is not None:
            changes["keep_source_size"] = bool(keep_source_size)
        return dataclasses.replace(self, **changes, official=official)

    def settings(self) -> dict:
        return {"family": FAMILY, **dataclasses.asdict(self)}


E1_RECIPES: dict[str, E1Recipe] = {
    E1_1: E1Recipe(E1_1, 28, 3.0, 1.5, "low quality, blurry, distorted", 0.3, True, BUDGET, 1024, 1024),
    E1_FULL: E1Recipe(E1_FULL, 28, 5.0, 4.0, "low resolution, blur", 0.3, True, EXACT, 768, 768),
}


def get_e1_recipe(name: str) -> E1Recipe:
    try:
        return E1_RECIPES[name]
    except KeyError:
        raise ValueError(f"--recipe {name} is not a HiDream-E1 recipe; choose one of {', '.join(E1_RECIPES)}") \
            from None


def target_prompt(prompt: str) -> str:
    """The refine stage's text: what follows ``Target Image Description:`` (the official
    ``split(marker)[1].strip()``), else the prompt itself."""
    return prompt.split(TARGET_MARKER)[1].strip() if TARGET_MARKER in prompt else prompt


def effective_negative(recipe: E1Recipe, negative_prompt: Optional[str]) -> str:
    """The negative prompt that runs: the request's, else the recipe's."""
    return recipe.negative_prompt if negative_prompt is None else negative_prompt
