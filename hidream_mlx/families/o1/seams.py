"""The 32 px patch grid: a seam-blend post-process.

HiDream-O1 predicts each 32x32 patch separately, which can leave faint seams in flat regions.
``blend_seams`` softens them after sampling (``harness/grid.py`` puts a number on them).
"""

from __future__ import annotations

import numpy as np

from hidream_mlx.families.o1.config import PATCH_SIZE


def blend_seams(image: np.ndarray, radius: int, patch: int = PATCH_SIZE, strength: float = 0.5) -> np.ndarray:
    """Average a band of ``radius`` pixels each side of every patch boundary, then mix
    ``strength`` of that average back into the band. uint8 HWC in, uint8 HWC out."""
    if radius <= 0:
        return image
    if radius > patch // 2:
        raise ValueError(f"--blend-seams radius must be between 1 and {patch // 2}, got {radius}")
    x = image.astype(np.float32)
    for axis in (0, 1):  # horizontal boundaries (rows), then vertical ones (columns)
        moved = np.moveaxis(x, axis, 0)
        for edge in range(patch, moved.shape[0], patch):
            band = moved[edge - radius: edge + radius]
            mean = band.mean(axis=0, keepdims=True)
            moved[edge - radius: edge + radius] = (1 - strength) * band + strength * mean
    return np.clip(np.round(x), 0, 255).astype(np.uint8)
