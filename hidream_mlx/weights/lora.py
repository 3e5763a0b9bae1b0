"""LoRA adapters: read a ``.safetensors`` LoRA in any of the published key layouts and apply it.

Layouts recognised (auto-detected per key):

* PEFT / diffusers: ``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` (also
  ``lora_A.default.weight``), the module under ``base_model.model.``, ``transformer.``,
  ``diffusion_model.`` or ``model.`` (ModelScope's trainers write the checkpoint's own
  ``model.language_model.layers.N...`` names). Alpha: ``lora_alpha`` / ``alpha_pattern`` from an
  ``adapter_config.json`` beside the file, else from the ``lora_adapter_metadata`` JSON that
  diffusers' ``save_lora_weights`` writes into the safetensors header, else alpha = rank
  (factor 1, as diffusers assumes).
* kohya / ComfyUI: ``<module>.lora_down.weight`` / ``<module>.lora_up.weight`` with an optional
  ``<module>.alpha``, the module either dotted (``diffusion_model.`` prefix) or underscored after
  ``lora_unet_`` / ``lora_transformer_``; underscored names are mapped back through the model's
  own module paths, and a name two paths would both produce is refused. No ``.alpha``: alpha = rank.

Which prefixes a family's files use is its :class:`LoRAKeys` (:data:`O1_KEYS`, :data:`I1_KEYS`);
everything else (suffixes, alpha, merging, side paths) is shared. The facts behind each map are
in ``docs/model.md`` ("LoRA key layouts").

Applying: a float ``nn.Linear`` gets ``W + scale * (alpha / rank) * B @ A`` merged once (computed
in float32, cast back, evaluated layer by layer so only one layer's temporaries exist); an
``nn.QuantizedLinear`` is wrapped in :class:`LoRALinear`, which adds the low-rank path beside the
quantized matmul and never dequantizes. Several LoRAs stack.

A model's own adapter that must be switched off mid-run (HiDream-E1-Full's LoRA) is not merged:
:func:`attach_adapter` puts it beside the layer as an :class:`AdapterLinear` and
:func:`set_adapters_enabled` switches it; user LoRAs then apply to the layer underneath.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn

from hidream_mlx.files import sha256_file
from hidream_mlx.weights.lora_keys import (  # noqa: F401 (LoRAKeys, I1_KEYS: part of this module's interface)
    I1_KEYS,
    O1_KEYS,
    LoRAError,
    LoRAKeys,
    adapter_config,
    module_path,
    peft_alpha,
    split_key,
    underscore_map,
)
from hidream_mlx.weights.loading import SKIPPED_PREFIXES, is_vision, module_name
from hidream_mlx.weights.lora_specs import LoRASpec, check_path


@dataclass
class LoRALayer:
    key: str  # the file's key for lora_A / lora_down, for messages
    A: mx.array  # (rank, in)
    B: mx.array  # (out, rank)
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


@dataclass(frozen=True)
class LoRASummary:
    name: str
    path: str
    sha256: str
    scale: float
    layout: str
    modules: int
    merged: int
    side_paths: int
    ranks: tuple[int, ...]
    nbytes: int

    def line(self) -> str:
        ranks = "/".join(str(r) for r in self.ranks)
        how = f"{self.merged} merged, {self.side_paths} as side paths" if self.side_paths else "merged"
        return (f"lora {self.name}: {self.modules} modules changed ({how}), scale {self.scale:g}, "
                f"rank {ranks}, {self.layout} layout")

    def to_dict(self) -> dict:
        return {"name": self.name, "sha256": self.sha256, "scale": self.scale, "modules": self.modules,
                "layout": self.layout}


class LoRALinear(nn.Module):
    """A quantized linear layer plus low-rank updates: ``base(x) + sum f * (x @ A.T) @ B.T``."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.lora_A: list[mx.array] = []
        self.lora_B: list[mx.array] = []
        self.factors: list[float] = []

    def add(self, A: mx.array, B: mx.array, factor: float) -> None:
        self.lora_A.append(A)
        self.lora_B.append(B)
        self.factors.append(factor)

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        for A, B, f in zip(self.lora_A, self.lora_B, self.factors):
            y = y + f * ((x @ A.T.astype(x.dtype)) @ B.T.astype(x.dtype))
        return y


class AdapterLinear(nn.Module):
    """A linear layer with a model's own low-rank adapter beside it, which can be switched off:
    ``base(x) + factor * (x @ A.T) @ B.T`` while ``enabled``, else ``base(x)`` exactly (PEFT's
    ``enable_adapters`` / ``disable_adapters``). HiDream-E1-Full's LoRA is one: its refine stage
    runs without it. ``base`` is float, quantized or a :class:`LoRALinear`; user LoRAs apply to it."""

    def __init__(self, base: nn.Module, A: mx.array, B: mx.array, factor: float):
        super().__init__()
        self.base = base
        self.lora_A = A
        self.lora_B = B
        self.factor = factor
        self.enabled = True

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        if not self.enabled:
            return y
        return y + self.factor * ((x @ self.lora_A.T.astype(x.dtype)) @ self.lora_B.T.astype(x.dtype))


def attach_adapter(model: nn.Module, layers: dict[str, LoRALayer], dtype: mx.Dtype) -> int:
    """Put each layer (module path -> :class:`LoRALayer`, factor ``alpha / rank``) beside its
    module as an enabled :class:`AdapterLinear`; returns how many."""
    targets = linear_targets(model)
    for path, layer in layers.items():
        module = targets[path]
        if isinstance(module, AdapterLinear):
            raise LoRAError(f"{path}: already carries an adapter")
        A, B = layer.A.astype(dtype), layer.B.astype(dtype)
        mx.eval(A, B)
        _replace(model, path, AdapterLinear(module, A, B, layer.alpha / layer.rank))
    return len(layers)


def set_adapters_enabled(model: nn.Module, enabled: bool) -> int:
    """Switch every :class:`AdapterLinear` of ``model`` on or off; returns how many there are."""
    adapters = [m for _, m in model.named_modules() if isinstance(m, AdapterLinear)]
    for module in adapters:
        module.enabled = bool(enabled)
    return len(adapters)


def linear_targets(model: nn.Module) -> dict[str, nn.Module]:
    """Every module a LoRA may change, by our module path."""
    return {path: m for path, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.QuantizedLinear, LoRALinear, AdapterLinear))
            and not path.endswith(".base")}


def read_lora(path: Path | str, targets: dict, keys: LoRAKeys = O1_KEYS) -> tuple[dict[str, LoRALayer], str]:
    """The file's layers by our module path, and the layout found; strict about every key.

    ``targets``: our module path -> the module, or its (out, in) shape (a checkpoint, no model);
    ``keys``: the family's prefixes.
    """
    path = check_path(path)
    try:
        tensors, metadata = mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError, OSError) as e:  # what mlx raises for a broken header
        raise LoRAError(f"{path}: not a readable safetensors file ({e})") from None
    return lora_layers(tensors, adapter_config(path, metadata), targets, keys, path)


def lora_layers(tensors: dict[str, mx.array], config: Optional[dict], targets: dict, keys: LoRAKeys,
                path: Path | str) -> tuple[dict[str, LoRALayer], str]:
    """:func:`read_lora` on tensors already read; ``config`` holds PEFT's ``lora_alpha`` (and
    ``alpha_pattern``) or is None; ``path`` names the file in messages."""
    flat = underscore_map(targets)
    parts: dict[str, dict] = {}
    layouts, unrecognised = set(), []
    for key in sorted(tensors):
        split = split_key(key)
        module = module_path(split[0], targets, flat, keys) if split else None
        if module is None:
            unrecognised.append((key, split is not None))
            continue
        raw, role, layout = split
        layouts.add(layout)
        entry = parts.setdefault(module, {"raw": raw, "layout": layout})
        entry[role] = (key, tensors[key])
    if not parts:
        first = unrecognised[0][0] if unrecognised else "(the file is empty)"
        raise LoRAError(f"{path}: no key matched a module of this model; first unrecognised key: {first} "
                        f"(read as a {keys.family} LoRA)")
    if unrecognised:
        key, is_lora = unrecognised[0]
        what = "targets a module this model does not have" if is_lora else "is not a LoRA tensor"
        raise LoRAError(f"{path}: key {key} {what}")
    layers = {}
    for module, entry in parts.items():
        for role in ("A", "B"):
            if role not in entry:
                have = next(entry[r][0] for r in ("A", "B", "alpha") if r in entry)
                raise LoRAError(f"{path}: key {have} has no matching lora_{role} / "
                                f"lora_{'down' if role == 'A' else 'up'} tensor")
        (key_a, A), (key_b, B) = entry["A"], entry["B"]
        for key, tensor in ((key_a, A), (key_b, B)):
            if not mx.issubdtype(tensor.dtype, mx.floating):
                raise LoRAError(f"{path}: key {key} holds {dtype_name(tensor)} values; LoRA weights are floating point")
        if A.ndim != 2 or B.ndim != 2 or B.shape[1] != A.shape[0]:
            raise LoRAError(f"{path}: key {key_a}: shapes {tuple(A.shape)} and {tuple(B.shape)} "
                            "are not a rank-r pair (out, r) @ (r, in)")
        rank = int(A.shape[0])
        if rank == 0:
            raise LoRAError(f"{path}: key {key_a} has rank 0 (shape {tuple(A.shape)}): an empty update; "
                            "the file is broken")
        if "alpha" in entry:
            alpha = scalar_alpha(path, *entry["alpha"])
        elif entry["layout"] == "peft":
            alpha = peft_alpha(config, entry["raw"], rank)
        else:
            alpha = float(rank)
        out_f, in_f = layer_shape(targets[module])
        if (B.shape[0], A.shape[1]) != (out_f, in_f):
            raise LoRAError(f"{path}: key {key_a}: the update is {B.shape[0]}x{A.shape[1]} but "
                            f"{module} is {out_f}x{in_f}")
        layers[module] = LoRALayer(key_a, A, B, alpha)
    check_finite(path)
    return layers, "+".join(sorted(layouts))


def dtype_name(tensor: mx.array) -> str:
    return str(tensor.dtype).rsplit(".", 1)[-1]  # "int32", not "mlx.core.int32"


def scalar_alpha(path: Path, key: str, tensor: mx.array) -> float:
    """A kohya ``.alpha``: exactly one finite number (never the first of several)."""
    if tensor.size != 1:
        raise LoRAError(f"{path}: key {key} must hold one number (alpha), got shape {tuple(tensor.shape)}")
    if tensor.dtype == mx.bool_ or not (mx.issubdtype(tensor.dtype, mx.floating)
                                        or mx.issubdtype(tensor.dtype, mx.integer)):
        raise LoRAError(f"{path}: key {key} holds {dtype_name(tensor)} values; alpha is a number")
    alpha = float(tensor.astype(mx.float32).reshape(-1)[0])
    if not math.isfinite(alpha):
        raise LoRAError(f"{path}: key {key} is {alpha}; alpha must be a finite number")
    return alpha


def check_finite(path: Path) -> None:
    """Refuse NaN or inf in any tensor of the file (it would turn the whole image into NaN).

    The check reads the file a second time, lazily and one tensor at a time, dropping each:
    the arrays :func:`read_lora` returns stay unevaluated, so applying a LoRA still loads it
    layer by layer, near its own size."""
    tensors = mx.load(str(path))
    for key in sorted(tensors):
        tensor = tensors.pop(key)
        if not bool(mx.isfinite(tensor).all()):
            raise LoRAError(f"{path}: key {key} holds NaN or inf values")


def layer_shape(module) -> tuple[int, int]:
    """(out, in) of a linear layer, quantized or not (a shape tuple passes through)."""
    if isinstance(module, tuple):
        return module
    while isinstance(module, (AdapterLinear, LoRALinear)):
        module = module.base
    if isinstance(module, nn.QuantizedLinear):
        return int(module.weight.shape[0]), int(module.weight.shape[1]) * 32 // module.bits
    return int(module.weight.shape[0]), int(module.weight.shape[1])


def merge_into(module: nn.Linear, layer: LoRALayer, factor: float) -> None:
    """``W + factor * B @ A`` in float32, cast back to the weight's dtype, evaluated now."""
    w = module.weight
    update = layer.B.astype(mx.float32) @ layer.A.astype(mx.float32)
    module.weight = (w.astype(mx.float32) + factor * update).astype(w.dtype)
    mx.eval(module.weight)


def _module_at(model: nn.Module, path: str):
    module = model
    for name in path.split(".") if path else []:
        module = module[int(name)] if isinstance(module, list) else getattr(module, name)
    return module


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parents, _, last = path.rpartition(".")
    parent = _module_at(model, parents)
    if isinstance(parent, list):
        parent[int(last)] = new
    else:
        setattr(parent, last, new)


def apply_lora(model: nn.Module, spec: LoRASpec, keep: Optional[dict] = None,
               keys: LoRAKeys = O1_KEYS) -> LoRASummary:
    """Apply one LoRA at ``spec.scale``: merged into float layers, a side path on quantized ones.

    ``keep`` collects what is replaced (the original weight or quantized module, by path), so
    :func:`switch_loras` can undo it exactly.
    """
    targets = linear_targets(model)
    layers, layout = read_lora(spec.path, targets, keys)
    merged = side = 0
    for module_path, layer in layers.items():
        factor = spec.scale * layer.alpha / layer.rank
        module = targets[module_path]
        if isinstance(module, AdapterLinear):  # the user's LoRA changes the layer under the adapter
            module_path, module = module_path + ".base", module.base
        if isinstance(module, nn.Linear):
            if keep is not None:
                keep.setdefault(module_path, module.weight)
            merge_into(module, layer, factor)
            merged += 1
            continue
        if not isinstance(module, LoRALinear):
            if keep is not None:
                keep.setdefault(module_path, module)
            module = LoRALinear(module)
            _replace(model, module_path, module)
        dtype = module.base.scales.dtype
        A, B = layer.A.astype(dtype), layer.B.astype(dtype)
        mx.eval(A, B)
        module.add(A, B, factor)
        side += 1
    nbytes = sum(l.A.nbytes + l.B.nbytes for l in layers.values())
    ranks = tuple(sorted({l.rank for l in layers.values()}))
    return LoRASummary(spec.path.name, str(spec.path), sha256_file(spec.path), spec.scale, layout,
                       len(layers), merged, side, ranks, nbytes)


def apply_loras(model: nn.Module, specs: Sequence[LoRASpec], keys: LoRAKeys = O1_KEYS) -> list[LoRASummary]:
    """Apply each LoRA in order (they stack); one summary each."""
    return [apply_lora(model, spec, keys=keys) for spec in specs]


def lora_memory(specs: Sequence[LoRASpec], quantized: bool) -> int:
    """Bytes the LoRAs add while generating: their tensors on quantized models (side paths),
    nothing after merging into float weights beyond one layer's temporaries while loading."""
    if not quantized:
        return 0
    return sum(Path(s.path).stat().st_size for s in specs if Path(s.path).is_file())


def checkpoint_targets(infos: dict) -> dict[str, tuple[int, int]]:
    """(out, in) of every linear layer in a checkpoint index (checkpoint name -> TensorInfo)."""
    out = {}
    for name, info in infos.items():
        path = module_name(name)
        if (path.endswith(".weight") and len(info.shape) == 2 and not is_vision(path)
                and not path.startswith(SKIPPED_PREFIXES) and "embed_tokens" not in path):
            out[path[: -len(".weight")]] = (int(info.shape[0]), int(info.shape[1]))
    return out


def updates_for_checkpoint(specs: Sequence[LoRASpec], targets: dict[str, tuple[int, int]]):
    """For baking LoRAs into a conversion: module path -> [(layer, factor)], and one summary each."""
    updates: dict[str, list] = {}
    summaries = []
    for spec in specs:
        layers, layout = read_lora(spec.path, targets)
        for module_path, layer in layers.items():
            updates.setdefault(module_path, []).append((layer, spec.scale * layer.alpha / layer.rank))
        summaries.append(LoRASummary(spec.path.name, str(spec.path), sha256_file(spec.path), spec.scale, layout,
                                     len(layers), len(layers), 0, tuple(sorted({l.rank for l in layers.values()})),
                                     sum(l.A.nbytes + l.B.nbytes for l in layers.values())))
    return updates, summaries


def merged_weight(weight: mx.array, updates: Sequence) -> mx.array:
    """``weight`` plus every (layer, factor) update, in float32 (the caller casts or quantizes)."""
    w = weight.astype(mx.float32)
    for layer, factor in updates:
        w = w + factor * (layer.B.astype(mx.float32) @ layer.A.astype(mx.float32))
    return w


def replace_loras(model: nn.Module, specs: Sequence[LoRASpec], keep: dict,
                  keys: LoRAKeys = O1_KEYS) -> tuple[list[LoRASummary], dict]:
    """Undo what ``keep`` holds (a previous :func:`apply_lora`'s originals, by path), then apply
    ``specs``; returns their summaries and the new ``keep``."""
    restore(model, keep)
    new_keep: dict = {}
    try:
        return [apply_lora(model, spec, new_keep, keys) for spec in specs], new_keep
    except BaseException:
        restore(model, new_keep)  # a failure half-way leaves the plain model, not part of the LoRAs
        raise


def restore(model: nn.Module, keep: dict) -> None:
    """Put back what :func:`apply_lora` replaced (original weights and modules, by path)."""
    for path, original in keep.items():
        if isinstance(original, mx.array):
            _module_at(model, path).weight = original
        else:
            _replace(model, path, original)


def switch_loras(engine, specs: Sequence[LoRASpec]) -> None:
    """Make ``engine`` run with exactly ``specs`` (a battery job's LoRAs): the previous job's are
    undone exactly (original weights and modules put back) first. Costs a copy of the changed
    float layers while LoRAs are active. ``engine.loras`` holds the summaries. An engine with
    its own ``use_loras`` (HiDream-I1, whose transformer loads after the prompts) does it there."""
    specs = tuple(specs)
    if hasattr(engine, "use_loras"):
        engine.use_loras(specs)
        return
    state = getattr(engine, "lora_state", None) or {"specs": (), "keep": {}}
    if specs == state["specs"]:
        return
    try:
        engine.loras, keep = replace_loras(engine.model, specs, state["keep"])
    except BaseException:
        engine.loras, engine.lora_state = [], {"specs": (), "keep": {}}  # replace_loras left the plain model
        raise
    engine.lora_state = {"specs": specs, "keep": keep}
