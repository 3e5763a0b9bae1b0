"""HiDream-I1's requests: what one image needs besides the loaded pipeline, and the rules that
check it (recipe, presets, the area size rule, the per-step noise seed).

The shared request builder (``hidream_mlx.requests``) has checked the prompt and every number's
range before it calls :func:`build_i1_request`; nothing here loads a weight. A prompt longer than
the encoders read is truncated as the official pipeline truncates it, with a note.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Callable, ClassVar, Optional

from hidream_mlx.family import SEED_MAX, RequestError, StartImage, start_image
from hidream_mlx.families.i1.recipes import FAMILY, I1_RECIPES, I1Recipe, apply_i1_preset, get_i1_recipe
from hidream_mlx.families.i1.sizes import DEFAULT_SIZE
from hidream_mlx.families.i1.text_encoding import DEFAULT_MAX_SEQUENCE_LENGTH, truncating_encoders


@dataclass(frozen=True)
class I1Request:
    prompt: str
    width: int
    height: int
    seed: int  # torch.Generator("cpu").manual_seed(seed) draws the initial latents
    recipe: I1Recipe
    size_note: str = ""
    negative_prompt: Optional[str] = None  # replaces the empty negative prompt (CFG recipes only)
    step_noise_seed: Optional[int] = None  # Dev/Fast: seed of the per-step noise (None: seed)
    start: Optional[StartImage] = None  # image-to-image / inpainting: the picture the run starts from
    family: ClassVar[str] = FAMILY
    # What O1 requests have and I1 ones never use, so the application reads every request alike.
    references: ClassVar[tuple] = ()
    seam_passes: ClassVar[int] = 0
    blend_seams: ClassVar[int] = 0

    @property
    def run_steps(self) -> int:
        """The steps that run: all of the recipe's, or the last ``int(steps * strength)`` from an image."""
        return self.recipe.steps if self.start is None else self.start.run_steps(self.recipe.steps)

    def metadata(self) -> dict:
        """What an I1 image records about its request: the historical top-level keys O1 images
        have, plus the family, the shift rule and both seeds."""
        rec = self.recipe
        meta = {
            "family": FAMILY,
            "prompt": self.prompt,
            "seed": self.seed,
            "step_noise_seed": self.seed if self.step_noise_seed is None else self.step_noise_seed,
            "width": self.width,
            "height": self.height,
            "recipe": rec.name,
            "official_recipe": rec.official,
            "steps": rec.steps,
            "guidance": rec.guidance,
            "shift": rec.shift,
            "mu_shift": rec.mu_shift,
            "recipe_settings": rec.settings(),
        }
        if self.negative_prompt is not None:
            meta["negative_prompt"] = self.negative_prompt
        if self.start is not None:
            meta.update(self.start.metadata(rec.steps))
        return meta


def build_i1_request(model, options: dict, note: Callable[[str], None]) -> I1Request:
    """A checked :class:`I1Request` (``model``: an I1Source or an I1Engine)."""
    source = getattr(model, "source", None) or model
    name = options.get("recipe") or getattr(model, "default_recipe", None) or source.variant
    try:
        rec = get_i1_recipe(name)
        if options.get("preset"):
            rec = apply_i1_preset(rec, options["preset"])
        rec = rec.with_overrides(steps=options.get("steps"), guidance=options.get("guidance"),
                                 shift=options.get("shift"))
    except ValueError as e:
        raise RequestError(str(e)) from None
    step_noise_seed = options.get("step_noise_seed")
    if step_noise_seed is not None and rec.scheduler != "flash":
        users = ", ".join(n for n, r in I1_RECIPES.items() if r.scheduler == "flash")
        raise RequestError(f"--step-noise-seed has no effect with the {rec.name} recipe (UniPC draws no per-step "
                           f"noise); it applies to: {users}")
    start = start_image(options, rec.steps)
    width, height, no_snap = options.get("width"), options.get("height"), bool(options.get("no_snap"))
    from_source = start is not None and width is None and height is None
    if start is not None:  # the source's size stands in for a missing side
        width, height = width or start.size[0], height or start.size[1]
    try:
        w, h, size_note = source.render_size(width or DEFAULT_SIZE, height or DEFAULT_SIZE, not no_snap)
    except ValueError as e:
        raise (start.size_refused(e) if from_source and no_snap else RequestError(str(e))) from None
    if start is not None and start.aspect_note(w, h):
        note(start.aspect_note(w, h))
    negative_prompt = options.get("negative_prompt")
    note_truncation(model, options["prompt"], negative_prompt, note)
    seed = options.get("seed")
    seed = secrets.randbelow(SEED_MAX + 1) if seed is None else seed
    return I1Request(options["prompt"], w, h, seed, rec, size_note=size_note, step_noise_seed=step_noise_seed,
                     negative_prompt=negative_prompt, start=start)


def note_truncation(model, prompt: str, negative: Optional[str], note: Callable[[str], None]) -> None:
    """Say when the encoders will read only the first part of a text: as the official pipeline, each
    truncates at ``max_sequence_length`` tokens (a longer prompt costs no more) and the rest is dropped."""
    for flag, text in (("--prompt", prompt), ("--negative-prompt", negative)):
        if text is None:
            continue
        cut = truncating_encoders(model, text)
        if cut:
            note(f"note: {flag} is longer than the {DEFAULT_MAX_SEQUENCE_LENGTH} tokens HiDream-I1's text encoders "
                 f"read ({', '.join(cut)} cut it); the rest is dropped, as in the official pipeline")
