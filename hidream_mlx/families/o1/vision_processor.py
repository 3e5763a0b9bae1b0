"""The Qwen3-VL image processor: a conditioning image -> ``pixel_values`` and its grid.

Resize to multiples of patch*merge within the pixel budget (``smart_resize``), rescale and
normalize with the checkpoint's mean/std, repeat in time to the temporal patch size, and
flatten patches in the order the vision tower's spatial merge expects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np
from PIL import Image

from hidream_mlx.files import read_json_file


@dataclass(frozen=True)
class ImageProcessorConfig:
    """The fields of ``preprocessor_config.json`` (Qwen2VLImageProcessor) that matter here."""

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 65536
    max_pixels: int = 16777216
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    resample: int = 3

    @classmethod
    def from_dict(cls, data: dict) -> "ImageProcessorConfig":
        size = data.get("size") or {}
        defaults = cls()
        return cls(
            patch_size=int(data.get("patch_size", defaults.patch_size)),
            temporal_patch_size=int(data.get("temporal_patch_size", defaults.temporal_patch_size)),
            merge_size=int(data.get("merge_size", defaults.merge_size)),
            # Explicit min/max_pixels override `size`, as in transformers.
            min_pixels=int(data.get("min_pixels") or size.get("shortest_edge") or defaults.min_pixels),
            max_pixels=int(data.get("max_pixels") or size.get("longest_edge") or defaults.max_pixels),
            image_mean=tuple(float(v) for v in data.get("image_mean", defaults.image_mean)),
            image_std=tuple(float(v) for v in data.get("image_std", defaults.image_std)),
            rescale_factor=float(data.get("rescale_factor", defaults.rescale_factor)),
            resample=int(data.get("resample", defaults.resample)),
        )

    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "ImageProcessorConfig":
        data = read_json_file(path, "image processor config")
        if not isinstance(data, dict):
            raise ValueError(f"{path}: image processor config is not a JSON object")
        return cls.from_dict(data)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) nearest to the input with sides multiple of factor and area in bounds."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image {width}x{height}: aspect ratio must be below 200")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def image_to_vision_patches(image: Image.Image, config: ImageProcessorConfig) -> tuple[np.ndarray, np.ndarray]:
    """One RGB image -> (rows [grid_h*grid_w, C*T*P*P] in merge order, grid (1, grid_h, grid_w))."""
    p, m, t = config.patch_size, config.merge_size, config.temporal_patch_size
    height, width = smart_resize(image.height, image.width, p * m, config.min_pixels, config.max_pixels)
    if (width, height) != image.size:
        image = image.resize((width, height), resample=Image.Resampling(config.resample))
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64) * config.rescale_factor
    mean = np.asarray(config.image_mean, dtype=np.float32)
    std = np.asarray(config.image_std, dtype=np.float32)
    x = ((pixels.astype(np.float32) - mean) / std).transpose(2, 0, 1)
    channels = x.shape[0]
    gh, gw = height // p, width // p
    x = x.reshape(channels, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
    # A still image is its own temporal_patch_size frames.
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))
    return x.reshape(gh * gw, channels * t * p * p), np.array([1, gh, gw], dtype=np.int64)


def vision_inputs(images: Sequence[Image.Image], config: ImageProcessorConfig) -> tuple[np.ndarray, np.ndarray]:
    """Conditioning images -> (pixel_values [L, C*T*P*P] float32, image_grid_thw [n, 3] int64)."""
    rows, grids = zip(*(image_to_vision_patches(image, config) for image in images))
    return np.concatenate(rows).astype(np.float32), np.stack(grids)


def image_token_counts(image_grid_thw: np.ndarray, merge_size: int) -> list[int]:
    """How many ``<|image_pad|>`` tokens stand for each conditioning image in the prompt."""
    grid = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
    return (grid.prod(axis=1) // merge_size**2).tolist()
