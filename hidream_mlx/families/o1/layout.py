"""Layout boxes for subject-driven generation: parsing, validation, and the layout image.

Boxes are [x1, x2, y1, y2], optionally with text, read as the official pipeline reads them: by
the largest absolute value, relative (<= 1), percent (<= 100) or pixels of the target (above
100); then clamped into the image. An empty list still adds the (black) layout image. The layout
image outlines the boxes in colours that also frame the matching references.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

MAX_LAYOUT_BOXES = 5
LAYOUT_COLORS = (
    (255, 0, 0), (0, 180, 0), (0, 0, 255), (204, 180, 0), (255, 0, 255),
    (0, 255, 255), (128, 0, 0), (0, 128, 0), (0, 0, 128), (128, 128, 0),
)  # fmt: skip


@dataclass(frozen=True)
class LayoutBox:
    bbox: tuple[int, int, int, int]  # absolute (x1, y1, x2, y2) in target pixels
    text: str = ""


Note = Optional[Callable[[str], None]]


def _layout_items(spec: Any, note: Note = None) -> list:
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        try:
            is_file = path.is_file()
        except OSError:  # a JSON string too long to be a path
            is_file = False
        try:
            spec = json.loads(path.read_text(encoding="utf-8") if is_file else str(spec))
        except json.JSONDecodeError as e:
            raise ValueError(f"layout boxes are neither valid JSON nor a JSON file ({e.msg})") from None
        except RecursionError:
            raise ValueError("layout boxes are nested too deeply to read") from None
    if isinstance(spec, dict):
        spec = next((spec[k] for k in ("layout_bboxes", "bboxes", "boxes", "bbox_list") if k in spec), spec)
    if not isinstance(spec, list):
        raise ValueError("layout boxes must be a list of [x1, x2, y1, y2] or {'bbox': ..., 'text': ...}")
    if not spec and note:
        note("note: the layout has no boxes: as in the official pipeline, each reference gets its default frame "
             "colour and an empty (black) layout image is added")
    return spec


def _unit(largest: float) -> tuple[str, Callable[[float, int], float]]:
    """How the official pipeline reads a box, decided by its largest absolute value: the unit's
    name and value -> pixels along a side (in the official operation order, so rounding agrees)."""
    if largest <= 1.0:
        return "relative", lambda v, side: v * side
    if largest <= 100.0:
        return "percent", lambda v, side: v / 100.0 * side
    return "pixels", lambda v, side: v


def _to_absolute(values: Any, width: int, height: int, index: int, note: Note = None) -> tuple[int, int, int, int]:
    if (
        not isinstance(values, (list, tuple))
        or len(values) != 4
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    ):
        raise ValueError(f"layout box {index}: expected 4 numbers [x1, x2, y1, y2], got {values!r}")
    unit, to_pixels = _unit(max(abs(float(v)) for v in values))
    x1, x2 = sorted(to_pixels(float(v), width) for v in values[:2])
    y1, y2 = sorted(to_pixels(float(v), height) for v in values[2:])
    outside = x1 < 0 or y1 < 0 or x2 > width or y2 > height
    x1, x2 = (max(0, min(width - 1, int(round(v)))) for v in (x1, x2))
    y1, y2 = (max(0, min(height - 1, int(round(v)))) for v in (y1, y2))
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"layout box {index}: {list(values)} ({unit}) is empty inside {width}x{height}")
    if note and (unit != "relative" or outside):
        read = {"percent": "read as percent (values above 1, none above 100)",
                "pixels": "read as pixels (a value above 100)"}.get(unit, "relative")
        clamped = f", clamped into the {width}x{height} image" if outside else ""
        note(f"note: layout box {index} {list(values)}: {read}{clamped}: x {x1}..{x2}, y {y1}..{y2} px")
    return x1, y1, x2, y2


def parse_layout_boxes(spec: Any, width: int, height: int, note: Note = None) -> list[LayoutBox]:
    """Boxes from a JSON string, a JSON file path, a list or a dict holding one: each item is
    [x1, x2, y1, y2] (relative, percent or pixels, see the module docstring) or
    {"bbox"/"box": ..., "text"/"label": ...}. ``note`` receives a line for each box read as percent
    or pixels or clamped, and for an empty list."""
    boxes = []
    for index, item in enumerate(_layout_items(spec, note)):
        if isinstance(item, dict):
            values = item.get("bbox") or item.get("box")
            if values is None:
                raise ValueError(f"layout box {index}: missing 'bbox'")
            text = str(item.get("text") or item.get("label") or "")
        else:
            values, text = item, ""
        boxes.append(LayoutBox(_to_absolute(values, width, height, index, note), text))
    return boxes


def draw_layout(boxes: Sequence[LayoutBox], width: int, height: int) -> tuple[Image.Image, list]:
    """Black image with the largest MAX_LAYOUT_BOXES boxes outlined, thickest first; returns it
    and each box's colour (None for boxes not drawn), in input order."""
    max_line = int(math.sqrt(width * height) * 0.05)
    gap = max(1, max_line // MAX_LAYOUT_BOXES)
    image = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    colors: list = [None] * len(boxes)

    def area(i: int) -> int:
        x1, y1, x2, y2 = boxes[i].bbox
        return (x2 - x1) * (y2 - y1)

    largest_first = sorted(range(len(boxes)), key=area, reverse=True)[:MAX_LAYOUT_BOXES]
    for rank, i in enumerate(largest_first):
        colors[i] = LAYOUT_COLORS[rank % len(LAYOUT_COLORS)]
        draw.rectangle(list(boxes[i].bbox), outline=colors[i], width=max(max_line - rank * gap, 5))
    return image, colors


def add_border(image: Image.Image, color: Sequence[int], width: int) -> Image.Image:
    """A frame of ``width`` pixels drawn inside the image (size unchanged)."""
    pixels = np.array(image.convert("RGB"))
    if width > 0:
        for region in (np.s_[:width, :], np.s_[-width:, :], np.s_[:, :width], np.s_[:, -width:]):
            pixels[region] = color
    return Image.fromarray(pixels)
