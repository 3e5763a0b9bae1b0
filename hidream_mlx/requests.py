"""One request builder for ``generate``, ``eval`` (and later the server): option values -> a checked Request.

Option names are the CLI's with underscores (``noise_scale`` is ``--noise-scale``). Every check
runs here, before any weights load, so a setting means the same thing wherever it is given:
ranges (:data:`RANGES`), finiteness, options the chosen recipe ignores, prompt text, sizes and
references. The rules behind the recipe defaults are in ``docs/model.md``.

Both families go through :func:`build_request`: a HiDream-I1 model (an I1Source or I1Engine,
whose ``family`` is ``"i1"``) gets the I1 recipes and size rule, and every HiDream-O1 option
it cannot use is refused naming the flag (:data:`O1_ONLY`).
"""

from __future__ import annotations

import json
import math
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from hidream_mlx.families.o1.layout import parse_layout_boxes
from hidream_mlx.families.o1.references import (
    check_reference_count,
    load_reference_images,
    resize_reference,
)
from hidream_mlx.files import parse_json, read_text_file
from hidream_mlx.families.o1.engine import Request
from hidream_mlx.family import I1, O1
from hidream_mlx.families.i1.recipes import I1_RECIPES, apply_i1_preset, get_i1_recipe
from hidream_mlx.families.i1.sizes import DEFAULT_SIZE as I1_DEFAULT_SIZE
from hidream_mlx.noise import NOISE_KINDS
from hidream_mlx.families.o1.recipes import (
    RECIPES,
    Recipe,
    apply_preset,
    get_preset,
    get_recipe,
    recipe_for_model,
    recipe_for_references,
)
from hidream_mlx.families.o1.sizes import MIN_SIDE, resolve_size, validate_free_size
from hidream_mlx.families.o1.seam_smoothing import check_settings as check_seam_smoothing
from hidream_mlx.families.o1.seams import PATCH_SIZE
from hidream_mlx.prompts import (  # noqa: F401 (RequestError: part of this module's interface)
    RequestError,
    check_text,
    negative_text,
    note_i1_truncation,
    o1_text_tokens,
)


@dataclass(frozen=True)
class Range:
    low: float
    high: float
    low_open: bool = False  # the low end itself is excluded (a positive number)

    def text(self) -> str:
        def show(v):
            return str(v) if isinstance(v, int) else f"{v:g}"
        return f"{'>' if self.low_open else '>='} {show(self.low)} and <= {show(self.high)}"

    def contains(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        return above and value <= self.high


SEED_MAX = 2**32 - 1  # the official (torch) generator keeps 32 bits of a seed; no silent wrap
DEFAULT_SIZE = 2048
MAX_SIDE = 16384  # before snapping; a free size is further bounded by resolution.MAX_PIXELS
EDIT_MIN_PIXELS = 2_000_000  # editing below about 2 MP gives noise with the released checkpoints

# Stated in each option's --help and checked before loading.
RANGES: dict[str, Range] = {
    "seed": Range(0, SEED_MAX),
    "width": Range(1, MAX_SIDE),
    "height": Range(1, MAX_SIDE),
    "steps": Range(1, 1000),
    "guidance": Range(0, 100),
    "shift": Range(0, 100, low_open=True),
    "noise_scale": Range(0, 100, low_open=True),
    "s_noise": Range(0, 100),
    "noise_clip": Range(0, 100),
    "blend_seams": Range(0, PATCH_SIZE // 2),
    "seam_smoothing": Range(0, 1),
    "seam_strength": Range(0, 1),
    "preview_every": Range(0, 1000),
    "step_noise_seed": Range(0, SEED_MAX),
}
INTEGER_OPTIONS = ("seed", "width", "height", "steps", "blend_seams", "preview_every", "step_noise_seed")

# Which recipes read an option at all (the others would record it without effect).
FLASH_RECIPES = tuple(name for name, r in RECIPES.items() if r.scheduler == "flash")
SHIFTED_RECIPES = tuple(name for name, r in RECIPES.items() if not r.distilled)
USED_BY = {"s_noise": FLASH_RECIPES, "noise_clip": FLASH_RECIPES, "shift": SHIFTED_RECIPES}

# HiDream-O1 options that mean nothing for HiDream-I1: (value that leaves them unset, why).
O1_ONLY: dict[str, tuple[object, str]] = {
    "refs": ((), "HiDream-I1 is text-to-image only"),
    "layout": (None, "it places --ref images"),
    "keep_aspect": (False, "it keeps a --ref image's aspect"),
    "editing_scheduler": ("flow_match", "it picks the O1 editing sampler"),
    "noise": ("torch", "HiDream-I1 draws its noise as torch does, so --seed matches the reference pipeline"),
    "noise_scale": (None, "the I1 samplers have no such setting"),
    "s_noise": (None, "the I1 samplers have no such setting"),
    "noise_clip": (None, "the I1 samplers have no such setting"),
    "blend_seams": (0, "it softens O1's 32 px patch grid"),
    "seam_smoothing": (0.0, "it smooths O1's 32 px patch grid"),
    "seam_window": ("hann", "it belongs to --seam-smoothing"),
    "seam_strength": (1.0, "it belongs to --seam-smoothing"),
}

# Options that take true/false and options that take a name or text: a prompt file's
# "no_snap": "false" must not turn snapping off, nor a recipe of 5 mean anything.
FLAG_OPTIONS = ("no_snap", "keep_aspect")
TEXT_OPTIONS = ("recipe", "preset", "noise", "seam_window", "layout", "editing_scheduler")
# The JSON kind of each option a prompt-file line or a request body may carry.
NUMBER = (int, float)
OPTION_KINDS: dict[str, tuple] = {
    "prompt": (str,), "negative_prompt": (str,), "seed": (int,), "width": (int,), "height": (int,),
    "no_snap": (bool,), "keep_aspect": (bool,), "recipe": (str,), "preset": (str,), "steps": (int,),
    "guidance": NUMBER, "shift": NUMBER, "noise_scale": NUMBER, "s_noise": NUMBER, "noise_clip": NUMBER,
    "noise": (str,), "blend_seams": (int,), "seam_smoothing": NUMBER, "seam_window": (str,),
    "seam_strength": NUMBER, "step_noise_seed": (int,),
}
KIND_NAMES = {(bool,): "true or false (a JSON boolean)", (int,): "a whole number", NUMBER: "a number",
              (str,): "text"}


def kind_error(name: str, value, kinds: Optional[tuple] = None) -> Optional[str]:
    """Why ``value`` is not of the JSON kind ``name`` takes (``kinds``, default
    :data:`OPTION_KINDS`), or None. A boolean is never a number, nor a number a boolean."""
    kinds = kinds or OPTION_KINDS[name]
    if isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds):
        return None
    wanted = KIND_NAMES.get(kinds) or " or ".join(k.__name__ for k in kinds)
    try:
        shown = json.dumps(value)  # as the file or body spells it: "false", true, null
    except (TypeError, ValueError):
        shown = repr(value)
    shown = shown if len(shown) <= 40 else f"{shown[:37]}..."
    return f"{name} must be {wanted}, got {shown}"


def option_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def range_help(name: str) -> str:
    """The range of ``name`` for its --help text."""
    return RANGES[name].text()


def check_number(name: str, value) -> None:
    """Refuse a non-number, NaN/inf, a float for an integer option, or a value outside RANGES."""
    flag = option_flag(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{flag} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise RequestError(f"{flag} must be a finite number, got {value}")
    if name in INTEGER_OPTIONS and not isinstance(value, int):
        raise RequestError(f"{flag} must be a whole number, got {value}")
    valid = RANGES[name]
    if not valid.contains(value):
        raise RequestError(f"{flag} must be {valid.text()}, got {value}")


def check_free_size(width, height, flag: str = "--width/--height") -> None:
    """A HiDream-O1 size taken as given (``bench --size``, ``info``): the ranges of ``--width`` and
    ``--height``, then the free-size rule (whole 32 px patches, at least 256 px, at most
    ``resolution.MAX_PIXELS``), before any memory is estimated. The error names ``flag``."""
    for name, value in (("width", width), ("height", height)):
        try:
            check_number(name, value)
        except RequestError as e:
            if flag == "--width/--height":
                raise
            raise RequestError(f"{flag} {str(e).split(' ', 1)[1]}") from None
    try:
        validate_free_size(width, height)
    except ValueError as e:
        raise RequestError(f"{flag}: {e}") from None


def check_kinds(options: dict) -> None:
    """Flags are true or false and names are text (None: the default), whoever gave them."""
    for name in FLAG_OPTIONS:
        if name in options and not isinstance(options[name], bool):
            raise RequestError(f"{option_flag(name)} must be true or false, got {options[name]!r}")
    for name in TEXT_OPTIONS:
        if options.get(name) is not None and not isinstance(options[name], str):
            raise RequestError(f"{option_flag(name)} must be a name or text, got {options[name]!r}")


def check_negative(negative: Optional[str], recipe) -> None:
    """A negative prompt replaces the unconditional pass, which only a recipe with CFG runs."""
    if negative is not None and not recipe.uses_cfg:
        raise RequestError(f"--negative-prompt needs CFG: the {recipe.name} recipe here runs guidance "
                           f"{recipe.guidance:g} (<= 1, no unconditional pass to replace); use a recipe or "
                           "--guidance above 1")


def check_recipe_options(recipe: Recipe, options: dict) -> None:
    """Refuse settings the recipe's sampler never reads, saying which recipes do."""
    for name, users in USED_BY.items():
        if options.get(name) is not None and recipe.name not in users:
            why = "uses fixed distilled timesteps" if name == "shift" else f"uses the {recipe.scheduler} sampler"
            raise RequestError(f"{option_flag(name)} has no effect with the {recipe.name} recipe ({why}); "
                               f"it applies to: {', '.join(users)}")


def model_facts(model) -> tuple[str, dict]:
    """(the model's own name, its stored metadata) from a ModelSource or an Engine."""
    if model is None:
        return "", {}
    name = getattr(model, "name", None)
    if name is None:
        name = getattr(model, "model_arg", "")
    stored = getattr(model, "stored", None)
    if stored is None:
        config = getattr(model, "config", None)
        stored = getattr(config, "hidream", None) or {}
    return name, stored


def choose_recipe(model, recipe: Optional[str], num_refs: int, editing_scheduler: str = "flow_match") -> Recipe:
    name, stored = model_facts(model)
    return get_recipe(recipe_for_references(recipe or recipe_for_model(name, stored), num_refs, editing_scheduler))


def model_family(model) -> str:
    """``"i1"`` for an I1Source or I1Engine, else ``"o1"`` (ModelSource, Engine, None)."""
    return getattr(model, "family", O1)


def refuse_o1_options(options: dict) -> None:
    """One line for the first HiDream-O1 option given with a HiDream-I1 model."""
    for name, (unset, why) in O1_ONLY.items():
        value = options.get(name)
        if value is not None and value != unset and not (name == "refs" and not value):
            flag = "--ref" if name == "refs" else option_flag(name)
            shown = "" if isinstance(value, bool) or name == "refs" else f" {value}"
            raise RequestError(f"{flag}{shown} is a HiDream-O1 option and means nothing for HiDream-I1 ({why}); "
                               "remove it")


def build_i1_request(model, *, prompt, seed, width, height, no_snap, recipe, preset, steps, guidance, shift,
                     step_noise_seed, negative_prompt=None, note=lambda line: None) -> Request:
    """The HiDream-I1 side of :func:`build_request` (options already range-checked)."""
    source = getattr(model, "source", None) or model
    name = recipe or getattr(model, "default_recipe", None) or source.variant
    try:
        rec = get_i1_recipe(name)
        if preset:
            rec = apply_i1_preset(rec, get_preset(preset))
        rec = rec.with_overrides(steps=steps, guidance=guidance, shift=shift)
    except ValueError as e:
        raise RequestError(str(e)) from None
    if step_noise_seed is not None and rec.scheduler != "flash":
        users = ", ".join(n for n, r in I1_RECIPES.items() if r.scheduler == "flash")
        raise RequestError(f"--step-noise-seed has no effect with the {rec.name} recipe (UniPC draws no per-step "
                           f"noise); it applies to: {users}")
    try:
        w, h, size_note = source.render_size(width or I1_DEFAULT_SIZE, height or I1_DEFAULT_SIZE, not no_snap)
    except ValueError as e:
        raise RequestError(str(e)) from None
    check_negative(negative_prompt, rec)
    note_i1_truncation(model, prompt, negative_prompt, note)
    seed = secrets.randbelow(SEED_MAX + 1) if seed is None else seed
    return Request(prompt, w, h, seed, rec, size_note=size_note, step_noise_seed=step_noise_seed,
                   negative_prompt=negative_prompt)


def read_layout(layout: Optional[str]) -> Optional[str]:
    """The layout as JSON text: the option's value, or the file it names (whose errors name it)."""
    if layout is None:
        return None
    path = Path(layout)
    if layout.strip() and len(layout) < 4096 and os.path.lexists(path):
        text = read_text_file(path, "--layout file")
        try:
            parse_json(text, str(path), "--layout file")
        except ValueError as e:
            raise RequestError(str(e)) from None
        return text
    if layout.strip() and layout.strip()[:1] not in ("[", "{"):
        raise RequestError(f"--layout {layout!r}: neither a JSON list of boxes nor an existing file")
    return layout


def keep_aspect_size(ref_path: str, budget: int) -> tuple[int, int]:
    """The size the reference's aspect gives inside a ``budget`` x ``budget`` pixel area: the
    same resize the editing code applies to the reference, so what is printed is what runs."""
    return resize_reference(load_reference_images([ref_path])[0], budget).size


def check_references(refs, layout, keep_aspect, width, height,
                     note: Callable[[str], None]) -> tuple[int, int, Optional[str], Optional[str], int]:
    """(width, height, size note or None, layout text, keep-aspect budget) after the reference rules.

    With ``keep_aspect`` the requested ``width`` x ``height`` is the pixel budget the reference's
    aspect is fitted into (2048x2048 by default, as the official pipeline)."""
    if not refs:
        if layout is not None or keep_aspect:
            raise RequestError(f"{'--layout' if layout is not None else '--keep-aspect'} needs at least one --ref image")
        return width, height, None, None, 0
    check_reference_count(len(refs))
    load_reference_images(list(refs))
    layout_text = read_layout(layout)
    if layout_text is not None and not layout_text.strip():
        note("note: --layout is empty: no layout (as the official pipeline reads an empty value)")
        layout_text = None
    size_note, budget = None, 0
    if keep_aspect:
        if len(refs) != 1:
            raise RequestError(f"--keep-aspect works with exactly one --ref image, got {len(refs)}")
        if layout_text is not None:
            raise RequestError("--layout cannot be combined with --keep-aspect: the output then takes the "
                               "reference's own frame, so there are no boxes to place (the official pipeline "
                               "drops the layout in this mode); use one or the other")
        budget = math.isqrt(width * height)
        width, height = keep_aspect_size(refs[0], budget)
        size_note = f"{width}x{height} (the reference's aspect in a {budget}x{budget} px budget)"
    elif layout_text is not None:
        parse_layout_boxes(layout_text, width, height, note)
    if width * height < EDIT_MIN_PIXELS:
        note(f"warning: editing at {width}x{height} (< 2 MP) is known to give noisy images; "
             "consider a larger size or --keep-aspect")
    return width, height, size_note, layout_text, budget


def build_request(model, *, prompt, seed=None, width=None, height=None, no_snap=False, recipe=None, preset=None,
                  steps=None, guidance=None, shift=None, noise_scale=None, s_noise=None, noise_clip=None,
                  noise="torch", blend_seams=0, seam_smoothing=0.0, seam_window="hann", seam_strength=1.0,
                  refs=(), layout=None, keep_aspect=False, editing_scheduler="flow_match",
                  default_size: int = DEFAULT_SIZE, step_noise_seed=None, negative_prompt=None,
                  min_free_side: int = MIN_SIDE, note: Optional[Callable[[str], None]] = None) -> Request:
    """A checked :class:`Request` from option values (``model``: a ModelSource or an Engine,
    which gives the model's name and stored metadata for the default recipe; an I1Source or
    I1Engine for HiDream-I1, see :func:`build_i1_request`).

    ``seed=None`` draws a random seed (in range, stored in the metadata). ``note`` receives
    warnings (default: dropped). ``min_free_side`` lets eval run free sizes below 256 px
    (``default_size`` and ``min_free_side`` are O1's; I1 has its own size rule).
    ``step_noise_seed``: I1 Dev/Fast only. ``negative_prompt``: CFG recipes only; blank means none.
    The prompt rules (length in characters and in the family's tokens) live in :mod:`hidream_mlx.prompts`.
    Raises :class:`RequestError` (a ValueError) naming the option.
    """
    note = note or (lambda line: None)
    prompt = check_text(prompt)
    negative_prompt = negative_text(negative_prompt)
    check_kinds({"no_snap": no_snap, "keep_aspect": keep_aspect, "recipe": recipe, "preset": preset, "noise": noise,
                 "seam_window": seam_window, "layout": layout, "editing_scheduler": editing_scheduler})
    numbers = {"seed": seed, "width": width, "height": height, "steps": steps, "guidance": guidance,
               "shift": shift, "noise_scale": noise_scale, "s_noise": s_noise, "noise_clip": noise_clip,
               "blend_seams": blend_seams, "step_noise_seed": step_noise_seed}
    for name, value in numbers.items():
        if value is not None:
            check_number(name, value)
    if model_family(model) == I1:
        refuse_o1_options({"refs": tuple(refs or ()), "layout": layout, "keep_aspect": keep_aspect,
                           "editing_scheduler": editing_scheduler, "noise": noise, "noise_scale": noise_scale,
                           "s_noise": s_noise, "noise_clip": noise_clip, "blend_seams": blend_seams,
                           "seam_smoothing": seam_smoothing, "seam_window": seam_window,
                           "seam_strength": seam_strength})
        return build_i1_request(model, prompt=prompt, seed=seed, width=width, height=height, no_snap=no_snap,
                                recipe=recipe, preset=preset, steps=steps, guidance=guidance, shift=shift,
                                step_noise_seed=step_noise_seed, negative_prompt=negative_prompt, note=note)
    if step_noise_seed is not None:
        raise RequestError("--step-noise-seed is for HiDream-I1 Dev/Fast (their per-step noise); HiDream-O1 draws "
                           "all its noise from --seed")
    check_seam_smoothing(seam_smoothing, seam_window, seam_strength)
    if noise not in NOISE_KINDS:
        raise RequestError(f"--noise must be one of {', '.join(NOISE_KINDS)}, got {noise!r}")
    refs = tuple(str(r) for r in refs or ())
    if keep_aspect and len(refs) > 1:
        note(f"note: --keep-aspect needs exactly one --ref; with {len(refs)} references the size is snapped "
             "as usual (the official pipeline warns and does the same)")
        keep_aspect = False

    chosen = get_preset(preset) if preset else None
    rec = choose_recipe(model, recipe, len(refs), editing_scheduler)
    overrides = {"steps": steps, "guidance": guidance, "shift": shift, "noise_scale": noise_scale,
                 "s_noise": s_noise, "noise_clip": noise_clip}
    check_recipe_options(rec, overrides)
    if chosen is not None:
        rec = apply_preset(rec, chosen)
    try:
        rec = rec.with_overrides(**overrides)
    except ValueError as e:
        raise RequestError(str(e)) from None
    check_negative(negative_prompt, rec)
    text_tokens = o1_text_tokens(model, prompt, negative_prompt)

    explicit = width is not None or height is not None
    snap = not no_snap
    if chosen is not None and chosen.size is not None:
        default_w, default_h = chosen.size
        # The preset's own size is free (it is a bucket's area, square); an explicit size snaps.
        snap = snap and explicit
    else:
        default_w = default_h = default_size
    w, h = width or default_w, height or default_h
    if keep_aspect and refs:
        size_note = None
    else:
        try:
            if not snap and min_free_side < MIN_SIDE:
                validate_free_size(max(w, MIN_SIDE), max(h, MIN_SIDE))  # multiples and the area cap
                if min(w, h) < min_free_side:
                    raise RequestError(f"size {w}x{h} has a side below {min_free_side}")
                w, h, size_note = w, h, f"{w}x{h} (free size, not snapped)"
            else:
                w, h, size_note = resolve_size(w, h, snap)
        except ValueError as e:
            raise RequestError(str(e)) from None
    w, h, aspect_note, layout_text, budget = check_references(refs, layout, keep_aspect, w, h, note)
    size_note = aspect_note or size_note
    seed = secrets.randbelow(SEED_MAX + 1) if seed is None else seed
    return Request(prompt, w, h, seed, rec, noise=noise, blend_seams=blend_seams, size_note=size_note,
                   references=refs, layout=layout_text, keep_aspect=keep_aspect and bool(refs),
                   keep_aspect_budget=budget, seam_smoothing=seam_smoothing, seam_window=seam_window,
                   seam_strength=seam_strength, negative_prompt=negative_prompt, text_tokens=text_tokens)
