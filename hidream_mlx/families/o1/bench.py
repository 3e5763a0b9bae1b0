"""``bench`` for HiDream-O1: the denoising step on random weights of the real architecture (nothing downloaded).

``run_bench`` builds a random model of the chosen dims, encodes a synthetic prompt of
``prompt_tokens`` tokens once, then times denoising steps (after one warm-up step) with
``mx.eval`` + ``perf_counter`` per step, for up to three variants measured in one process:

* ``cached``: the path generation uses (prefix cache; CFG in the default mode);
* ``cfg-<other mode>`` (``compare_cfg``, with guidance > 1): the other CFG mode, batched vs sequential;
* ``naive`` (``compare_naive``): the uncached full-sequence ``model.forward`` every step.

Every variant runs the same flow-match Euler loop from the same latent, so the ratios compare
the model cost alone. Memory is measured for the cached variant, which runs first: the peak of
the process RSS (polled by a thread, and ``ru_maxrss``) and MLX's own peak.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import mlx.core as mx
import numpy as np
import psutil

from hidream_mlx.families.o1 import sampling as pipeline
from hidream_mlx.memory import format_bytes, parameter_bytes, parameter_count
from hidream_mlx.families.o1.memory import predict_peak_bytes
from hidream_mlx.families.o1.patches import grid_size
from hidream_mlx.families.o1.sampling import Conditioning, encode_prompt_state
from hidream_mlx.families.o1.positions import t2i_positions
from hidream_mlx.family import uses_cfg
from hidream_mlx.families.o1.requests import check_free_size
from hidream_mlx.weights.precision import check_precision, parse_dtype
from hidream_mlx.quant.quantization import quantize_in_memory
from hidream_mlx.quant.recipes import SUPPORTED_BITS
from hidream_mlx.families.o1.synthetic import random_model, synthetic_prompt_ids
from hidream_mlx.timing import Velocity, VariantResult, measure, spread

UNCOND_TOKENS = 13  # the chat template around the unconditional prompt " "


@dataclass(frozen=True)
class BenchConfig:
    dims: str = "mid"
    layers: Optional[int] = None
    quantize: Optional[int] = None
    size: int = 512
    steps: int = 3
    guidance: float = 1.0
    prompt_tokens: int = 100
    repeats: int = 3
    dtype: str = "float32"
    compare_naive: bool = False
    compare_cfg: bool = False

    def check(self) -> None:
        check_free_size(self.size, self.size, "--size")  # before anything is allocated: 8192 px segfaulted
        if self.steps < 1 or self.repeats < 1:
            raise ValueError("--steps and --repeats must be at least 1")
        if self.prompt_tokens < 3:
            raise ValueError(f"--prompt-tokens must be at least 3 (text, boi, tms), got {self.prompt_tokens}")
        check_precision(self.dtype)
        if self.quantize is not None and self.quantize not in SUPPORTED_BITS:
            raise ValueError(f"--quantize takes one of {SUPPORTED_BITS}, got {self.quantize}")
        if self.compare_cfg and not uses_cfg(self.guidance):
            raise ValueError("--compare-cfg needs --guidance > 1 (there is no unconditional pass otherwise)")


@dataclass
class BenchResult:
    config: BenchConfig
    parameters: int
    weight_bytes: int
    baseline_rss: int
    peak_rss: int  # polled during the cached variant
    ru_maxrss: int  # the process's high-water mark after the cached variant
    mlx_peak: int
    predicted_peak: int
    text_tokens: int
    generation_tokens: int  # per pass: tms + patches
    patches: int
    variants: list[VariantResult] = field(default_factory=list)

    @property
    def working_set(self) -> int:
        return max(self.peak_rss, self.ru_maxrss) - self.weight_bytes - self.baseline_rss

    def variant(self, name: str) -> Optional[VariantResult]:
        return next((v for v in self.variants if v.name == name), None)


def cached_velocity(model, cond: Conditioning, guidance: float, batched: Optional[bool] = None) -> Velocity:
    return lambda z, t_model, sigma: pipeline.velocity(model, cond, z, t_model, sigma, guidance, batched=batched)


def naive_velocity(model, prompts: list[np.ndarray], grid: tuple[int, int], guidance: float) -> Velocity:
    """The whole sequence through ``model.forward`` at every step: no prefix cache."""
    inputs = [(mx.array(ids[None]), t2i_positions(len(ids), *grid)) for ids in prompts]

    def velocity(z, t_model, sigma):
        t = mx.array([t_model], dtype=mx.float32)
        v = [(model.forward(ids, pos, t, z) - z) / sigma for ids, pos in inputs]
        return v[0] if len(v) == 1 else v[1] + guidance * (v[0] - v[1])

    return velocity


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = lambda _: None) -> BenchResult:
    cfg.check()
    process = psutil.Process()
    mx.clear_cache()
    baseline = process.memory_info().rss

    model = random_model(cfg.dims, cfg.layers, parse_dtype(cfg.dtype))
    if cfg.quantize is not None:
        quantize_in_memory(model, cfg.quantize)
        mx.eval(model.parameters())
    weight_bytes = parameter_bytes(model)
    mx.clear_cache()

    grid = grid_size(cfg.size, cfg.size)
    use_cfg = uses_cfg(cfg.guidance)
    prompts = [synthetic_prompt_ids(cfg.prompt_tokens)]
    if use_cfg:
        prompts.append(synthetic_prompt_ids(UNCOND_TOKENS, seed=1))
    states = [encode_prompt_state(model, ids, grid) for ids in prompts]
    cond = Conditioning(*states)
    mx.eval(cond.arrays)
    mx.clear_cache()  # the prompt phase is over: return its temporaries before sampling
    z0 = mx.random.normal((1, grid[0] * grid[1], 3 * 32 * 32), key=mx.random.key(1))
    mx.eval(z0)

    variants = {"cached": cached_velocity(model, cond, cfg.guidance)}
    if cfg.compare_cfg:
        other = not pipeline.BATCHED_CFG
        variants["cfg-batched" if other else "cfg-sequential"] = cached_velocity(model, cond, cfg.guidance, other)
    if cfg.compare_naive:
        variants["naive"] = naive_velocity(model, prompts, grid, cfg.guidance)
    results, memory = measure(variants, z0, cfg, log)

    text_cfg = model.config.text
    dtype_bytes = parse_dtype(cfg.dtype).size
    predicted = predict_peak_bytes(weight_bytes, text_cfg, cfg.size, cfg.size, use_cfg,
                                   text_tokens=cfg.prompt_tokens, dtype_bytes=dtype_bytes)
    return BenchResult(cfg, parameter_count(model), weight_bytes, baseline, memory.peak_rss,
                       memory.ru_maxrss, memory.mlx_peak, predicted, cfg.prompt_tokens, grid[0] * grid[1] + 1, grid[0] * grid[1],
                       results)


def token_ratio(result: BenchResult) -> float:
    """Tokens run per pass, cached over naive: (N + 1) / (T + N)."""
    return result.generation_tokens / (result.text_tokens + result.patches)


def report_lines(result: BenchResult) -> list[str]:
    """The human summary; the cached/naive ratio, when measured, is the last line."""
    c = result.config
    layers = c.layers if c.layers is not None else "all"
    quant = f", Q{c.quantize}" if c.quantize else ""
    passes = 2 if uses_cfg(c.guidance) else 1
    mode = ("batched" if pipeline.BATCHED_CFG else "sequential") + " CFG" if passes == 2 else "no CFG"
    cached = result.variant("cached")
    lines = [
        f"model: random {c.dims} ({layers} layers), {c.dtype}{quant}: {result.parameters:,} parameters, "
        f"weights {format_bytes(result.weight_bytes)}",
        f"request: {c.size}x{c.size}, {c.steps} steps x {c.repeats} runs (+1 warm-up), guidance {c.guidance:g} "
        f"({mode})",
        f"tokens: text {result.text_tokens}" + (f" (+{UNCOND_TOKENS} uncond)" if passes == 2 else "")
        + f", generation {result.generation_tokens} per pass, {passes * result.generation_tokens} per step",
        f"cached: {spread(cached.run_medians, 's/step')} over {c.repeats} run medians",
        f"memory: peak RSS {format_bytes(result.peak_rss)} (ru_maxrss {format_bytes(result.ru_maxrss)}), "
        f"MLX peak {format_bytes(result.mlx_peak)}, baseline RSS {format_bytes(result.baseline_rss)}",
        f"working set: {format_bytes(result.working_set)} (peak RSS - weights - baseline); "
        f"predicted peak {format_bytes(result.predicted_peak)} vs measured "
        f"{format_bytes(max(result.peak_rss, result.ru_maxrss))} "
        f"({_percent(result.predicted_peak, max(result.peak_rss, result.ru_maxrss))})",
    ]
    for name in ("cfg-batched", "cfg-sequential"):
        other = result.variant(name)
        if other is not None:
            lines.append(f"{name}: {spread(other.run_medians, 's/step')}; default/{name.split('-')[1]} = "
                         f"{cached.seconds_per_step / other.seconds_per_step:.3f}")
    naive = result.variant("naive")
    if naive is not None:
        lines.append(f"naive: {spread(naive.run_medians, 's/step')}, full sequence {result.text_tokens + result.patches}"
                     " tokens per pass")
        lines.append(f"ratio cached/naive: {cached.seconds_per_step / naive.seconds_per_step:.3f} "
                     f"(token ratio (N+1)/(T+N) = {result.generation_tokens}/"
                     f"{result.text_tokens + result.patches} = {token_ratio(result):.3f})")
    return lines


def _percent(predicted: int, measured: int) -> str:
    return f"{100.0 * (predicted - measured) / measured:+.1f}%"
