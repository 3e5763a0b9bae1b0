"""A number for the 32 px patch grid: how much larger the steps across patch seams are than the
steps inside patches (HiDream-O1 predicts each 32x32 patch separately, which can leave faint seams
in flat regions). Any image can be measured; the eval harness records it for every image.
"""

from __future__ import annotations

import math

import numpy as np

from hidream_mlx.family import PATCH_SIDE as PATCH_SIZE


def _steps(image: np.ndarray, patch: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per axis (y then x): absolute steps across the patch seams, and all other steps."""
    x = image.astype(np.float32)
    if x.ndim == 3:
        x = x.mean(axis=2)
    out = []
    for axis in (0, 1):
        diffs = np.abs(np.diff(x, axis=axis))
        boundary = (np.arange(diffs.shape[axis]) + 1) % patch == 0
        out.append((np.compress(boundary, diffs, axis=axis).ravel(), np.compress(~boundary, diffs, axis=axis).ravel()))
    return out


def grid_energy_axes(image: np.ndarray, patch: int = PATCH_SIZE) -> dict:
    """``grid_energy`` per axis: ``y`` for the horizontal seams (steps between rows), ``x`` for
    the vertical ones; ``nan`` on an axis with no seam (the image is one patch across)."""
    names = ("y", "x")
    result = {}
    for name, (on, off) in zip(names, _steps(image, patch)):
        result[name] = float(on.mean() / max(off.mean(), 1e-6)) if on.size and off.size else math.nan
    return result


def grid_energy(image: np.ndarray, patch: int = PATCH_SIZE) -> float:
    """Mean absolute step across patch boundaries divided by the mean step inside patches.

    About 1 for an image with no grid; above 1 when the 32 px seams show. Both axes pooled;
    :func:`grid_energy_axes` splits them.
    """
    steps = _steps(image, patch)
    on = np.concatenate([s[0] for s in steps])
    off = np.concatenate([s[1] for s in steps])
    if not on.size or not off.size:
        return math.nan
    return float(on.mean() / max(off.mean(), 1e-6))


def seam_energy(image: np.ndarray, patch: int = PATCH_SIZE) -> float:
    """Absolute seam strength: mean absolute step across the seams, y and x summed (0 = none).

    Unlike the ratio it does not move when smoothing also changes the texture inside patches.
    """
    return float(sum(on.mean() for on, _ in _steps(image, patch) if on.size))
