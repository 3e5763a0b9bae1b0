"""The 32 px patch grid: a seam-blend post-process and a metric that measures the grid.

HiDream-O1 predicts each 32x32 patch separately, which can leave faint seams in flat regions.
``blend_seams`` softens them after sampling; ``grid_energy`` puts a number on them.
"""

from __future__ import annotations

import numpy as np

from hidream_mlx.models.o1.config import PATCH_SIZE


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


def grid_energy(image: np.ndarray, patch: int = PATCH_SIZE) -> float:
    """Mean absolute step across patch boundaries divided by the mean step inside patches.

    About 1 for an image with no grid; above 1 when the 32 px seams show.
    """
    x = image.astype(np.float32)
    if x.ndim == 3:
        x = x.mean(axis=2)
    on, off = [], []
    for axis in (0, 1):
        diffs = np.abs(np.diff(x, axis=axis))
        idx = np.arange(diffs.shape[axis])
        boundary = (idx + 1) % patch == 0
        on.append(np.compress(boundary, diffs, axis=axis).ravel())
        off.append(np.compress(~boundary, diffs, axis=axis).ravel())
    on_mean, off_mean = np.concatenate(on).mean(), np.concatenate(off).mean()
    return float(on_mean / max(off_mean, 1e-6))
