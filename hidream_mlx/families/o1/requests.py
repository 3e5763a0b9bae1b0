"""HiDream-O1's request rules: recipes and the options each one reads, sizes (official buckets or
free sizes), reference images, layouts, noise and the seam fixes.

The shared request builder (``hidream_mlx.requests``) has checked the prompt and every number's
range before it calls :func:`build_o1_request`; everything here runs before any weight loads.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path
from typing import Callable, Optional

from hidream_mlx.family import SEED_MAX, RequestError, StartImage, check_number, option_flag, start_image
from hidream_mlx.files import read_text_file
from hidream_mlx.noise import NOISE_KINDS
from hidream_mlx.families.o1.engine import Request
from hidream_mlx.families.o1.config import PATCH_SIZE
from hidream_mlx.families.o1.layout import parse_layout_boxes
from hidream_mlx.families.o1.prompt import MAX_PROMPT_TOKENS, prompt_tokens
from hidream_mlx.families.o1.recipes import (RECIPES, Recipe, apply_preset, get_preset, get_recipe, recipe_for_model,
                                             recipe_for_references)
from hidream_mlx.families.o1.references import check_reference_count, load_reference_images, resize_reference
from hidream_mlx.families.o1.seam_smoothing import check_settings as check_seam_smoothing
from hidream_mlx.families.o1.sizes import MIN_SIDE, resolve_size, validate_free_size

DEFAULT_SIZE = 2048
EDIT_MIN_PIXELS = 2_000_000  # editing below about 2 MP gives noise with the released checkpoints

# Which recipes read an option at all (the others would record it without effect).
FLASH_RECIPES = tuple(name for name, r in RECIPES.items() if r.scheduler == "flash")
SHIFTED_RECIPES = tuple(name for name, r in RECIPES.items() if not r.distilled)
USED_BY = {"s_noise": FLASH_RECIPES, "noise_clip": FLASH_RECIPES, "shift": SHIFTED_RECIPES}


def check_free_size(width, height, flag: str = "--width/--height") -> None:
    """A HiDream-O1 size taken as given (``bench --size``, ``info``): the ranges of ``--width`` and
    ``--height``, then the free-size rule (whole 32 px patches, at least 256 px, at most
    ``sizes.MAX_PIXELS``), before any memory is estimated. The error names ``flag``."""
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


def check_prompt_tokens(model, prompt: str, negative: Optional[str]) -> int:
    """Refuse a prompt or negative prompt longer than :data:`MAX_PROMPT_TOKENS` of the model's own
    tokens (the official pipeline sets no limit; see ``prompt.py`` for the number); the longest
    text prefix (chat template included) a run caches, for the memory fit check."""
    longest = 0
    for flag, text in (("--prompt", prompt), ("--negative-prompt", negative)):
        if text is None:
            continue
        alone, prefix = prompt_tokens(model, text)
        if alone > MAX_PROMPT_TOKENS:
            raise RequestError(f"{flag} is {alone:,} tokens; HiDream-O1 takes at most {MAX_PROMPT_TOKENS:,} "
                               "(the longest prompt HiDream's own prompt refiner writes); shorten it")
        longest = max(longest, prefix)
    return longest


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


def read_layout(layout: Optional[str]) -> Optional[str]:
    """The layout as JSON text: the option's value, or the file it names (whose errors name it)."""
    if layout is None:
        return None
    path = Path(layout)
    if layout.strip() and len(layout) < 4096 and os.path.lexists(path):
        text = read_text_file(path, "--layout file")
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            raise RequestError(f"{path}: --layout file is not valid JSON ({e.msg} at line {e.lineno} "
                               f"column {e.colno})") from None
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


def check_start(start: Optional[StartImage], refs: tuple) -> None:
    """``--init-image`` and ``--ref`` are two different inputs; say which is for what."""
    if start is not None and refs:
        raise RequestError("--init-image cannot be combined with --ref: --ref gives reference images the model "
                           "looks at (editing, subject-driven generation), --init-image the picture the sampling "
                           "starts from (image-to-image, inpainting with --mask); use one of them")


def build_o1_request(model, options: dict, note: Callable[[str], None]) -> Request:
    """A checked O1 :class:`Request` from option values (``model``: a ModelSource, an Engine, or
    None with a recipe name). ``seed=None`` draws a random seed (in range, stored in the metadata).
    ``small_sizes`` lets eval run free sizes below 256 px, down to one patch; ``default_size`` is the
    side without a width/height or preset."""
    prompt, seed, width, height = options["prompt"], options.get("seed"), options.get("width"), options.get("height")
    no_snap, recipe, preset = options.get("no_snap", False), options.get("recipe"), options.get("preset")
    steps, guidance, shift = options.get("steps"), options.get("guidance"), options.get("shift")
    noise_scale, s_noise, noise_clip = options.get("noise_scale"), options.get("s_noise"), options.get("noise_clip")
    noise, blend_seams = options.get("noise", "torch"), options.get("blend_seams", 0)
    seam_smoothing, seam_window = options.get("seam_smoothing", 0.0), options.get("seam_window", "hann")
    seam_strength = options.get("seam_strength", 1.0)
    refs, layout, keep_aspect = options.get("refs") or (), options.get("layout"), options.get("keep_aspect", False)
    editing_scheduler = options.get("editing_scheduler", "flow_match")
    default_size = options.get("default_size", DEFAULT_SIZE)
    min_free_side = PATCH_SIZE if options.get("small_sizes") else MIN_SIDE
    step_noise_seed = options.get("step_noise_seed")
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
    negative_prompt = options.get("negative_prompt")
    text_tokens = check_prompt_tokens(model, prompt, negative_prompt)
    start = start_image(options, rec.steps)
    check_start(start, refs)
    from_source = start is not None and width is None and height is None
    if start is not None:
        # The source's size stands in for a missing side, as an explicit size (it snaps unless --no-snap).
        width, height = width or start.size[0], height or start.size[1]

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
            raise (start.size_refused(e) if from_source else RequestError(str(e))) from None
    w, h, aspect_note, layout_text, budget = check_references(refs, layout, keep_aspect, w, h, note)
    size_note = aspect_note or size_note
    if start is not None and start.aspect_note(w, h):
        note(start.aspect_note(w, h))
    seed = secrets.randbelow(SEED_MAX + 1) if seed is None else seed
    return Request(prompt, w, h, seed, rec, noise=noise, blend_seams=blend_seams, size_note=size_note,
                   references=refs, layout=layout_text, keep_aspect=keep_aspect and bool(refs),
                   keep_aspect_budget=budget, seam_smoothing=seam_smoothing, seam_window=seam_window,
                   seam_strength=seam_strength, negative_prompt=negative_prompt, text_tokens=text_tokens,
                   start=start)
