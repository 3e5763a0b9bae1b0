"""HiDream-E1's request: one edit of one source image, and what it records about itself.

``width`` and ``height`` are what the user asked for: E1.1's pixel budget (the source keeps its
aspect within it) or E1-Full's exact size; the edited size follows from the source
(:mod:`.edit_sizes`) and is recorded by the engine with the source's name and sha256.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

from hidream_mlx.families.i1.edit_recipes import FAMILY, E1Recipe, effective_negative, target_prompt


@dataclass(frozen=True)
class E1Request:
    prompt: str  # E1.1: a plain instruction; E1-Full: "Editing Instruction: ... Target Image Description: ..."
    width: int
    height: int
    seed: int  # torch.Generator("cpu").manual_seed(seed) draws the initial latents ("torch" noise)
    recipe: E1Recipe
    references: tuple[str, ...] = ()  # the source image: exactly one
    negative_prompt: Optional[str] = None  # None: the recipe's
    noise: str = "torch"  # or "mlx"
    size_note: str = ""
    family: ClassVar[str] = FAMILY
    # What O1 requests have and edits never use, so the application reads every request alike.
    seam_passes: ClassVar[int] = 0
    blend_seams: ClassVar[int] = 0

    @property
    def source(self) -> Path:
        """The one source image."""
        if len(self.references) != 1:
            raise ValueError(f"an edit takes exactly one source image (--ref), got {len(self.references)}")
        return Path(self.references[0])

    @property
    def negative(self) -> str:
        """The negative prompt that runs."""
        return effective_negative(self.recipe, self.negative_prompt)

    def metadata(self) -> dict:
        """What an edited image records about its request (the engine adds the edited size and
        the source): the historical top-level keys every output has, plus the editing settings."""
        rec = self.recipe
        meta = {
            "family": FAMILY,
            "prompt": self.prompt,
            "seed": self.seed,
            "noise": self.noise,
            "width": self.width,
            "height": self.height,
            "recipe": rec.name,
            "official_recipe": rec.official and self.negative == rec.negative_prompt,
            "steps": rec.steps,
            "guidance": rec.guidance,
            "image_guidance": rec.image_guidance,
            "refine_strength": rec.refine_strength,
            "clip_cfg_norm": rec.clip_cfg_norm,
            "negative_prompt": self.negative,
            "recipe_settings": rec.settings(),
        }
        target = target_prompt(self.prompt)
        if target != self.prompt:
            meta["target_prompt"] = target
        return meta
