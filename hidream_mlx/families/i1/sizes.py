"""HiDream-I1 image sizes: the official pipeline's area rule, or an exact size with ``--no-snap``.

The official ``HiDreamImagePipeline.__call__`` rescales every request to about
``(vae_scale * default_sample_size)^2`` pixels (``default_sample_size`` is hard-coded 128, so
about 1024x1024): ``scale = sqrt(area / (W*H))``, ``W = int(W*scale // d * d)`` and likewise H,
with ``d = 2 * vae_scale`` = 16. Sizes must be multiples of ``d`` (a 2x2 patch of 8x latents).
A non-square latent takes the transformer's padded path, which holds at most ``max_seq``
patches.
"""

from __future__ import annotations

import math

DEFAULT_SAMPLE_SIZE = 128  # the pipeline's constant (latent side of the target area)
DEFAULT_SIZE = 1024  # what a request without --width/--height asks for


class SizeError(ValueError):
    """A size the I1 pipeline cannot render."""


def division(vae_scale: int) -> int:
    return 2 * vae_scale


def snap_size(width: int, height: int, vae_scale: int = 8,
              default_sample_size: int = DEFAULT_SAMPLE_SIZE) -> tuple[int, int]:
    """(width, height) as the official pipeline rescales them (floats as Python computes them)."""
    d = division(vae_scale)
    target = (default_sample_size * vae_scale) ** 2
    scale = math.sqrt(target / (width * height))
    return int(width * scale // d * d), int(height * scale // d * d)


def check_size(width: int, height: int, vae_scale: int, patch_size: int, max_seq: int) -> None:
    """Refuse what the transformer cannot take: sides not multiples of 16, too many padded patches."""
    d = division(vae_scale)
    if width % d or height % d or width <= 0 or height <= 0:
        raise SizeError(f"--width/--height {width}x{height}: HiDream-I1 renders multiples of {d} "
                        f"(with --no-snap the size is used exactly)")
    ph, pw = height // vae_scale // patch_size, width // vae_scale // patch_size
    if width != height and ph * pw > max_seq:
        raise SizeError(f"--width/--height {width}x{height}: a non-square image is {ph}x{pw} = {ph * pw} patches, "
                        f"more than this transformer's max_seq {max_seq} (its max_resolution)")


def resolve_i1_size(width: int, height: int, snap: bool, vae_scale: int, patch_size: int,
                    max_seq: int) -> tuple[int, int, str]:
    """The size that will run and a one-line note saying what happened to the request."""
    if not snap:
        check_size(width, height, vae_scale, patch_size, max_seq)
        return width, height, f"{width}x{height} (exact size, not rescaled)"
    w, h = snap_size(width, height, vae_scale)
    try:
        check_size(w, h, vae_scale, patch_size, max_seq)
    except SizeError as e:
        raise SizeError(f"{e} (rescaled from {width}x{height} as the I1 pipeline does; --no-snap keeps your size)") \
            from None
    side = DEFAULT_SAMPLE_SIZE * vae_scale
    if (w, h) == (width, height):
        return w, h, f"{w}x{h} (the official {side}x{side} area)"
    return w, h, (f"{w}x{h} (rescaled from {width}x{height} to about the official {side}x{side} area, "
                  "as the I1 pipeline does; --no-snap keeps your size)")
