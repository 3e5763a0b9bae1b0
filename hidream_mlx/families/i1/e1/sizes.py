"""HiDream-E1 sizes: how the source image is resized before editing, and the transformer's ``max_seq``.

The two official scripts size the source differently (neither uses I1's area snapping):

* E1.1 (``inference_e1_1.py``, ``resize_image``) keeps the source's aspect within a pixel budget
  of ``image_size^2`` (official 1024^2; here ``image_size = sqrt(width * height)`` of the request):
  1. while both sides are at least ``2 * image_size``: halve them (``side // 2``, BOX filter);
  2. ``k = sqrt(image_size^2 / (w h))``; the candidates ``(a(w k) // 16 * 16, b(h k) // 16 * 16)``
     for ``(a, b)`` = (round, round), (round, floor), (floor, round), (floor, floor), sorted by area
     (descending, stable), give the first whose area fits the budget (none fits: the last);
  3. resize with BICUBIC so the tighter side fits exactly (the other rounded), then crop the
     excess of the other side, centred (offset floored).
* E1-Full (``inference.py``) resizes the source to exactly ``width x height`` (official 768x768;
  PIL's default BICUBIC), the aspect not kept.

The edited image has the resized source's size. The editing input is the noisy latent and the
source latent side by side (twice the width), a non-square input the transformer pads to
``max_seq`` tokens; the scripts set ``max_seq`` to twice the patch tokens of the nominal size
(``2 * (1024/16)^2 = 8192``, ``2 * (768/16)^2 = 4608``), which :func:`edit_max_seq` computes
from the request's width and height. Padded tokens take part in the attention (their keys are
zeroed, not masked out), so ``max_seq`` changes the result and must follow this rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image

MULTIPLE = 16  # the scripts' resize multiple (VAE scale 8 x patch 2)
BUDGET = "budget"  # E1.1: keep the aspect within width * height pixels
EXACT = "exact"  # E1-Full: exactly width x height
RULES = (BUDGET, EXACT)


class EditSizeError(ValueError):
    """A size the editing pipeline cannot work at."""


@dataclass(frozen=True)
class ResizePlan:
    """What :func:`resize_source` does to a source of ``source`` (w, h) pixels."""

    source: tuple[int, int]
    halvings: int  # BOX halvings first (E1.1)
    resized: tuple[int, int]  # the size after the BICUBIC resize, before the crop
    crop: tuple[int, int, int, int]  # (left, top, right, bottom) in the resized image
    size: tuple[int, int]  # the final (w, h): the edited image's size

    @property
    def halved(self) -> tuple[int, int]:
        w, h = self.source
        for _ in range(self.halvings):
            w, h = w // 2, h // 2
        return w, h


def budget_image_size(width: int, height: int) -> float:
    """``image_size`` of ``resize_image`` for a ``width x height`` budget: its square root (an
    int when the budget is a square, so the arithmetic is the script's for 1024x1024)."""
    side = math.isqrt(width * height)
    return side if side * side == width * height else math.sqrt(width * height)


def _budget_plan(w: int, h: int, image_size: float) -> ResizePlan:
    source, halvings = (w, h), 0
    while min(w, h) >= 2 * image_size:
        w, h, halvings = w // 2, h // 2, halvings + 1
    budget = image_size * image_size
    k = math.sqrt(budget / (w * h))
    m = MULTIPLE
    candidates = [(round(w * k) // m * m, round(h * k) // m * m), (round(w * k) // m * m, math.floor(h * k) // m * m),
                  (math.floor(w * k) // m * m, round(h * k) // m * m),
                  (math.floor(w * k) // m * m, math.floor(h * k) // m * m)]
    candidates = sorted(candidates, key=lambda s: s[0] * s[1], reverse=True)
    new = next((c for c in candidates if c[0] * c[1] <= budget), candidates[-1])
    if new[0] <= 0 or new[1] <= 0:
        raise EditSizeError(f"a {source[0]}x{source[1]} source fits no image of sides multiple of {m} within "
                            f"{image_size:g}^2 pixels; ask for a larger --width/--height")
    s1, s2 = w / new[0], h / new[1]
    if s1 < s2:
        tall = round(h / s1)
        top = (tall - new[1]) // 2
        return ResizePlan(source, halvings, (new[0], tall), (0, top, new[0], top + new[1]), new)
    wide = round(w / s2)
    left = (wide - new[0]) // 2
    return ResizePlan(source, halvings, (wide, new[1]), (left, 0, left + new[0], new[1]), new)


def check_request_size(rule: str, width: int, height: int) -> None:
    """Refuse a request size the rule cannot use, before anything loads."""
    if rule not in RULES:
        raise EditSizeError(f"unknown editing size rule {rule!r}; choose {' or '.join(RULES)}")
    if width <= 0 or height <= 0:
        raise EditSizeError(f"--width/--height {width}x{height}: sides must be positive")
    if rule == EXACT and (width % MULTIPLE or height % MULTIPLE):
        raise EditSizeError(f"--width/--height {width}x{height}: E1-Full resizes the source to exactly this size, "
                            f"which must be a multiple of {MULTIPLE} on both sides")
    if rule == BUDGET and width * height < MULTIPLE * MULTIPLE:
        raise EditSizeError(f"--width/--height {width}x{height}: a budget below {MULTIPLE}x{MULTIPLE} pixels "
                            "leaves no room for an image")


def resize_plan(rule: str, source: tuple[int, int], width: int, height: int) -> ResizePlan:
    """How a source of ``source`` (w, h) pixels is resized for a ``width x height`` request."""
    check_request_size(rule, width, height)
    w, h = source
    if rule == EXACT:
        return ResizePlan((w, h), 0, (width, height), (0, 0, width, height), (width, height))
    return _budget_plan(w, h, budget_image_size(width, height))


def resize_source(image: Image.Image, rule: str, width: int, height: int) -> Image.Image:
    """The source as the editing pipeline receives it (PIL in, PIL out, RGB kept)."""
    plan = resize_plan(rule, image.size, width, height)
    for _ in range(plan.halvings):
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    image = image.resize(plan.resized, resample=Image.BICUBIC)
    if plan.crop != (0, 0, *plan.resized):
        image = image.crop(plan.crop)
    return image


def edit_max_seq(width: int, height: int, pixels_per_token: int = MULTIPLE) -> int:
    """The transformer's padded length for a ``width x height`` request: twice the patch tokens
    of its pixel area (8192 at 1024x1024, 4608 at 768x768). Never below the tokens of any
    image the rules make from that request, whose area is at most ``width * height``."""
    return 2 * (width * height // (pixels_per_token * pixels_per_token))


def restore_source_size(image: Image.Image, source: tuple[int, int]) -> Image.Image:
    """The edited image resized back to the source's (w, h), as both scripts end (BICUBIC)."""
    return image if image.size == tuple(source) else image.resize(tuple(source), resample=Image.BICUBIC)
