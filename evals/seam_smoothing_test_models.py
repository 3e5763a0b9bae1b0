"""Seam smoothing on the test models: the grid metric before and after, as in the README.

Runs the ``o1-tiny`` fixture as is and with a "flat head" (its pixel head changed so every patch
comes out one flat colour per channel: the worst possible grid), without and with
``--seam-smoothing`` settings, and prints a markdown table. ``roll`` is the border handling of the
published variants (wrap-around roll, the one-patch border strip keeps the plain prediction with a
4 px feather), rebuilt here only to compare against mirror padding.

    python evals/seam_smoothing_test_models.py [--model tests/fixtures/o1-tiny] [--size 320x256]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from hidream_mlx.families.o1 import sampling as pipeline
from hidream_mlx.families.o1.engine import Engine, Request
from hidream_mlx.families.o1.config import PATCH_SIZE
from hidream_mlx.families.o1.patches import patchify, unpatchify
from hidream_mlx.families.o1.recipes import get_recipe
from hidream_mlx.families.o1.seam_smoothing import ShiftedPass
from hidream_mlx.harness.grid import grid_energy_axes, seam_energy

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "o1-tiny"
SETTINGS = [(0, "hann", "pad"), (0.25, "hann", "pad"), (0.5, "mean", "pad"), (0.5, "hann", "pad"),
            (0.5, "hann", "roll"), (0.5, "mean", "roll"), (1.0, "hann", "pad")]


def flatten_head(model) -> None:
    """Every pixel of a channel takes the head row of that channel's first pixel."""
    head, per_pixel = model.final_layer2.linear, PATCH_SIZE * PATCH_SIZE
    w, b = np.array(head.weight), np.array(head.bias)
    head.weight = mx.array(np.repeat(w.reshape(3, per_pixel, -1)[:, :1], per_pixel, axis=1).reshape(w.shape))
    head.bias = mx.array(np.repeat(b.reshape(3, per_pixel)[:, :1], per_pixel, axis=1).reshape(-1))


class RollPass(ShiftedPass):
    def __init__(self, settings, grid, patch: int = PATCH_SIZE):
        super().__init__(settings, grid, patch)
        h, w = self.height, self.width
        ys, xs = np.minimum(np.arange(h), h - 1 - np.arange(h)), np.minimum(np.arange(w), w - 1 - np.arange(w))
        ramp = np.clip((ys - patch) / 4, 0, 1)[:, None] * np.clip((xs - patch) / 4, 0, 1)[None]
        self.edge = patchify(mx.array(np.broadcast_to(ramp, (3, h, w)).astype(np.float32)))

    def _roll(self, patches, by: int):
        image = unpatchify(patches, self.height, self.width)
        return patchify(mx.roll(mx.roll(image, by, axis=-2), by, axis=-1))

    def shift(self, z):
        return self._roll(z, self.half)

    def unshift(self, patches):
        return self._roll(patches, -self.half)

    def mix(self, plain, shifted):
        return plain + self.weight * self.edge * (shifted - plain)


def run(engine, recipe, size, fraction, window, border):
    width, height = size
    saved = pipeline.ShiftedPass, pipeline.shifted_conditioning
    if border == "roll":  # same grid, same positions: only the content moves
        pipeline.ShiftedPass = RollPass
        pipeline.shifted_conditioning = lambda model, cond, n: (cond, (height // PATCH_SIZE, width // PATCH_SIZE))
    try:
        start = time.perf_counter()
        result = engine.run(Request("a quiet lake at dawn", width, height, 3, recipe,
                                    seam_smoothing=fraction, seam_window=window))
        return result, time.perf_counter() - start
    finally:
        pipeline.ShiftedPass, pipeline.shifted_conditioning = saved


def interiors(height: int, width: int, margin: int = 8) -> np.ndarray:
    def axis(n):
        p = np.arange(n) % PATCH_SIZE
        return (p >= margin) & (p < PATCH_SIZE - margin)

    return axis(height)[:, None] & axis(width)[None, :]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(FIXTURE))
    parser.add_argument("--size", default="320x256")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.lower().split("x"))
    print("| model | recipe | F | window | border | seam energy | grid y / x | interior change | extra passes | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in ("flat head", "flat head, decoder 6-bit", "as is"):
        engine = Engine.load(args.model, dtype="float32")
        if name.startswith("flat"):
            flatten_head(engine.model)
        if "6-bit" in name:
            nn.quantize(engine.model.language_model, group_size=64, bits=6)
        for recipe_name in ("full", "dev"):
            recipe = get_recipe(recipe_name).with_overrides(steps=args.steps)
            plain = None
            for fraction, window, border in SETTINGS:
                result, seconds = run(engine, recipe, size, fraction, window, border)
                plain = result.image if plain is None else plain
                grid = grid_energy_axes(result.image)
                change = np.abs(result.image.astype(float) - plain)[interiors(size[1], size[0])].mean()
                print(f"| {name} | {recipe_name} | {fraction:g} | {window} | {border} | {seam_energy(result.image):.1f} "
                      f"| {grid['y']:.3g} / {grid['x']:.3g} | {change:.1f} | {result.request.seam_passes} "
                      f"| {seconds:.2f} |", flush=True)


if __name__ == "__main__":
    main()
