"""HiDream-E1's request: one edit of one source image, what it records about itself, and the
rules that check it (:func:`build_e1_request`) before any weight loads.

``width`` and ``height`` are what the user asked for: E1.1's pixel budget (the source keeps its
aspect within it) or E1-Full's exact size; the edited size follows from the source
(:mod:`.sizes`) and is recorded by the engine with the source's name and sha256.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Optional

from hidream_mlx.families.i1.e1.recipes import (E1_FULL, FAMILY, TARGET_MARKER, E1Recipe, effective_negative,
                                                  get_e1_recipe, target_prompt)
from hidream_mlx.families.i1.e1.sizes import BUDGET, ResizePlan, resize_plan
from hidream_mlx.families.i1.requests import note_truncation
from hidream_mlx.family import SEED_MAX, RequestError, option_flag
from hidream_mlx.files import file_record
from hidream_mlx.images import read_rgb_size

NOISE_KINDS = ("torch", "mlx")
# What an edit starts from is its source (--ref), beside the noise; nothing starts from an image.
NOT_A_START = ("the source to edit is --ref, on the server the image upload or references; an edit starts from "
               "noise beside it, never from an init image")
# Options of the other families that an edit has no use for, each with why (checked before loading;
# the O1-only ones are refused by the shared request builder).
REFUSED = {
    "init_image": NOT_A_START, "mask": NOT_A_START, "strength": NOT_A_START, "mask_blur": NOT_A_START,
    "shift": "the editing sampler runs the flow shift of the base's scheduler config",
    "step_noise_seed": "it seeds the per-step noise of HiDream-I1 dev/fast; the editing sampler draws none",
}
# Presets that mean the released recipe itself (an edit has one effort: its recipe's, or --steps).
RECIPE_PRESETS = ("high", "official")


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
    plan: Optional[ResizePlan] = None  # how the source is resized (its size read when the request was built)
    family: ClassVar[str] = FAMILY
    # What O1 and I1 requests have and edits never use, so the application reads every request alike.
    seam_passes: ClassVar[int] = 0
    blend_seams: ClassVar[int] = 0
    start: ClassVar[None] = None  # an edit never starts from an image (its source is a reference)

    @property
    def run_steps(self) -> int:
        return self.recipe.steps

    @property
    def edited_size(self) -> tuple[int, int]:
        """The edited image's (w, h): the source through the recipe's size rule."""
        plan = self.plan or resize_plan(self.recipe.size_rule, read_rgb_size(self.source), self.width, self.height)
        return plan.size

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
        # the source as O1 references are recorded: by file name and sha256, never its folder
        meta["reference_files"] = [file_record(self.source)]
        if self.plan is not None:
            meta.update(source_size=list(self.plan.source), edited_size=list(self.plan.size))
        return meta


def recipe_from_options(name: str, options: dict) -> E1Recipe:
    """The recipe ``name`` with the user's overrides (option names as the CLI's, underscored)."""
    clip = False if options.get("no_clip_cfg_norm") else None
    try:
        return get_e1_recipe(name).with_overrides(
            steps=options.get("steps"), guidance=options.get("guidance"), image_guidance=options.get("image_guidance"),
            refine_strength=options.get("refine_strength"), clip_cfg_norm=clip,
            keep_source_size=options.get("keep_source_size"))
    except ValueError as e:
        raise RequestError(str(e)) from None


def refuse_other_options(options: dict, note: Callable[[str], None]) -> None:
    """One line for an option another family reads that an edit cannot honour (:data:`REFUSED`,
    presets other than the recipe's own); ``no_snap`` only gets a note: no edit size is snapped."""
    for name, why in REFUSED.items():
        if options.get(name) is not None:
            raise RequestError(f"{option_flag(name)} means nothing for a HiDream-E1 edit ({why}); remove it")
    preset = options.get("preset")
    if preset and preset not in RECIPE_PRESETS:
        raise RequestError(f"--preset {preset}: a HiDream-E1 edit runs its recipe ({' or '.join(RECIPE_PRESETS)} "
                           "means exactly that); for less effort give --steps")
    if options.get("no_snap") and not options.get("small_sizes"):
        note("note: --no-snap changes nothing for HiDream-E1: E1.1 keeps the source's aspect within the "
             "--width x --height budget, E1-Full resizes to exactly --width x --height")


def build_e1_request(model, options: dict, note: Callable[[str], None]) -> E1Request:
    """A checked :class:`E1Request` (``model``: an ``E1Source`` or an ``E1Engine``): one readable
    source (``refs``) at a size its recipe's rule can make, the recipe and its overrides."""
    source = getattr(model, "source", None) or model
    refuse_other_options(options, note)
    rec = recipe_from_options(options.get("recipe") or getattr(model, "default_recipe", None) or source.variant,
                              options)
    refs = tuple(str(r) for r in options.get("refs") or ())
    if not refs:
        raise RequestError("a HiDream-E1 model edits a source image: give it with --ref SOURCE")
    if len(refs) > 1:
        raise RequestError(f"a HiDream-E1 edit takes one --ref (the source image), got {len(refs)}")
    noise = options.get("noise") or "torch"
    if noise not in NOISE_KINDS:
        raise RequestError(f"--noise {noise}: choose {' or '.join(NOISE_KINDS)}")
    width, height = options.get("width") or rec.width, options.get("height") or rec.height
    try:
        size = read_rgb_size(refs[0])
    except ValueError as e:
        raise RequestError(f"--ref {e}") from None
    try:
        plan = resize_plan(rec.size_rule, size, width, height)
    except ValueError as e:
        raise RequestError(str(e)) from None
    how = f"aspect kept within {width}x{height} pixels" if rec.size_rule == BUDGET else "resized to exactly this size"
    size_note = f"{plan.size[0]}x{plan.size[1]} from the {plan.source[0]}x{plan.source[1]} source ({how})"
    if rec.name == E1_FULL and TARGET_MARKER not in options["prompt"]:
        note(f"note: E1-Full was trained on 'Editing Instruction: <instruction>. {TARGET_MARKER} <description>'; "
             "without the description its refine stage uses the whole prompt")
    if getattr(source, "path", None) is not None:
        note_truncation(model, options["prompt"], options.get("negative_prompt"), note)
    seed = options.get("seed")
    seed = secrets.randbelow(SEED_MAX + 1) if seed is None else seed
    return E1Request(options["prompt"], width, height, seed, rec, refs, options.get("negative_prompt"), noise,
                     size_note, plan)
