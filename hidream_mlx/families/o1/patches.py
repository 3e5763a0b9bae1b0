"""Between images and the model's 32x32 pixel patches.

An image [3, H, W] in [-1, 1] becomes [(H/32)*(W/32), 3072]: patches row-major, and within
a patch the value index is ``c*1024 + py*32 + px``. Works on numpy and MLX arrays alike.
"""

from __future__ import annotations

import numpy as np

from hidream_mlx.families.o1.config import PATCH_SIZE


def grid_size(height: int, width: int) -> tuple[int, int]:
    if height % PATCH_SIZE or width % PATCH_SIZE:
        raise ValueError(f"image size {width}x{height} is not a multiple of {PATCH_SIZE}")
    return height // PATCH_SIZE, width // PATCH_SIZE


def patchify(image, patch: int = PATCH_SIZE):
    """[..., C, H, W] -> [..., (H/p)*(W/p), C*p*p]."""
    *lead, c, h, w = image.shape
    gh, gw = h // patch, w // patch
    x = image.reshape(*lead, c, gh, patch, gw, patch)
    n = len(lead)
    x = x.transpose(*range(n), n + 1, n + 3, n, n + 2, n + 4)
    return x.reshape(*lead, gh * gw, c * patch * patch)


def unpatchify(patches, height: int, width: int, patch: int = PATCH_SIZE, channels: int = 3):
    """[..., N, C*p*p] -> [..., C, H, W]."""
    *lead, _, _ = patches.shape
    gh, gw = height // patch, width // patch
    x = patches.reshape(*lead, gh, gw, channels, patch, patch)
    n = len(lead)
    x = x.transpose(*range(n), n + 2, n, n + 3, n + 1, n + 4)
    return x.reshape(*lead, channels, height, width)


def to_uint8(image_chw) -> np.ndarray:
    """[3, H, W] in [-1, 1] -> uint8 HWC, rounding half to even like numpy (the reference)."""
    x = np.asarray(image_chw, dtype=np.float32)
    x = np.clip((x + 1.0) / 2.0, 0.0, 1.0) * 255.0
    return np.round(x).astype(np.uint8).transpose(1, 2, 0)


def patches_to_image(patches, height: int, width: int) -> np.ndarray:
    """[N, 3072] (or [1, N, 3072]) patches -> uint8 HWC image."""
    x = np.asarray(patches, dtype=np.float32).reshape(-1, patches.shape[-1])
    return to_uint8(unpatchify(x, height, width))
