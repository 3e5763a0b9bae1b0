"""One request builder for ``generate``, ``eval`` and ``serve``: option values -> a checked request.

Option names are the CLI's with underscores (``noise_scale`` is ``--noise-scale``). The checks that
mean the same for every family run here: the prompt's and the negative prompt's text, every
number's range and finiteness, the JSON kind of every option (a prompt file's ``"no_snap":
"false"`` is refused, not taken as true); then the model's family (``hidream_mlx.families``) applies
its own rules: recipes, sizes, the options its recipes read, the prompt's length in its own tokens
(:attr:`Family.prompt_rule`). An option that belongs to another family is refused naming its flag
and whose it is. Everything runs before any weights load.

Prompts: text (no lone surrogates), not empty, without Qwen special-token strings, at most
:data:`MAX_PROMPT_CHARS` characters, checked before anything is tokenized so a megabyte of text
costs a ``len``. A negative prompt that is empty or blank means none: the recipe's own
unconditional prompt, and the same image.
"""

from __future__ import annotations

import json
import re
from typing import Callable, Optional

from hidream_mlx.families import family_named, registered
from hidream_mlx.family import RequestError, check_number, option_flag

# Qwen special tokens look like <|name|>; inside a prompt the tokenizer would turn them into
# structure (end the user turn, open an image), which the official pipelines never intend.
SPECIAL_TOKEN = re.compile(r"<\|[^<>|\s]*\|>")
# Far above any prompt a family takes in tokens (about 4 characters per token in English, fewer in
# other scripts); only a bound on the work of counting tokens.
MAX_PROMPT_CHARS = 16_000
# Numbers checked here for every family (the seam options have their own check in O1's rules).
NUMBER_OPTIONS = ("seed", "width", "height", "steps", "guidance", "shift", "noise_scale", "s_noise", "noise_clip",
                  "blend_seams", "step_noise_seed", "strength", "mask_blur")
# The JSON kind of each option a prompt-file line or a request body may carry.
NUMBER = (int, float)
OPTION_KINDS: dict[str, tuple] = {
    "prompt": (str,), "negative_prompt": (str,), "seed": (int,), "width": (int,), "height": (int,),
    "no_snap": (bool,), "keep_aspect": (bool,), "recipe": (str,), "preset": (str,), "steps": (int,),
    "guidance": NUMBER, "shift": NUMBER, "noise_scale": NUMBER, "s_noise": NUMBER, "noise_clip": NUMBER,
    "noise": (str,), "blend_seams": (int,), "seam_smoothing": NUMBER, "seam_window": (str,),
    "seam_strength": NUMBER, "step_noise_seed": (int,), "editing_scheduler": (str,), "layout": (str,),
    "init_image": (str,), "mask": (str,), "strength": NUMBER, "mask_blur": (int,),
}
KIND_NAMES = {(bool,): "true or false (a JSON boolean)", (int,): "a whole number", NUMBER: "a number",
              (str,): "text"}


def limits_help() -> str:
    """The prompt limits in one sentence, for --help texts (generate, eval, serve)."""
    rules = "; ".join(family.prompt_rule for family in registered() if family.prompt_rule)
    return f"at most {MAX_PROMPT_CHARS:,} characters" + (f"; {rules}" if rules else "")


def check_prompt(prompt, flag: str = "--prompt") -> str:
    """``prompt`` if it is non-empty text of at most MAX_PROMPT_CHARS with no special tokens."""
    if not isinstance(prompt, str):
        raise RequestError(f"{flag} must be text, got {type(prompt).__name__}")
    if not prompt.strip():
        raise RequestError(f"{flag} is empty")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise RequestError(f"{flag} is {len(prompt):,} characters; at most {MAX_PROMPT_CHARS:,} are accepted; "
                           "shorten it")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON's "\ud800": a lone surrogate, which no tokenizer or file takes
        raise RequestError(f"{flag} is not valid text: a lone surrogate {prompt[e.start]!r} at character "
                           f"{e.start + 1}") from None
    found = SPECIAL_TOKEN.search(prompt)
    if found:
        raise RequestError(f"{flag} contains the special-token string {found.group(0)!r}, which would change "
                           "the conversation the model sees; remove it")
    return prompt


def negative_text(negative) -> Optional[str]:
    """The negative prompt to encode: None (the recipe's unconditional prompt) when it is empty
    or only whitespace, else the checked text."""
    if isinstance(negative, str) and not negative.strip():
        return None
    return None if negative is None else check_prompt(negative, "--negative-prompt")


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


def check_kinds(options: dict) -> None:
    """Every option of :data:`OPTION_KINDS` given (not None) has its kind, whoever gave it."""
    for name, value in options.items():
        wrong = None if value is None or name not in OPTION_KINDS else kind_error(name, value)
        if wrong:
            raise RequestError(f"{option_flag(name)} {wrong.split(' ', 1)[1]}")


def family_of_model(model):
    """The family of a source or an engine (their ``family`` name); None (eval jobs that carry
    only a recipe name) means HiDream-O1."""
    return family_named(getattr(model, "family", None) or "o1")


def refuse_foreign_options(family, options: dict) -> None:
    """One line for the first option that only another family reads."""
    for other in registered():
        if other.name == family.name:
            continue
        for name, (unset, why) in other.own_options.items():
            if name in family.own_options:
                continue
            value = options.get(name)
            if value is None or value == unset or (isinstance(value, (tuple, list)) and not value):
                continue
            flag = "--ref" if name == "refs" else option_flag(name)
            shown = "" if isinstance(value, (bool, tuple, list)) else f" {value}"
            raise RequestError(f"{flag}{shown} is a {other.title} option and means nothing for {family.title} "
                               f"({why}); remove it")


def build_request(model, *, prompt, negative_prompt=None, note: Optional[Callable[[str], None]] = None,
                  **options):
    """A checked request from option values (``model``: a source or an engine of any family, or
    None for a HiDream-O1 request by recipe name).

    ``seed=None`` draws a random seed (in range, stored in the metadata). ``negative_prompt``: CFG
    recipes only; blank means none. ``note`` receives warnings (default: dropped). Raises
    :class:`RequestError` (a ValueError) naming the option.
    """
    note = note or (lambda line: None)
    prompt = check_prompt(prompt)
    negative_prompt = negative_text(negative_prompt)
    check_kinds(options)
    for name in NUMBER_OPTIONS:
        if options.get(name) is not None:
            check_number(name, options[name])
    family = family_of_model(model)
    refuse_foreign_options(family, options)
    request = family.build_request(model, {**options, "prompt": prompt, "negative_prompt": negative_prompt}, note)
    rec = request.recipe
    if negative_prompt is not None and not rec.uses_cfg:
        raise RequestError(f"--negative-prompt needs CFG: the {rec.name} recipe here runs guidance {rec.guidance:g} "
                           "(<= 1, no unconditional pass to replace); use a recipe or --guidance above 1")
    return request
