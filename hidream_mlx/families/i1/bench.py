"""``bench --family i1``: HiDream-I1 denoising steps and its routed layer on random weights.

``run_bench_i1`` builds a random I1 transformer at scaled-down dims (``families.i1.synthetic``),
then measures in one process:

* ``step``: flow-match Euler steps through the transformer at the request's size (the batch
  ``[uncond, cond]`` with guidance > 1), timed as the O1 bench times them (``timing.measure``:
  one warm-up step, ``repeats`` runs of ``steps`` steps, memory during the first run);
* ``moe`` / ``dense``: one routed layer of that model (its first single block's: every token of
  the sequence is routed there) against a dense SwiGLU as wide as the layer's active part
  (``top_k`` experts plus the shared one, quantized alike with ``-q``), on the same random input
  of one step's tokens, taken turn about so machine load falls on both alike.

Every time is a median with the min and max of the same samples beside it (``timing.spread``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from hidream_mlx.families.i1.sampling import guided_prediction
from hidream_mlx.families.i1.sizes import DEFAULT_SIZE
from hidream_mlx.families.i1.synthetic import dense_twin, random_transformer, synthetic_request
from hidream_mlx.families.i1.transformer import default_widths
from hidream_mlx.family import uses_cfg
from hidream_mlx.memory import format_bytes, parameter_bytes, parameter_count
from hidream_mlx.quant.plans import I1_LAYERS
from hidream_mlx.quant.quantization import quantize_in_memory
from hidream_mlx.quant.recipes import DEFAULT_GROUP_SIZE, MODE, SUPPORTED_BITS
from hidream_mlx.timing import VariantResult, measure, spread
from hidream_mlx.weights.precision import PRECISIONS, parse_dtype


@dataclass(frozen=True)
class I1BenchConfig:
    dims: str = "mid"
    quantize: Optional[int] = None
    size: int = DEFAULT_SIZE
    steps: int = 3
    guidance: float = 1.0
    repeats: int = 3
    dtype: str = "float32"

    @property
    def layer_runs(self) -> int:
        """Timed calls of each layer: five per repeat (a call is short, the machine noisy)."""
        return 5 * self.repeats

    def check(self) -> None:
        if self.steps < 1 or self.repeats < 1:
            raise ValueError("--steps and --repeats must be at least 1")
        if self.dtype not in PRECISIONS or self.dtype == "mixed":
            raise ValueError(f"--dtype {self.dtype}: HiDream-I1 runs bfloat16 or float32")
        if self.quantize is not None and self.quantize not in SUPPORTED_BITS:
            raise ValueError(f"--quantize takes one of {SUPPORTED_BITS}, got {self.quantize}")


@dataclass
class I1BenchResult:
    config: I1BenchConfig
    parameters: int
    weight_bytes: int
    image_tokens: int
    text_tokens: int
    batch: int
    step: VariantResult
    peak_rss: int
    mlx_peak: int
    moe: tuple[float, ...]  # seconds per call, every run
    dense: tuple[float, ...]
    active_widths: tuple[int, int, int]  # (top_k, routed expert, shared expert)


def _velocity(model, req, guidance: float):
    batched = uses_cfg(guidance)

    def velocity(z, t_model, sigma):
        x = mx.concatenate([z, z], axis=0) if batched else z
        t = mx.full((x.shape[0],), 1000.0 * t_model, dtype=mx.float32)
        out = model(x, t, req.cond.t5, req.cond.llama_stack, req.cond.pooled)
        return guided_prediction(out, guidance)

    return velocity


def time_layers(layers: dict[str, Callable], x: mx.array, runs: int) -> dict[str, tuple[float, ...]]:
    """Each layer once to warm up, then ``runs`` rounds of each in turn, one ``mx.eval`` each."""
    times: dict[str, list[float]] = {name: [] for name in layers}
    for layer in layers.values():
        mx.eval(layer(x))
    for _ in range(runs):
        for name, layer in layers.items():
            start = time.perf_counter()
            mx.eval(layer(x))
            times[name].append(time.perf_counter() - start)
    return {name: tuple(t) for name, t in times.items()}


def run_bench_i1(cfg: I1BenchConfig, log: Callable[[str], None] = lambda _: None) -> I1BenchResult:
    cfg.check()
    dtype = parse_dtype(cfg.dtype)
    model = random_transformer(cfg.dims, dtype)
    if cfg.quantize is not None:
        quantize_in_memory(model, cfg.quantize, scheme=I1_LAYERS)
        mx.eval(model.parameters())
    weight_bytes = parameter_bytes(model)
    batch = 2 if uses_cfg(cfg.guidance) else 1
    req = synthetic_request(model.cfg, cfg.dims, cfg.size, batch)
    mx.eval(req.latents, req.cond.t5, req.cond.llama_stack, req.cond.pooled)
    mx.clear_cache()

    (step,), memory = measure({"step": _velocity(model, req, cfg.guidance)}, req.latents, cfg, log)
    layer = model.single_stream_blocks[0].block.ff_i
    dense = dense_twin(model, dtype)
    if cfg.quantize is not None:  # the same precision on both sides
        nn.quantize(dense, group_size=DEFAULT_GROUP_SIZE, bits=cfg.quantize, mode=MODE)
    x = mx.random.normal((batch, req.sequence, model.cfg.inner_dim), key=mx.random.key(3)).astype(dtype)
    log(f"  routed vs dense layer: {cfg.layer_runs} runs each, interleaved")
    layers = time_layers({"moe": layer, "dense": dense}, x, cfg.layer_runs)
    routed, shared, _ = default_widths(model.cfg)
    mx.clear_cache()
    return I1BenchResult(cfg, parameter_count(model), weight_bytes, req.image_tokens, req.text_tokens, batch, step,
                         max(memory.peak_rss, memory.ru_maxrss), memory.mlx_peak, layers["moe"], layers["dense"],
                         (model.cfg.num_activated_experts, routed, shared))


def report_lines_i1(result: I1BenchResult) -> list[str]:
    """The human summary; the routed/dense line, which scripts parse, is the last."""
    c = result.config
    quant = f", Q{c.quantize}" if c.quantize else ""
    mode = "batched CFG" if result.batch == 2 else "no CFG"
    top_k, routed, shared = result.active_widths
    tokens = result.image_tokens + result.text_tokens
    ratio = float(np.median(result.moe) / np.median(result.dense))
    return [
        f"model: random HiDream-I1 {c.dims}, {c.dtype}{quant}: {result.parameters:,} parameters, "
        f"weights {format_bytes(result.weight_bytes)}",
        f"request: {c.size}x{c.size}, {c.steps} steps x {c.repeats} runs (+1 warm-up), guidance {c.guidance:g} ({mode})",
        f"tokens: image {result.image_tokens} + text {result.text_tokens} per row, batch {result.batch}",
        f"step: {spread(result.step.run_medians, 's/step')} over {c.repeats} run medians",
        f"memory: peak RSS {format_bytes(result.peak_rss)}, MLX peak {format_bytes(result.mlx_peak)}",
        f"routed layer ({top_k} of its experts x {routed} + shared {shared}) vs dense SwiGLU {top_k * routed + shared} "
        f"wide, {result.batch} x {tokens} tokens, {c.layer_runs} interleaved runs each:",
        f"moe {spread(result.moe, 'ms', 1e-3, 1)}, dense {spread(result.dense, 'ms', 1e-3, 1)}, ratio {ratio:.3f}",
    ]
