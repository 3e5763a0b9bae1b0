"""Reference images on the prompt side: editing and subject-driven generation with 1..10 refs.

Each reference enters the sequence twice, as the official pipeline does it:

* as **ref patches**: resized (how much depends on the number of references) to a multiple of
  32 px, in [-1, 1], cut into 32x32 patches appended after the target patches;
* as a **conditioning image** for the Qwen3-VL vision tower: that resized ref resized again with
  LANCZOS to about 384^2 (smaller for many refs), turned into ``pixel_values`` by the Qwen3-VL
  image processor; its merged features replace the ``<|image_pad|>`` tokens of the prompt.

Optionally a layout image (coloured boxes on black, boxes given as relative [x1, x2, y1, y2])
is added as one more reference and each ref gets a border in its box's colour.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
from PIL import Image

from hidream_mlx.families.o1.config import FIX_POINT, PATCH_SIZE, TMS_TOKEN_ID
from hidream_mlx.families.o1.layout import (
    LAYOUT_COLORS,
    LayoutBox,
    add_border,
    draw_layout,
    parse_layout_boxes,
)
from hidream_mlx.images import as_viewer_rgb, open_rgb
from hidream_mlx.families.o1.patches import patchify
from hidream_mlx.families.o1.prompt import chat_text
from hidream_mlx.families.o1.vision_processor import ImageProcessorConfig, image_token_counts, vision_inputs

MAX_REFERENCES = 10
CONDITION_IMAGE_SIZE = 384
KEEP_ASPECT_MAX_SIZE = 2048

ImageLike = Union[str, Path, Image.Image]


# ---------------------------------------------------------------------------------- inputs


def check_reference_count(count: int) -> None:
    if count > MAX_REFERENCES:
        raise ValueError(f"at most {MAX_REFERENCES} reference images are supported, got {count}")


def load_reference_images(sources: Sequence[ImageLike]) -> list[Image.Image]:
    """Open paths (or take PIL images) as the RGB picture a viewer shows, rejecting too many
    refs and unreadable files (the error names the file)."""
    check_reference_count(len(sources))
    return [as_viewer_rgb(s) if isinstance(s, Image.Image) else open_rgb(s) for s in sources]


def reference_max_size(num_refs: int, height: int, width: int) -> int:
    """Side of the square whose area each resized ref gets: fewer pixels as refs add up."""
    side = max(height, width)
    if num_refs <= 1:
        return side
    if num_refs == 2:
        return side * 48 // 64
    if num_refs <= 4:
        return side // 2
    if num_refs <= 8:
        return side * 24 // 64
    return side // 4


def condition_image_size(num_refs: int) -> int:
    if num_refs <= 4:
        return CONDITION_IMAGE_SIZE
    if num_refs <= 8:
        return CONDITION_IMAGE_SIZE * 48 // 64
    return CONDITION_IMAGE_SIZE // 2


def resize_reference(
    image: Image.Image, max_size: int, patch_size: int = PATCH_SIZE, resample=Image.BICUBIC
) -> Image.Image:
    """Scale to an area of at most max_size^2 with sides multiple of patch_size, keeping the
    aspect by a centred crop (the official ``resize_pilimage``)."""
    while min(image.size) >= 2 * max_size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    width, height = image.size
    area = max_size * max_size
    scale = math.sqrt(area / (width * height))
    m = patch_size
    candidates = [
        (round(width * scale) // m * m, round(height * scale) // m * m),
        (round(width * scale) // m * m, math.floor(height * scale) // m * m),
        (math.floor(width * scale) // m * m, round(height * scale) // m * m),
        (math.floor(width * scale) // m * m, math.floor(height * scale) // m * m),
    ]
    candidates.sort(key=lambda size: size[0] * size[1], reverse=True)
    new_w, new_h = next((size for size in candidates if size[0] * size[1] <= area), candidates[-1])
    if new_w == 0 or new_h == 0:
        raise ValueError(f"reference image {width}x{height} is too elongated to resize to {max_size}^2 pixels")
    # Same float expressions as the reference, so ties round the same way.
    s1, s2 = width / new_w, height / new_h
    if s1 < s2:
        scaled_h = round(height / s1)
        image = image.resize((new_w, scaled_h), resample=resample)
        top = (scaled_h - new_h) // 2
        return image.crop((0, top, new_w, top + new_h))
    scaled_w = round(width / s2)
    image = image.resize((scaled_w, new_h), resample=resample)
    left = (scaled_w - new_w) // 2
    return image.crop((left, 0, left + new_w, new_h))


def condition_dimensions(max_size: int, ratio: float) -> tuple[int, int]:
    """(width, height) of area about max_size^2 with the given width/height ratio, multiples of 32."""
    width = math.sqrt(max_size * max_size * ratio)
    height = width / ratio
    return int(width / 32) * 32, int(height / 32) * 32


def condition_image(resized_ref: Image.Image, num_refs: int) -> Image.Image:
    """The copy of a resized ref that the vision tower reads."""
    cond_w, cond_h = condition_dimensions(condition_image_size(num_refs), resized_ref.width / resized_ref.height)
    if cond_w == 0 or cond_h == 0:
        raise ValueError(f"reference image {resized_ref.width}x{resized_ref.height} is too elongated")
    return resized_ref.resize((cond_w, cond_h), resample=Image.LANCZOS)


# ----------------------------------------------------------------------------- ref patches


def to_unit_range(image: Image.Image) -> np.ndarray:
    """RGB image -> float32 [3, H, W] in [-1, 1], rounding exactly as the reference's
    ToDtype(scale=True) (multiply by 1/255) then Normalize(0.5, 0.5)."""
    x = np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1)
    return (x * np.float32(1 / 255) - np.float32(0.5)) / np.float32(0.5)


def reference_patches(resized_refs: Sequence[Image.Image], patch_size: int = PATCH_SIZE) -> np.ndarray:
    """Resized refs -> their 32x32 patches in [-1, 1], concatenated [sum N_i, 3*p*p]."""
    return np.concatenate([patchify(to_unit_range(ref), patch_size) for ref in resized_refs])


# ----------------------------------------------------------------------------- prompt text


def edit_prompt_text(prompt: str, token_counts: Sequence[int]) -> str:
    """The full text of an editing prompt, ``<|image_pad|>`` already repeated per reference,
    ending with ``<|boi_token|><|tms_token|>``."""
    vision = "".join(f"<|vision_start|>{'<|image_pad|>' * n}<|vision_end|>" for n in token_counts)
    return chat_text(vision + prompt)


# ------------------------------------------------------------------------------- positions


def rope_index(
    input_ids,
    image_grid_thw,
    skip_vision_start: Sequence[int],
    *,
    image_token_id: int,
    vision_start_token_id: int,
    spatial_merge_size: int = 1,
    fix_point: int = FIX_POINT,
) -> tuple[np.ndarray, int]:
    """MRoPE positions [3, L] and delta (max position + 1 - L) of a sequence whose image blocks
    are ``<|vision_start|>`` followed by image tokens (the official ``get_rope_index_fix_point``).

    Text runs count up on all three axes from one past the largest position so far. An image
    block with skip 0 is a Qwen-VL image: its vision_start is text and its tokens sit at
    (t, h, w) offset past that text. With skip 1 the vision_start token is the block's first
    image token; the first such block is anchored at ``fix_point`` and later ones continue one
    past the largest position so far.
    """
    ids = np.asarray(input_ids, dtype=np.int64).reshape(-1)
    grid = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
    first_image_tokens = np.flatnonzero((ids[:-1] == vision_start_token_id) & (ids[1:] == image_token_id)) + 1
    if len(first_image_tokens) != len(grid) or len(skip_vision_start) != len(grid):
        raise ValueError(
            f"sequence has {len(first_image_tokens)} image blocks but {len(grid)} grids "
            f"and {len(skip_vision_start)} skip flags"
        )
    pieces, cursor, next_pos, anchor = [], 0, 0, fix_point
    for ed, (t, h, w), skip in zip(first_image_tokens.tolist(), grid.tolist(), skip_vision_start):
        h, w = h // spatial_merge_size, w // spatial_merge_size
        text_len = max(0, ed - cursor - int(skip))
        pieces.append(np.broadcast_to(np.arange(text_len, dtype=np.int64) + next_pos, (3, text_len)))
        thw = np.stack([a.reshape(-1) for a in np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")])
        if skip and anchor > 0:
            offset, anchor = anchor, 0
        elif skip:
            offset = next_pos
        else:
            offset = next_pos + text_len
        pieces.append(thw + offset)
        next_pos = max(next_pos + text_len, offset + int(thw.max()) + 1)
        cursor = ed + t * h * w
    if cursor < len(ids):
        pieces.append(np.broadcast_to(np.arange(len(ids) - cursor, dtype=np.int64) + next_pos, (3, len(ids) - cursor)))
    positions = np.concatenate(pieces, axis=1)
    if positions.shape[1] != len(ids):
        raise ValueError(f"image blocks do not match their grids ({positions.shape[1]} positions for {len(ids)} tokens)")
    return positions, int(positions.max()) + 1 - len(ids)


@dataclass(frozen=True)
class EditSequence:
    """Positions and attention types of text ++ target patches ++ ref patches (length L)."""

    position_ids: np.ndarray  # [3, L] int64
    token_types: np.ndarray  # [L] int64: 0 text (causal), 1 tms + target + ref patches (full)
    vinput_mask: np.ndarray  # [L] bool: target and ref patches (the rows fed with vinputs)
    text_len: int
    num_target: int
    num_ref: int


def edit_sequence(
    input_ids,
    image_grid_thw,
    target_hw: tuple[int, int],
    ref_grids: Sequence[tuple[int, int]],
    *,
    image_token_id: int,
    vision_start_token_id: int,
    spatial_merge_size: int,
    patch_size: int = PATCH_SIZE,
) -> EditSequence:
    """Positions and types for an editing sequence.

    ``input_ids`` [T] is the tokenized ``edit_prompt_text`` (ending with the tms token);
    ``image_grid_thw`` the processor grids of the conditioning images; ``target_hw`` the target
    size in pixels; ``ref_grids`` the (rows, cols) of 32 px patches of each resized ref.
    """
    ids = np.asarray(input_ids, dtype=np.int64).reshape(-1)
    cond_grid = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3).copy()
    if ids[-1] != TMS_TOKEN_ID:
        raise ValueError("editing input_ids must end with <|tms_token|>")
    if len(ref_grids) != len(cond_grid):
        raise ValueError(f"{len(ref_grids)} ref patch grids for {len(cond_grid)} conditioning images")
    pads = int((ids == image_token_id).sum())
    expected_pads = sum(image_token_counts(cond_grid, spatial_merge_size))
    if pads != expected_pads:
        raise ValueError(f"prompt has {pads} <|image_pad|> tokens, the conditioning images need {expected_pads}")

    cond_grid[:, 1:] //= spatial_merge_size
    height, width = target_hw
    target_grid = np.array([[1, height // patch_size, width // patch_size]], dtype=np.int64)
    ref_grid = np.array([[1, rows, cols] for rows, cols in ref_grids], dtype=np.int64).reshape(-1, 3)
    block_lengths = np.concatenate([target_grid, ref_grid]).prod(axis=1)
    blocks = np.full(int(block_lengths.sum()), image_token_id, dtype=np.int64)
    blocks[np.concatenate([[0], np.cumsum(block_lengths)[:-1]])] = vision_start_token_id

    num_refs = len(cond_grid)
    positions, _ = rope_index(
        np.concatenate([ids, blocks]),
        np.concatenate([cond_grid, target_grid, ref_grid]),
        [0] * num_refs + [1] + [1] * num_refs,
        image_token_id=image_token_id,
        vision_start_token_id=vision_start_token_id,
        spatial_merge_size=1,
    )
    text_len, num_target, num_ref = len(ids), int(block_lengths[0]), int(block_lengths[1:].sum())
    token_types = np.zeros(positions.shape[1], dtype=np.int64)
    token_types[text_len - 1 :] = 1
    vinput_mask = np.zeros(positions.shape[1], dtype=bool)
    vinput_mask[text_len:] = True
    return EditSequence(positions, token_types, vinput_mask, text_len, num_target, num_ref)


# ---------------------------------------------------------------------------------- layout


def layout_reference_images(
    refs: Sequence[Image.Image],
    boxes: Sequence[LayoutBox],
    width: int,
    height: int,
    ref_max_size: int,
    patch_size: int = PATCH_SIZE,
) -> list[Image.Image]:
    """Each ref resized and framed in its box's colour, then the layout image itself."""
    layout, colors = draw_layout(boxes, width, height)
    framed = []
    for i, ref in enumerate(refs):
        ref = resize_reference(ref, ref_max_size, patch_size)
        color = colors[i] if i < len(colors) and colors[i] is not None else LAYOUT_COLORS[i % len(LAYOUT_COLORS)]
        framed.append(add_border(ref, color, int(math.sqrt(ref.width * ref.height) * 0.04)))
    return framed + [layout]
# --------------------------------------------------------------------------------- together


@dataclass(frozen=True)
class ReferenceInputs:
    """Everything the transformer needs from the references, prompt aside."""

    height: int  # target size (changed only by keep_original_aspect)
    width: int
    resized_refs: list  # PIL images, sides multiple of 32 (the layout image last, if any)
    condition_images: list  # PIL images read by the vision tower
    pixel_values: np.ndarray  # [L, C*T*P*P] float32
    image_grid_thw: np.ndarray  # [K, 3] int64, in 16 px patches
    ref_patches: np.ndarray  # [sum N_i, 3072] float32 in [-1, 1]
    ref_grids: list  # (rows, cols) of 32 px patches per ref
    token_counts: list  # <|image_pad|> tokens per ref


def prepare_references(
    images: Sequence[ImageLike],
    height: int,
    width: int,
    processor: ImageProcessorConfig,
    *,
    layout_boxes: Any = None,
    keep_original_aspect: bool = False,
    keep_aspect_size: int = KEEP_ASPECT_MAX_SIZE,
) -> ReferenceInputs:
    """The official pipeline's reference handling for 1..10 refs (plus an optional layout).

    With ``keep_original_aspect`` and exactly one ref, the ref is resized to about
    ``keep_aspect_size``^2 (the official 2048 by default) and the target takes its size; layout
    boxes are then ignored, as in the official pipeline.
    """
    refs = load_reference_images(images)
    if not refs:
        raise ValueError("prepare_references needs at least one reference image")
    if keep_original_aspect and len(refs) == 1:
        resized = [resize_reference(refs[0], keep_aspect_size)]
        width, height = resized[0].size
    else:
        boxes = parse_layout_boxes(layout_boxes, width, height) if layout_boxes is not None else None
        num_refs = len(refs) + (boxes is not None)
        max_size = reference_max_size(num_refs, height, width)
        if boxes is not None:
            refs = layout_reference_images(refs, boxes, width, height, max_size)
        resized = [resize_reference(ref, max_size) for ref in refs]
    conditions = [condition_image(ref, len(resized)) for ref in resized]
    pixel_values, grid = vision_inputs(conditions, processor)
    return ReferenceInputs(
        height=height,
        width=width,
        resized_refs=resized,
        condition_images=conditions,
        pixel_values=pixel_values,
        image_grid_thw=grid,
        ref_patches=reference_patches(resized),
        ref_grids=[(ref.height // PATCH_SIZE, ref.width // PATCH_SIZE) for ref in resized],
        token_counts=image_token_counts(grid, processor.merge_size),
    )
