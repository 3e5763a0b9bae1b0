"""How much quantization changes each decoder layer, measured on real activations.

A short run of the unquantized model (one prompt, small size, two steps) records the inputs of
every decoder linear; each layer's relative output error ``||x W_q^T - x W^T|| / ||x W^T||`` is
then computed for the plan's setting (bf16-kept layers show their bf16 rounding error). Worst
layers come first: they are the candidates for an 8-bit or bf16 override in a recipe file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten

from hidream_mlx.quant.quantization import (
    KEEP,
    MODE,
    LayerSetting,
    QuantPlan,
    is_decoder_linear,
    quantize_weight,
)

DEFAULT_PROMPT = "a lighthouse on a rocky coast at sunset, waves, warm light"
MAX_ROWS = 256  # activation rows kept per layer: enough for a stable norm, bounded memory


class InputRecorder(nn.Module):
    """Stands in for a linear layer during the capture run and keeps a sample of its inputs."""

    def __init__(self, linear: nn.Module, max_rows: int):
        super().__init__()
        self.linear = linear
        self.max_rows = max_rows
        self.samples: list[mx.array] = []

    def __call__(self, x: mx.array) -> mx.array:
        flat = x.reshape(-1, x.shape[-1])
        stride = max(1, flat.shape[0] // self.max_rows)
        self.samples.append(flat[::stride][: self.max_rows])
        return self.linear(x)

    def rows(self) -> mx.array:
        rows = mx.concatenate(self.samples, axis=0)
        stride = max(1, rows.shape[0] // self.max_rows)
        return rows[::stride][: self.max_rows]


def capture_inputs(model: nn.Module, paths: list[str], run: Callable[[Callable[[], None]], None],
                   max_rows: int = MAX_ROWS) -> dict[str, mx.array]:
    """Inputs seen by the modules at ``paths`` while ``run(flush)`` drives the model.

    ``run`` should call ``flush`` after each step so recorded rows are evaluated and the
    activations they slice can be freed.
    """
    modules = dict(model.named_modules())
    recorders = {p: InputRecorder(modules[p], max_rows) for p in paths}

    def flush():
        mx.eval([s for r in recorders.values() for s in r.samples])

    model.update_modules(tree_unflatten(list(recorders.items())))
    try:
        run(flush)
        flush()
    finally:
        model.update_modules(tree_unflatten([(p, modules[p]) for p in paths]))
    out = {p: r.rows() for p, r in recorders.items()}
    mx.eval(list(out.values()))
    return out


def quantized_like(weight: mx.array, setting: Optional[LayerSetting]) -> mx.array:
    """The weight as the converted folder will hold it, back in float32."""
    if setting is None:
        return weight.astype(mx.bfloat16).astype(mx.float32)
    packed, scales, biases = quantize_weight(weight, setting)
    return mx.dequantize(packed, scales, biases, group_size=setting.group_size, bits=setting.bits,
                         mode=MODE).astype(mx.float32)


@dataclass(frozen=True)
class LayerError:
    path: str
    setting: Optional[LayerSetting]
    rel_error: float

    @property
    def label(self) -> str:
        return KEEP if self.setting is None else f"{self.setting.bits}-bit g{self.setting.group_size}"


@dataclass
class FidelityReport:
    title: str
    run: str  # how the activations were obtained
    errors: list[LayerError]  # worst first

    def rows(self) -> list[str]:
        return [f"| {i} | `{e.path}` | {e.label} | {e.rel_error:.3e} |" for i, e in enumerate(self.errors, 1)]

    def summary(self) -> list[str]:
        by_label: dict[str, list[float]] = {}
        for e in self.errors:
            by_label.setdefault(e.label, []).append(e.rel_error)
        return [f"- {label}: {len(v)} layers, median {np.median(v):.3e}, worst {max(v):.3e}"
                for label, v in sorted(by_label.items())]

    def markdown(self) -> str:
        lines = [f"# Quantization fidelity: {self.title}", "",
                 "Relative output error ||x W_q^T - x W^T|| / ||x W^T|| of each decoder linear layer, "
                 f"on inputs recorded from {self.run}. Worst first.", "", *self.summary(), "",
                 "| rank | layer | stored as | rel. output error |", "|---:|---|---|---:|", *self.rows(), ""]
        return "\n".join(lines)

    def top(self, n: int = 5) -> list[str]:
        return [f"{e.rel_error:.3e}  {e.path} ({e.label})" for e in self.errors[:n]]


def layer_errors(model: nn.Module, inputs: dict[str, mx.array],
                 settings: dict[str, Optional[LayerSetting]]) -> list[LayerError]:
    modules = dict(model.named_modules())
    paths = sorted(inputs)
    ratios = []
    for path in paths:
        weight = modules[path].weight.astype(mx.float32)
        x = inputs[path].astype(mx.float32)
        reference = x @ weight.T
        ratios.append(mx.linalg.norm(x @ quantized_like(weight, settings.get(path)).T - reference)
                      / mx.linalg.norm(reference))
        mx.eval(ratios[-1])
    values = np.array(mx.stack(ratios)) if ratios else np.zeros(0)
    errors = [LayerError(p, settings.get(p), float(v)) for p, v in zip(paths, values)]
    return sorted(errors, key=lambda e: -e.rel_error)


def fidelity_report(source_dir: Path, plan: QuantPlan, title: str, dtype: mx.Dtype = mx.bfloat16,
                    prompt: str = DEFAULT_PROMPT, size: int = 256, steps: int = 2, seed: int = 0
                    ) -> FidelityReport:
    """Load the unquantized model from ``source_dir``, record activations, score ``plan``."""
    from hidream_mlx.generation import Engine, Request
    from hidream_mlx.models.loading import load_model
    from hidream_mlx.prompt import Tokenizer

    model = load_model(source_dir, dtype=dtype)
    tokenizer = Tokenizer(source_dir) if (source_dir / "tokenizer.json").is_file() else None
    engine = Engine(model, tokenizer, name=str(source_dir))
    default = engine.recipe()
    recipe = default.with_overrides(steps=steps, guidance=1.0 if default.uses_cfg else None)
    request = Request(prompt, size, size, seed, recipe)
    paths = [p for p in plan.layers if is_decoder_linear(p)]
    inputs = capture_inputs(model, paths, lambda flush: engine.run(request, lambda step, t: flush()))
    dtype_name = {mx.float32: "float32", mx.bfloat16: "bfloat16", mx.float16: "float16"}.get(dtype, str(dtype))
    run = (f'one prompt ("{prompt}") at {size}x{size}, {steps} steps of the {recipe.name} recipe without CFG, '
           f"unquantized model in {dtype_name}, up to {MAX_ROWS} rows per layer")
    return FidelityReport(title, run, layer_errors(model, inputs, plan.layers))
