"""One request builder for ``generate``, ``eval`` and ``serve``: option values -> a checked request.

Option names are the CLI's with underscores (``noise_scale`` is ``--noise-scale``). The checks that
mean the same for every family run here (the prompt's text, every number's range and finiteness);
then the model's family (``hidream_mlx.families``) applies its own rules: recipes, sizes, the
options its recipes read. An option that belongs to another family is refused naming its flag and
whose it is. Everything runs before any weights load.
"""

from __future__ import annotations

import re
from typing import Callable, Optional

from hidream_mlx.families import family_named, registered
from hidream_mlx.family import RequestError, check_number, option_flag

# Qwen special tokens look like <|name|>; inside a prompt the tokenizer would turn them into
# structure (end the user turn, open an image), which the official pipelines never intend.
SPECIAL_TOKEN = re.compile(r"<\|[^<>|\s]*\|>")
# Numbers checked here for every family (the seam options have their own check in O1's rules).
NUMBER_OPTIONS = ("seed", "width", "height", "steps", "guidance", "shift", "noise_scale", "s_noise", "noise_clip",
                  "blend_seams", "step_noise_seed", "strength", "mask_blur")


def check_prompt(prompt, flag: str = "--prompt") -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise RequestError(f"{flag} is empty")
    found = SPECIAL_TOKEN.search(prompt)
    if found:
        raise RequestError(f"{flag} contains the special-token string {found.group(0)!r}, which would change "
                           "the conversation the model sees; remove it")
    return prompt


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


def build_request(model, *, prompt, note: Optional[Callable[[str], None]] = None, **options):
    """A checked request from option values (``model``: a source or an engine of any family, or
    None for a HiDream-O1 request by recipe name).

    ``seed=None`` draws a random seed (in range, stored in the metadata). ``note`` receives
    warnings (default: dropped). Raises :class:`RequestError` (a ValueError) naming the option.
    """
    note = note or (lambda line: None)
    prompt = check_prompt(prompt)
    for name in NUMBER_OPTIONS:
        if options.get(name) is not None:
            check_number(name, options[name])
    family = family_of_model(model)
    refuse_foreign_options(family, options)
    return family.build_request(model, {**options, "prompt": prompt}, note)
