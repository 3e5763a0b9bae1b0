"""How much quantization changes each decoder layer, measured on real activations.

A short run of the unquantized model (one prompt, small size, two steps) records the inputs of
every decoder linear; each layer's relative output error ``||x W_q^T - x W^T|| / ||x W^T||`` is
then computed for the plan's setting (bf16-kept layers show their bf16 rounding error). Worst
layers come first: they are the candidates for an 8-bit or bf16 override in a recipe file.

Other recipes are scored on the very same recorded activations, and every recipe's error is
split by layer family (attention projections, gate/up, down_proj, pixel head, embeddings): the
family's relative error and its share of the absolute output-error energy, so a darkening
recipe shows where its error comes from. The embedding error is measured on the rows of the
tokens the run looked up.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten

from hidream_mlx.memory import component_sizes
from hidream_mlx.weights.precision import DTYPE_NAMES
from hidream_mlx.quant.plans import EMBEDDINGS, QuantPlan, resolve_plan
from hidream_mlx.quant.quantization import quantize_weight
from hidream_mlx.quant.recipes import BUILTIN_RECIPES, KEEP, MODE, LayerSetting
from hidream_mlx.families.o1.engine import Engine, Request
from hidream_mlx.families.o1.loading import load_model
from hidream_mlx.families.o1.prompt import Tokenizer

DEFAULT_PROMPT = "a lighthouse on a rocky coast at sunset, waves, warm light"
MAX_ROWS = 256  # activation rows kept per layer: enough for a stable norm, bounded memory
FAMILIES = ("attention projections", "gate/up", "down_proj", "pixel head", "embeddings")
PIXEL_HEADS = ("x_embedder.", "t_embedder1.", "final_layer2.")
CAVEAT = ("These activations come from the weights at hand. On random weights the ranking of recipes "
          "can differ from real weights: real LLM weights carry a few outlier channels with massive "
          "activations, concentrated in the inputs of mlp.down_proj, which random weights lack; "
          "run the report on the real checkpoint before choosing a recipe.")


def family_of(path: str) -> Optional[str]:
    """The layer family a module path belongs to (None: not a weight matrix the report scores)."""
    if path == EMBEDDINGS:
        return "embeddings"
    if path.startswith(PIXEL_HEADS):
        return "pixel head"
    if path.startswith("language_model.layers."):
        if ".self_attn." in path:
            return "attention projections"
        if path.endswith("mlp.down_proj"):
            return "down_proj"
        if path.endswith(("mlp.gate_proj", "mlp.up_proj")):
            return "gate/up"
    return None


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

    @property
    def weight(self) -> mx.array:
        # the model reads some layers' weight (its dtype) besides calling them
        return self.linear.weight

    def rows(self) -> mx.array:
        rows = mx.concatenate(self.samples, axis=0)
        stride = max(1, rows.shape[0] // self.max_rows)
        return rows[::stride][: self.max_rows]


class IdRecorder(InputRecorder):
    """The same for an embedding: keeps the token ids it looked up."""

    def __call__(self, ids: mx.array) -> mx.array:
        self.samples.append(ids.reshape(-1))
        return self.linear(ids)

    def rows(self) -> mx.array:
        return mx.concatenate(self.samples)[: self.max_rows * 16]


def capture_inputs(model: nn.Module, paths: list[str], run: Callable[[Callable[[], None]], None],
                   max_rows: int = MAX_ROWS) -> dict[str, mx.array]:
    """Inputs seen by the modules at ``paths`` while ``run(flush)`` drives the model.

    ``run`` should call ``flush`` after each step so recorded rows are evaluated and the
    activations they slice can be freed.
    """
    modules = dict(model.named_modules())
    recorders = {p: (IdRecorder if isinstance(modules[p], nn.Embedding) else InputRecorder)(modules[p], max_rows)
                 for p in paths}

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
    error_energy: float = 0.0  # ||x W_q^T - x W^T||^2 on the recorded rows
    output_energy: float = 0.0  # ||x W^T||^2

    @property
    def label(self) -> str:
        return KEEP if self.setting is None else f"{self.setting.bits}-bit g{self.setting.group_size}"

    @property
    def family(self) -> Optional[str]:
        return family_of(self.path)


@dataclass(frozen=True)
class FamilyError:
    family: str
    layers: int
    kept: int  # of which stored as floats
    rel_error: float  # sqrt(sum error energy / sum output energy) over the family
    share: float  # of the recipe's total error energy


def family_errors(errors: list[LayerError]) -> list[FamilyError]:
    total = sum(e.error_energy for e in errors) or 1.0
    out = []
    for family in FAMILIES:
        members = [e for e in errors if e.family == family]
        if members:
            err, ref = sum(e.error_energy for e in members), sum(e.output_energy for e in members)
            out.append(FamilyError(family, len(members), sum(e.setting is None for e in members),
                                   float(np.sqrt(err / ref)) if ref else 0.0, err / total))
    return out


@dataclass
class FidelityReport:
    title: str
    run: str  # how the activations were obtained
    errors: list[LayerError]  # worst first
    # other recipes on the same activations: name -> (bits per weight, errors)
    compared: dict[str, tuple[float, list[LayerError]]] = field(default_factory=dict)
    bits_per_weight: float = 0.0
    indivisible: list[str] = field(default_factory=list)

    def family_table(self) -> list[str]:
        lines = ["| recipe | bits/weight | family | layers (kept in bf16) | rel. error | share of error |",
                 "|---|---:|---|---:|---:|---:|"]
        for name, (bpw, errors) in {self.title: (self.bits_per_weight, self.errors), **self.compared}.items():
            for f in family_errors(errors):
                lines.append(f"| {name} | {bpw:.2f} | {f.family} | {f.layers} ({f.kept}) | "
                             f"{f.rel_error:.3e} | {100 * f.share:.1f}% |")
        return lines

    def rows(self) -> list[str]:
        return [f"| {i} | `{e.path}` | {e.label} | {e.rel_error:.3e} |" for i, e in enumerate(self.errors, 1)]

    def summary(self) -> list[str]:
        by_label: dict[str, list[float]] = {}
        for e in self.errors:
            by_label.setdefault(e.label, []).append(e.rel_error)
        return [f"- {label}: {len(v)} layers, median {np.median(v):.3e}, worst {max(v):.3e}"
                for label, v in sorted(by_label.items())]

    def markdown(self) -> str:
        kept = ([f"Kept in bf16 because the group size does not divide their input width: "
                 f"{', '.join(self.indivisible)}.", ""] if self.indivisible else [])
        lines = [f"# Quantization fidelity: {self.title}", "",
                 "Relative output error ||x W_q^T - x W^T|| / ||x W^T|| of each weight matrix, "
                 f"on inputs recorded from {self.run}.", "", f"> {CAVEAT}", "", *kept,
                 "## Where the error comes from", "",
                 "Per layer family, every recipe on the same activations; bits/weight over the scored "
                 "matrices (scales and biases included); share = the family's part of the recipe's summed "
                 "squared output error.", "", *self.family_table(), "",
                 "## Layers, worst first", "", *self.summary(), "",
                 "| rank | layer | stored as | rel. output error |", "|---:|---|---|---:|", *self.rows(), ""]
        return "\n".join(lines)

    def top(self, n: int = 5) -> list[str]:
        return [f"{e.rel_error:.3e}  {e.path} ({e.label})" for e in self.errors[:n]]


def layer_errors(model: nn.Module, inputs: dict[str, mx.array],
                 settings: dict[str, Optional[LayerSetting]]) -> list[LayerError]:
    modules = dict(model.named_modules())
    paths = sorted(inputs)
    energies = []
    for path in paths:
        weight = modules[path].weight
        if isinstance(modules[path], nn.Embedding):
            # rows quantize independently, so the looked-up rows alone give the table's error
            reference = weight[inputs[path]].astype(mx.float32)
            approx = quantized_like(reference, settings.get(path))
        else:
            x, weight = inputs[path].astype(mx.float32), weight.astype(mx.float32)
            reference = x @ weight.T
            approx = x @ quantized_like(weight, settings.get(path)).T
        energies.append(mx.stack([mx.sum(mx.square(approx - reference)), mx.sum(mx.square(reference))]))
        mx.eval(energies[-1])
    values = np.array(mx.stack(energies)).astype(np.float64) if energies else np.zeros((0, 2))
    errors = [LayerError(p, settings.get(p), float(np.sqrt(err / ref)) if ref else 0.0, float(err), float(ref))
              for p, (err, ref) in zip(paths, values)]
    return sorted(errors, key=lambda e: -e.rel_error)


def plan_bits_per_weight(model: nn.Module, settings: dict[str, Optional[LayerSetting]], paths) -> float:
    """Stored bits per weight of the matrices at ``paths`` under ``settings`` (floats as bf16)."""
    modules = dict(model.named_modules())
    shapes = [(f"{path}.weight", tuple(modules[path].weight.shape)) for path in paths]
    sizes = component_sizes(shapes, 2, lambda name, shape: settings.get(name[: -len(".weight")]),
                            group_of=lambda name: "matrices")
    return sizes["matrices"].bits_per_weight if sizes else 0.0


def score_plans(model: nn.Module, inputs: dict[str, mx.array], title: str, run: str, plan: QuantPlan,
                others: Optional[dict[str, QuantPlan]] = None) -> FidelityReport:
    """``plan`` and each of ``others`` on the same recorded ``inputs``."""
    compared = {name: (plan_bits_per_weight(model, p.layers, inputs), layer_errors(model, inputs, p.layers))
                for name, p in (others or {}).items()}
    return FidelityReport(title, run, layer_errors(model, inputs, plan.layers), compared,
                          plan_bits_per_weight(model, plan.layers, inputs), list(plan.indivisible))


def fidelity_report(source_dir: Path, plan: QuantPlan, title: str, dtype: mx.Dtype = mx.bfloat16,
                    prompt: str = DEFAULT_PROMPT, size: int = 256, steps: int = 2, seed: int = 0,
                    others: Optional[dict[str, QuantPlan]] = None) -> FidelityReport:
    """Load the unquantized model from ``source_dir``, record activations, score ``plan`` (and
    ``others``, for comparison, on the same activations)."""
    model = load_model(source_dir, dtype=dtype)
    tokenizer = Tokenizer(source_dir) if (source_dir / "tokenizer.json").is_file() else None
    engine = Engine(model, tokenizer, name=str(source_dir))
    default = engine.recipe()
    recipe = default.with_overrides(steps=steps, guidance=1.0 if default.uses_cfg else None)
    request = Request(prompt, size, size, seed, recipe)
    modules = dict(model.named_modules())
    paths = [p for p in plan.layers if family_of(p) and isinstance(modules.get(p), (nn.Linear, nn.Embedding))]
    inputs = capture_inputs(model, paths, lambda flush: engine.run(request, lambda step, t: flush()))
    dtype_name = DTYPE_NAMES.get(dtype, str(dtype))
    run = (f'one prompt ("{prompt}") at {size}x{size}, {steps} steps of the {recipe.name} recipe without CFG, '
           f"unquantized model in {dtype_name}, up to {MAX_ROWS} rows per layer")
    return score_plans(model, inputs, title, run, plan, others)


def comparison_plans(plan: QuantPlan, matrices: dict[str, int], num_layers: int) -> dict[str, QuantPlan]:
    """What ``quantize --report`` compares ``plan`` with: flat at the plan's default bits, every
    built-in recipe, and the plan's own recipe with embed_tokens toggled (its effect alone)."""
    bits, group = plan.default.bits, plan.default.group_size
    out = {f"flat Q{bits}": resolve_plan(BUILTIN_RECIPES["flat"], matrices, num_layers, bits, group)}
    for name, recipe in BUILTIN_RECIPES.items():
        if recipe.bits is not None and name != plan.recipe.name:
            out[name] = resolve_plan(recipe, matrices, num_layers, None, group)
    toggled = replace(plan.recipe, quantize_embeddings=not plan.recipe.quantize_embeddings)
    suffix = "without" if plan.recipe.quantize_embeddings else "with"
    out[f"{plan.recipe.name} {suffix} quantized embed_tokens"] = resolve_plan(
        toggled, matrices, num_layers, None if plan.recipe.bits else bits, group)
    return out
