"""In-sampler seam smoothing: a second model pass on the grid shifted by half a patch.

HiDream-O1 predicts every 32x32 patch on its own, so its x0 prediction can jump at the patch
edges. In the last ``fraction`` of the steps the sampler also runs the model on the noisy image
shifted by half a patch (16 px down and right), shifts that prediction back and mixes the two
per pixel, leaning on whichever pass has the pixel farther from its own patch edge. The
scheduler then continues from the mixed prediction, so later steps build on a seamless image.

Border handling: the shifted pass runs on the image padded by half a patch on each side
(mirror padding), i.e. on a grid of one more patch row and column, and its prediction is
cropped back. Unlike a wrap-around roll (ComfyUI, mdream), which must keep the unshifted
prediction in a one-patch strip along each border because the rolled patches there mix
opposite edges, every seam of the image is treated. The shifted tokens take the positions of
a grid that starts at the same place as the target grid (shifted patch (r, c) is centred half
a patch before target patch (r, c), the convention of a roll). The text prefix cache is
shared; editing references stay unshifted after the targets with their own positions.

Windows: ``mean`` weighs both passes 1/2 everywhere; ``hann`` gives each pass the separable
weight cos^2(pi*d/32) per axis, d the pixel's distance from its patch centre, normalised over
the two passes, so at a seam of one pass the other one carries the pixel.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import numpy as np

from hidream_mlx.families.o1.config import PATCH_SIZE
from hidream_mlx.families.o1.patches import patchify, unpatchify

WINDOWS = ("hann", "mean")
DEFAULT_WINDOW = "hann"


class SeamSmoothingError(ValueError):
    """Settings for seam smoothing that cannot run."""


@dataclass(frozen=True)
class SeamSmoothing:
    fraction: float = 0.0  # of the final steps that get the shifted pass; 0 = off
    window: str = DEFAULT_WINDOW
    strength: float = 1.0  # 0 keeps the plain pass, 1 the full window mix

    def __post_init__(self):
        check_settings(self.fraction, self.window, self.strength)

    @property
    def enabled(self) -> bool:
        return self.fraction > 0 and self.strength > 0

    def first_step(self, total: int) -> int:
        """Index of the first smoothed step: the last ceil(fraction*total) steps are smoothed."""
        return total - smoothed_steps(total, self.fraction) if self.enabled else total

    def describe(self) -> dict:
        return dataclasses.asdict(self)


def check_settings(fraction: float, window: str, strength: float) -> None:
    """Refuse settings outside their ranges (one clear message, named like the CLI options)."""
    for name, value in (("seam_smoothing", fraction), ("seam_window", window), ("seam_strength", strength)):
        check_setting(name, value)


def check_setting(name: str, value) -> None:
    """One setting by its request field name: the two numbers in [0, 1], the window by name."""
    option = "--" + name.replace("_", "-")
    if name == "seam_window":
        if value not in WINDOWS:
            raise SeamSmoothingError(f"{option} must be one of {', '.join(WINDOWS)}, got {value!r}")
    elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0.0 <= value <= 1.0:
        raise SeamSmoothingError(f"{option} must be between 0 and 1, got {value}")


def smoothed_steps(total: int, fraction: float) -> int:
    # The small slack keeps 0.5 of 28 at 14 despite float rounding.
    return min(total, math.ceil(fraction * total - 1e-9)) if fraction > 0 else 0


def extra_passes(settings: Optional[SeamSmoothing], total_steps: int, uses_cfg: bool) -> int:
    """Extra transformer passes per image (each on one patch row and column more)."""
    if settings is None or not settings.enabled:
        return 0
    return smoothed_steps(total_steps, settings.fraction) * (2 if uses_cfg else 1)


def _hann_axis(patch: int) -> np.ndarray:
    """cos^2 of the distance of each pixel centre from the patch centre: ~1 in the middle, ~0 at edges."""
    d = np.arange(patch, dtype=np.float64) - (patch - 1) / 2
    return np.cos(np.pi * d / patch) ** 2


def shifted_weight(window: str, strength: float, patch: int = PATCH_SIZE, channels: int = 3) -> mx.array:
    """Weight of the shifted pass for every value of a patch, [C*p*p] in patch layout.

    The same for every patch, since both grids repeat every ``patch`` pixels.
    """
    if window == "mean":
        tile = np.full((patch, patch), 0.5)
    else:
        h = _hann_axis(patch)
        own = h[:, None] * h[None, :]
        # The shifted pass's patch centre lies on this grid's patch corner.
        g = np.roll(h, patch // 2)
        other = g[:, None] * g[None, :]
        tile = other / (own + other)
    tile = np.broadcast_to(tile * strength, (channels, patch, patch))
    return mx.array(tile.reshape(-1).astype(np.float32))


def shifted_grid_positions(positions: np.ndarray, num_target: int) -> tuple[np.ndarray, int, int]:
    """Generation positions [3, 1 + N + R] -> those of the shifted pass [3, 1 + (gh+1)(gw+1) + R].

    Reads the grid from the target positions (row-major, rows on axis 1, columns on axis 2) and
    returns it too. The tms and reference columns are kept as they are.
    """
    positions = np.asarray(positions)
    target = positions[:, 1:1 + num_target]
    rows, cols = target[1] - target[1, 0], target[2] - target[2, 0]
    gh, gw = int(rows.max()) + 1, int(cols.max()) + 1
    expect_r, expect_c = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    if gh * gw != num_target or not (np.array_equal(rows, expect_r.ravel()) and np.array_equal(cols, expect_c.ravel())
                                     and np.all(target[0] == target[0, 0])):
        raise SeamSmoothingError("seam smoothing needs the target patches on one row-major grid")
    r, c = np.meshgrid(np.arange(gh + 1), np.arange(gw + 1), indexing="ij")
    grid = np.stack([np.full(r.size, target[0, 0]), target[1, 0] + r.ravel(), target[2, 0] + c.ravel()])
    shifted = np.concatenate([positions[:, :1], grid.astype(positions.dtype), positions[:, 1 + num_target:]], axis=1)
    return shifted, gh, gw


def _mirror_index(size: int, pad: int) -> mx.array:
    # Mirror without repeating the edge pixel (numpy's "reflect").
    idx = np.arange(-pad, size + pad)
    idx = np.abs(idx)
    idx = np.where(idx >= size, 2 * (size - 1) - idx, idx)
    return mx.array(idx.astype(np.int32))


class ShiftedPass:
    """Pads, patchifies, crops and mixes for one image size (all index work done once)."""

    def __init__(self, settings: SeamSmoothing, grid: tuple[int, int], patch: int = PATCH_SIZE):
        self.settings = settings
        self.patch = patch
        self.half = patch // 2
        self.height, self.width = grid[0] * patch, grid[1] * patch
        self.rows = _mirror_index(self.height, self.half)
        self.cols = _mirror_index(self.width, self.half)
        self.weight = shifted_weight(settings.window, settings.strength, patch)

    def shift(self, z: mx.array) -> mx.array:
        """Noisy patches [B, N, 3072] -> the padded image's patches [B, (gh+1)(gw+1), 3072]."""
        image = unpatchify(z, self.height, self.width, self.patch)
        padded = mx.take(mx.take(image, self.rows, axis=-2), self.cols, axis=-1)
        return patchify(padded, self.patch)

    def unshift(self, patches: mx.array) -> mx.array:
        """The padded image's patches -> patches of the image, cropped back to the target grid."""
        h, w, half = self.height, self.width, self.half
        image = unpatchify(patches, h + self.patch, w + self.patch, self.patch)
        return patchify(image[..., half:half + h, half:half + w], self.patch)

    def mix(self, plain: mx.array, shifted: mx.array) -> mx.array:
        """plain + w * (shifted - plain): exactly ``plain`` wherever the two passes agree."""
        return plain + self.weight * (shifted - plain)
