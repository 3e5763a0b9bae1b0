"""Layout boxes for subject-driven generation: parsing, validation, and the layout image.

Boxes are relative [x1, x2, y1, y2] (0..1, or 0..100 read as percent), optionally with text;
the layout image outlines them in colours that also frame the matching references.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

MAX_LAYOUT_BOXES = 5
LAYOUT_COLORS = (
    (255, 0, 0), (0, 180, 0), (0, 0, 255), (204, 180, 0), (255, 0, 255),
    (0, 255, 255), (128, 0, 0), (0, 128, 0), (0, 0, 128), (128, 128, 0),
)  # fmt: skip


@dataclass(frozen=True)
class LayoutBox:
    bbox: tuple[int, int, int, int]  # absolute (x1, y1, x2, y2) in target pixels
    text: str = ""


def _layout_items(spec: Any) -> list:
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
    if isinstance(spec, dict):
        spec = next((spec[k] for k in ("layout_bboxes", "bboxes", "boxes", "bbox_list") if k in spec), spec)
    if not isinstance(spec, list) or not spec:
        raise ValueError("layout boxes must be a non-empty list of [x1, x2, y1, y2] or {'bbox': ..., 'text': ...}")
    return spec


def _to_absolute(values: Any, width: int, height: int, index: int) -> tuple[int, int, int, int]:
    if (
        not isinstance(values, (list, tuple))
        or len(values) != 4
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    ):
        raise ValueError(f"layout box {index}: expected 4 numbers [x1, x2, y1, y2], got {values!r}")
    x1, x2, y1, y2 = (float(v) for v in values)
    largest = max(x1, x2, y1, y2)
    if min(x1, x2, y1, y2) < 0 or largest > 100:
        raise ValueError(f"layout box {index}: {list(values)} out of range (relative 0..1, or percent 0..100)")
    scale = 1.0 if largest <= 1.0 else 0.01
    x1, x2 = sorted((x1 * scale * width, x2 * scale * width))
    y1, y2 = sorted((y1 * scale * height, y2 * scale * height))
    x1, x2 = (min(width - 1, int(round(v))) for v in (x1, x2))
    y1, y2 = (min(height - 1, int(round(v))) for v in (y1, y2))
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"layout box {index}: {list(values)} is empty at {width}x{height}")
    return x1, y1, x2, y2


def parse_layout_boxes(spec: Any, width: int, height: int) -> list[LayoutBox]:
    """Boxes from a JSON string, a JSON file path, a list or a dict holding one: each item is
    [x1, x2, y1, y2] (relative; 0..100 read as percent) or {"bbox"/"box": ..., "text"/"label": ...}."""
    boxes = []
    for index, item in enumerate(_layout_items(spec)):
        if isinstance(item, dict):
            values = item.get("bbox") or item.get("box")
            if values is None:
                raise ValueError(f"layout box {index}: missing 'bbox'")
            text = str(item.get("text") or item.get("label") or "")
        else:
            values, text = item, ""
        boxes.append(LayoutBox(_to_absolute(values, width, height, index), text))
    return boxes


def draw_layout(boxes: Sequence[LayoutBox], width: int, height: int) -> tuple[Image.Image, list]:
    """Black image with the largest MAX_LAYOUT_BOXES boxes outlined, thickest first; returns it
    and each box's colour (None for boxes not drawn), in input order."""
    from PIL import ImageDraw

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
