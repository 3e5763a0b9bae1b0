"""Timing denoising steps the same way for every family's ``bench``: one ``mx.eval`` per step,
variants taken turn about so machine load falls on all alike, and every median printed with the
min and max of the same samples (these machines are noisy; a median alone hides it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import numpy as np

from hidream_mlx.memory import PeakRss

# (latent, t, sigma) -> the velocity a flow-match Euler step takes.
Velocity = Callable[[mx.array, float, float], mx.array]


@dataclass
class VariantResult:
    name: str
    step_times: list[float]  # every timed step of every repeat
    run_medians: list[float]  # median s/step of each repeat

    @property
    def seconds_per_step(self) -> float:
        """The median over repeats of each repeat's median s/step."""
        return float(np.median(self.run_medians))


@dataclass(frozen=True)
class MemoryReading:
    peak_rss: int  # polled
    ru_maxrss: int
    mlx_peak: int


def time_steps(velocity: Velocity, z0: mx.array, steps: int) -> list[float]:
    """Flow-match Euler from sigma 1 to 0; one ``mx.eval`` per step, timed."""
    sigmas = np.linspace(1.0, 0.0, steps + 1)
    z, times = z0, []
    for i in range(steps):
        sigma = float(sigmas[i])
        start = time.perf_counter()
        z = z + (sigma - float(sigmas[i + 1])) * velocity(z, 1.0 - sigma, sigma)
        mx.eval(z)
        times.append(time.perf_counter() - start)
    return times


def measure(variants: dict[str, Velocity], z0: mx.array, cfg,
            log: Callable[[str], None]) -> tuple[list[VariantResult], "MemoryReading"]:
    """Time every variant, ``cfg.repeats`` runs of ``cfg.steps`` steps each, taken round-robin.

    Interleaving spreads any load from other processes over all variants alike, so their
    ratios stay fair. The first variant's warm-up and first run happen alone, under the RSS
    monitor, before any other variant has allocated anything: its memory figures are clean.
    Returns the results and the memory reading taken right after that first run.
    """
    results = {name: VariantResult(name, [], []) for name in variants}

    def run(name: str, r: int) -> None:
        times = time_steps(variants[name], z0, cfg.steps)
        results[name].step_times += times
        results[name].run_medians.append(float(np.median(times)))
        log(f"  {name} run {r + 1}/{cfg.repeats}: " + ", ".join(f"{t:.3f}" for t in times) + " s")

    first, *others = variants
    mx.reset_peak_memory()
    rss = PeakRss(interval=0.002)
    with rss.measure():
        time_steps(variants[first], z0, 1)  # warm-up: first-call allocations and kernel setup
        run(first, 0)
    memory = MemoryReading(rss.peak, rss.process_max, mx.get_peak_memory())
    for name in others:
        time_steps(variants[name], z0, 1)
    for r in range(cfg.repeats):
        for name in variants:
            if r > 0 or name != first:
                run(name, r)
    mx.clear_cache()
    return list(results.values()), memory


def spread(samples, unit: str, scale: float = 1.0, digits: int = 3) -> str:
    """``<median> <unit> (min <a> / max <b>)``: a median with the range of the same samples
    (in units of ``scale`` seconds); these machines are noisy, a median alone hides it."""
    f = lambda s: f"{s / scale:.{digits}f}"  # noqa: E731
    return f"{f(float(np.median(samples)))} {unit} (min {f(min(samples))} / max {f(max(samples))})"
