"""The HiDream-I1 recipes as requests carry them: Full, Dev and Fast, with the user's overrides.

The numbers come from :data:`hidream_mlx.families.i1.sampling.RECIPES` (the official
``inference.py``). One thing the sampler table cannot say is how Full's second shift is chosen:
UniPC shifts its timesteps twice, and the official pipeline passes ``shift=exp(mu)`` to the
second (``mu`` from the transformer's ``max_seq``: 3.158 for the released model at every size)
where diffusers' pipeline shifts twice by the config shift (3.0). :class:`I1Recipe` follows the
official pipeline (``mu_shift=True``); ``--shift X`` turns it off and shifts twice by X, which is
how the tiny golden fixtures were recorded. Dev and Fast (flash Euler) shift twice by ``shift``
in both pipelines.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar, Optional

from hidream_mlx.families.i1.sampling import RECIPES as SAMPLER_RECIPES
from hidream_mlx.families.i1.sampling import Recipe as SamplerRecipe
from hidream_mlx.families.i1.sampling import calculate_shift
from hidream_mlx.family import uses_cfg

FAMILY = "i1"


@dataclass(frozen=True)
class I1Recipe:
    """What the I1 sampling loop needs besides the prompt, size and seeds (fields recorded in
    every image's ``recipe_settings``)."""

    name: str  # full, dev or fast
    scheduler: str  # "unipc" (Full) or "flash" (Dev, Fast)
    steps: int
    guidance: float  # CFG scale; <= 1 runs no unconditional pass
    shift: float  # the sampler's timestep shift
    mu_shift: bool = False  # UniPC's second shift is exp(mu) of max_seq (official), not ``shift``
    official: bool = True
    # Shared with the O1 Recipe so the CLI, batch and harness code reads both alike.
    family: ClassVar[str] = FAMILY
    distilled: ClassVar[bool] = False

    @property
    def uses_cfg(self) -> bool:
        return uses_cfg(self.guidance)

    def second_shift(self, max_seq: int) -> float:
        """The shift UniPC's ``set_timesteps`` applies (flash: ``shift`` again)."""
        return math.exp(calculate_shift(max_seq)) if self.mu_shift else self.shift

    def with_overrides(self, steps: Optional[int] = None, guidance: Optional[float] = None,
                       shift: Optional[float] = None) -> "I1Recipe":
        """Apply the user's settings; any change from the released recipe clears ``official``.
        A ``shift`` replaces both UniPC shifts, so on Full it always leaves the official recipe."""
        changes = {k: v for k, v in {"steps": steps, "guidance": guidance, "shift": shift}.items() if v is not None}
        if changes.get("steps", 1) <= 0 or not isinstance(changes.get("steps", 1), int):
            raise ValueError(f"steps must be a positive integer, got {changes['steps']}")
        if changes.get("shift", 1.0) <= 0:
            raise ValueError(f"shift must be positive, got {changes['shift']}")
        if changes.get("guidance", 0.0) < 0:
            raise ValueError(f"guidance must not be negative, got {changes['guidance']}")
        official = self.official and all(getattr(self, k) == v for k, v in changes.items())
        if "shift" in changes:
            official = official and not self.mu_shift
            changes["mu_shift"] = False
        return dataclasses.replace(self, **changes, official=official)

    def sampler_recipe(self) -> SamplerRecipe:
        return SamplerRecipe(self.scheduler, self.steps, self.guidance, self.shift)

    def settings(self) -> dict:
        return {"family": FAMILY, **dataclasses.asdict(self)}


def _released(name: str) -> I1Recipe:
    r = SAMPLER_RECIPES[name]
    return I1Recipe(name, r.sampler, r.steps, r.guidance, r.shift, mu_shift=r.sampler == "unipc")


I1_RECIPES: dict[str, I1Recipe] = {name: _released(name) for name in SAMPLER_RECIPES}

# Effort per explore -> re-render stage (sizes follow the I1 area rule, so a preset sets no size):
# (steps, guidance) for Full, steps for Dev and Fast; None keeps the recipe's value.
PRESET_EFFORT: dict[str, dict[str, tuple[Optional[int], Optional[float]]]] = {
    "quick": {"full": (24, 1.0), "dev": (14, None), "fast": (8, None)},
    "standard": {"full": (32, 4.0), "dev": (None, None), "fast": (None, None)},
    "high": {},
    "official": {},
}


def get_i1_recipe(name: str) -> I1Recipe:
    try:
        return I1_RECIPES[name]
    except KeyError:
        raise ValueError(f"--recipe {name} is not a HiDream-I1 recipe; choose one of {', '.join(I1_RECIPES)}") \
            from None


def apply_i1_preset(recipe: I1Recipe, preset: str) -> I1Recipe:
    """``recipe`` at the effort of the named explore -> re-render stage (``PRESET_EFFORT``)."""
    if preset not in PRESET_EFFORT:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESET_EFFORT)}")
    steps, guidance = PRESET_EFFORT[preset].get(recipe.name, (None, None))
    return recipe.with_overrides(steps=steps, guidance=guidance)
