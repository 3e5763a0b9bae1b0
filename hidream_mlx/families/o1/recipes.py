"""The official sampling recipes, the explore -> re-render presets, and how a model picks one.

A recipe is everything the sampling loop needs besides the prompt, size and seed. Users start
from a named recipe and override single settings; ``Recipe.official`` says whether the result
still is the recipe the checkpoint was released with.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Optional

from hidream_mlx.family import uses_cfg
from hidream_mlx.weights.source import model_name

@dataclass(frozen=True)
class Recipe:
    name: str
    scheduler: str  # "flash", "flow_match" or "unipc" (see sampling.sampler_for)
    steps: int
    shift: float
    guidance: float  # classifier-free guidance on v; <= 1 runs no unconditional pass
    noise_scale: float  # the initial noise is noise_scale * N(0, 1)
    s_noise: float = 0.0  # flash only: scale of the noise re-injected at every step
    noise_clip: float = 0.0  # flash only: clamp re-injected noise to +-clip*std (0 = off)
    distilled: bool = False  # timesteps come from the fixed distilled list, not a shifted schedule
    official: bool = True

    @property
    def uses_cfg(self) -> bool:
        return uses_cfg(self.guidance)

    def with_overrides(self, **overrides) -> "Recipe":
        """Apply the user's settings; any change from the released values clears ``official``."""
        changes = {k: v for k, v in overrides.items() if v is not None}
        for key, value in changes.items():
            if key == "steps" and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"steps must be a positive integer, got {value}")
            if key in ("shift", "noise_scale") and value <= 0:
                raise ValueError(f"{key.replace('_', '-')} must be positive, got {value}")
            if key in ("guidance", "s_noise", "noise_clip") and value < 0:
                raise ValueError(f"{key.replace('_', '-')} must not be negative, got {value}")
        if self.distilled and changes.get("steps", self.steps) > self.steps:
            raise ValueError(f"the {self.name} recipe is distilled on {self.steps} timesteps; "
                             f"--steps can be at most {self.steps}")
        official = self.official and all(getattr(self, k) == v for k, v in changes.items())
        return dataclasses.replace(self, **changes, official=official)

    def settings(self) -> dict:
        return dataclasses.asdict(self)


RECIPES: dict[str, Recipe] = {
    "full": Recipe("full", "unipc", steps=50, shift=3.0, guidance=5.0, noise_scale=8.0),
    "dev": Recipe("dev", "flash", steps=28, shift=1.0, guidance=0.0, noise_scale=7.5,
                  s_noise=7.5, noise_clip=2.5, distilled=True),
    "dev-2604": Recipe("dev-2604", "flash", steps=28, shift=1.0, guidance=0.0, noise_scale=8.0,
                       s_noise=8.0, noise_clip=8.0, distilled=True),
    # Dev with reference images: plain flow-match Euler on the distilled timesteps, no re-noising.
    "dev-edit": Recipe("dev-edit", "flow_match", steps=28, shift=1.0, guidance=0.0, noise_scale=8.0,
                       distilled=True),
}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}") from None


EDITING_SCHEDULERS = ("flow_match", "flash")


def recipe_for_references(name: str, num_refs: int, editing_scheduler: str = "flow_match") -> str:
    """A Dev model (Dev or Dev-2604) with exactly one reference edits with plain flow-match Euler,
    unless the editing scheduler is ``flash``; several references (subject-driven) keep flash.
    As official ``inference.py`` (``main`` and ``dev`` branches): ``--editing_scheduler``."""
    if editing_scheduler not in EDITING_SCHEDULERS:
        raise ValueError(f"--editing-scheduler must be one of {', '.join(EDITING_SCHEDULERS)}, got {editing_scheduler!r}")
    editing = name in ("dev", "dev-2604") and num_refs == 1
    if editing_scheduler == "flash" and not editing:
        raise ValueError("--editing-scheduler flash only applies to a Dev recipe (dev, dev-2604) with exactly one --ref")
    return "dev-edit" if editing and editing_scheduler == "flow_match" else name


def recipe_for_name(name: str) -> str:
    """Exact rules on the name's words (split at ``-``, ``_``, ``.`` and spaces, any case):
    ``dev`` followed by ``2604`` (or one word ``dev2604``) -> dev-2604; a word ``dev`` -> dev;
    anything else -> full. So ``HiDream-O1-Image-Dev`` is dev, ``..._dev_2604`` and
    ``...-Dev2604`` are dev-2604, ``devices`` or ``ml-dev/SomeModel`` are not dev."""
    words = [w for w in re.split(r"[-_. ]+", model_name(name).lower()) if w]
    for i, word in enumerate(words):
        if word == "dev2604" or (word == "dev" and words[i + 1: i + 2] == ["2604"]):
            return "dev-2604"
    return "dev" if "dev" in words else "full"


def recipe_for_model(name_or_path: str, stored: Optional[dict] = None) -> str:
    """The default recipe: what a converted folder recorded, else what the variant it was
    converted from is called, else the model's own name (see :func:`recipe_for_name`)."""
    stored = stored or {}
    if stored.get("recipe") in RECIPES:
        return stored["recipe"]
    return recipe_for_name(stored.get("variant") or name_or_path)


@dataclass(frozen=True)
class Preset:
    """Size and effort for one stage of the explore -> re-render workflow (README, *Presets*)."""

    name: str
    size: Optional[tuple[int, int]]  # None: the official bucket for the requested size
    full_steps: Optional[int]  # for the Full recipe; None keeps the recipe's
    full_guidance: Optional[float]
    distilled_steps: Optional[int]  # for Dev recipes (a subset of the 28 distilled timesteps)
    description: str


PRESETS: dict[str, Preset] = {
    "quick": Preset("quick", (1024, 1024), 24, 1.0, 14, "composition and mood check, CFG off"),
    "standard": Preset("standard", (1536, 1536), 32, 4.0, 28, "day-to-day renders"),
    "high": Preset("high", (2048, 2048), 50, 5.0, 28, "re-render of selected candidates"),
    "official": Preset("official", None, None, None, None, "the released recipe on the official bucket"),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def apply_preset(recipe: Recipe, preset: Preset) -> Recipe:
    if recipe.distilled:
        return recipe.with_overrides(steps=preset.distilled_steps)
    return recipe.with_overrides(steps=preset.full_steps, guidance=preset.full_guidance)
