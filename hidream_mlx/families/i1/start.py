"""HiDream-I1 from an image: the source in latent space, where sampling starts, what inpainting keeps.

The source goes through the VAE encoder once per (file, render size) (the posterior's mode, as
``AutoencoderKL.encode_uint8`` gives it) and is kept until no planned request starts from it. Both
I1 samplers step along the flow ``(1 - sigma) * x0 + sigma * noise`` with unit noise, so the
source at step ``i`` is that blend with the text-to-image run's own initial noise.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import mlx.core as mx
import numpy as np

from hidream_mlx.schedulers import Schedule, noised


def latent_mask(mask: np.ndarray, vae_scale: int) -> mx.array:
    """A [H, W] mask on the latent grid [1, 1, h, w]: each cell takes its most-repainted pixel, so
    nothing the mask repaints is held back in latent space (the final composite restores the kept
    pixels around it)."""
    h, w = mask.shape[0] // vae_scale, mask.shape[1] // vae_scale
    cells = mask[:h * vae_scale, :w * vae_scale].reshape(h, vae_scale, w, vae_scale)
    return mx.array(cells.max(axis=(1, 3)))[None, None]


def start_latents(source: mx.array, noise: mx.array, schedule: Schedule, first: int,
                  repaint: Optional[mx.array]) -> tuple[mx.array, Optional[Callable]]:
    """(the latents step ``first`` starts from, the inpainting replacement or None).

    At step 0 that is the text-to-image ``noise`` itself, so strength 1 reproduces text-to-image
    (the blend at the first sigma, which is not exactly 1, would not); later, the source brought to
    that step's noise level. With ``repaint`` (the latent mask), after step ``i`` the kept region
    becomes the source at ``sigma_{i+1}`` (clean after the last step)."""
    latents = noise if first == 0 else noised(source, noise, float(schedule.sigmas[first]))
    if repaint is None:
        return latents, None
    keep = 1.0 - repaint

    def after_step(i: int, x: mx.array) -> mx.array:
        # mask * x + keep * source, not x + keep * (source - x): exactly the source's state where kept.
        return repaint * x + keep * noised(source, noise, float(schedule.sigmas[i + 1]))

    return latents, after_step


class SourceLatents:
    """Init images as latents, encoded once and kept until no planned request starts from them."""

    def __init__(self):
        self._latents: dict[tuple, mx.array] = {}

    @staticmethod
    def key(request) -> tuple:
        return request.start.path, request.width, request.height

    def get(self, request, encode: Callable[[np.ndarray], mx.array]) -> mx.array:
        """The source's latents (float32); ``encode`` (uint8 HWC -> latents) runs on a miss."""
        key = self.key(request)
        if key not in self._latents:
            latents = encode(request.start.pixels(request.width, request.height)).astype(mx.float32)
            mx.eval(latents)
            self._latents[key] = latents
        return self._latents[key]

    def release(self, request, planned: Sequence) -> None:
        """Drop ``request``'s source once none of the ``planned`` requests starts from it."""
        key = self.key(request)
        if not any(r.start is not None and self.key(r) == key for r in planned):
            self._latents.pop(key, None)
