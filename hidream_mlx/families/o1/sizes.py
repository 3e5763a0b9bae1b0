"""Output sizes: the official ~4 MP buckets, or validated free sizes.

The official pipeline silently snaps every request to the bucket with the closest aspect
ratio (so 1024x1024 renders 2048x2048). We keep that as the default and also allow true free
sizes (``--no-snap``); :func:`resolve_size` says which one ran.
"""

from __future__ import annotations

from hidream_mlx.families.o1.config import PATCH_SIZE

# (width, height), in the reference's order: on an aspect-ratio tie the earlier one wins.
OFFICIAL_BUCKETS: tuple[tuple[int, int], ...] = (
    (2048, 2048),
    (2304, 1728),
    (1728, 2304),
    (2560, 1440),
    (1440, 2560),
    (2496, 1664),
    (1664, 2496),
    (3104, 1312),
    (1312, 3104),
    (2304, 1792),
    (1792, 2304),
)

# Free sizes: sides are whole 32 px patches, at least 256 px, and the area at most 4.3 MP
# (4,300,000 px: every official bucket fits, the largest being 2048x2048 = 4,194,304 px;
# the model was trained around 4 MP and larger grids leave its positional range).
FREE_SIZE_MULTIPLE = PATCH_SIZE
MIN_SIDE = 256
MAX_PIXELS = 4_300_000


def find_closest_resolution(width: int, height: int) -> tuple[int, int]:
    """The official bucket whose width/height ratio is closest to the request's."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    ratio = width / height
    # min() keeps the first of equal keys, like the reference's strict '<' scan.
    return min(OFFICIAL_BUCKETS, key=lambda wh: abs(wh[0] / wh[1] - ratio))


def validate_free_size(width: int, height: int) -> None:
    """Raise ValueError, naming the bad value, unless ``width`` x ``height`` can run unsnapped."""
    for name, side in (("width", width), ("height", height)):
        if side % FREE_SIZE_MULTIPLE:
            raise ValueError(f"{name} {side} is not a multiple of {FREE_SIZE_MULTIPLE}")
        if side < MIN_SIDE:
            raise ValueError(f"{name} {side} is below the minimum of {MIN_SIDE}")
    if width * height > MAX_PIXELS:
        raise ValueError(
            f"size {width}x{height} is {width * height:,} px, above the maximum of {MAX_PIXELS:,} px"
        )


def resolve_size(width: int, height: int, snap: bool) -> tuple[int, int, str]:
    """The size that will run, and a one-line note saying what it is.

    ``snap=True`` follows the official pipeline (closest-aspect bucket); ``snap=False`` runs
    the request as is after :func:`validate_free_size`.
    """
    if not snap:
        validate_free_size(width, height)
        return width, height, f"{width}x{height} (free size, not snapped)"
    w, h = find_closest_resolution(width, height)
    if (w, h) == (width, height):
        return w, h, f"{w}x{h} (official bucket)"
    return w, h, f"{w}x{h} (official bucket, snapped from {width}x{height}; --no-snap keeps your size)"
