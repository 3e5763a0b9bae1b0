"""Which layers get quantized to how many bits, and applying that to a model.

A *recipe* says what to do: default bits and group size, then overrides (first match wins)
that move single decoder layers or projections to other bits or keep them in bf16. A recipe
resolved against a model's layers gives a *plan*: module path -> ``LayerSetting`` or ``None``
(kept as floats). The plan is what the converter writes, what ``config.json`` stores
(mlx-lm style: ``mode``, ``bits``, ``group_size`` plus one entry per layer that differs) and
what the loader reads back, so a converted folder loads with no flags.

Only the decoder's linear layers are ever quantized. The pixel shims (``x_embedder``,
``t_embedder1``, ``final_layer2``), the norms, the biases and ``embed_tokens`` stay in bf16:
quantization error in the shims lands directly on the pixels (SPEC §5: flat Q4 darkens
images), and ``embed_tokens`` is a table lookup run once per prompt, so quantizing it saves
memory but no time and perturbs every text key/value the image attends to.
"""

from __future__ import annotations

import fnmatch
import json
import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn


MODE = "affine"
SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)  # every width MLX's affine mode packs
LOW_QUALITY_BITS = (2, 3)  # below 4 bits the rounding error is visible in the image
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 64
KEEP = "bf16"  # a plan / config entry meaning: not quantized, stored as bf16
EMBEDDINGS = "language_model.embed_tokens"

_DECODER_LINEAR = re.compile(
    r"language_model\.layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)")


@dataclass(frozen=True)
class LayerSetting:
    bits: int
    group_size: int

    def to_dict(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size}


def is_decoder_linear(path: str) -> bool:
    """The only layers a recipe may quantize: the decoder's attention and MLP projections."""
    return _DECODER_LINEAR.fullmatch(path) is not None


def decoder_layer_index(path: str) -> Optional[int]:
    m = _DECODER_LINEAR.fullmatch(path)
    return int(m.group(1)) if m else None


def check_bits(bits, where: str = "--bits") -> int:
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"{where}: unsupported bits {bits!r}; choose one of "
                         f"{', '.join(map(str, SUPPORTED_BITS))}")
    return bits


def bits_warning(bits: int) -> Optional[str]:
    """A one-line quality warning for the widths that visibly damage the image, else None."""
    if bits in LOW_QUALITY_BITS:
        return (f"{bits}-bit weights lose visible quality (colour shifts, lost detail, noise); "
                f"use 4 bits or more unless memory leaves no choice")
    return None


def check_group_size(group_size, where: str = "--group-size") -> int:
    if isinstance(group_size, bool) or group_size not in GROUP_SIZES:
        raise ValueError(f"{where}: unsupported group size {group_size!r}; choose one of "
                         f"{', '.join(map(str, GROUP_SIZES))}")
    return group_size


@dataclass(frozen=True)
class Override:
    """One recipe rule. ``pattern`` is a glob over module paths, or a regex after ``re:``;
    ``layers`` picks decoder layers by index (negative counts from the end). Both given: both
    must match. ``bits`` is a bit width or ``"bf16"``."""

    bits: Union[int, str]
    pattern: Optional[str] = None
    layers: Optional[tuple[int, ...]] = None
    group_size: Optional[int] = None

    @classmethod
    def from_dict(cls, data: dict, where: str) -> "Override":
        unknown = set(data) - {"pattern", "layers", "bits", "group_size"}
        if unknown:
            raise ValueError(f"{where}: unknown key {sorted(unknown)[0]!r}")
        if "bits" not in data:
            raise ValueError(f"{where}: 'bits' is missing (a bit width or \"bf16\")")
        bits = data["bits"]
        if bits != KEEP:
            check_bits(bits, f"{where}.bits")
        pattern, layers = data.get("pattern"), data.get("layers")
        if pattern is None and layers is None:
            raise ValueError(f"{where}: give 'pattern' (glob, or re:REGEX) and/or 'layers' (indices)")
        if pattern is not None:
            if not isinstance(pattern, str) or not pattern:
                raise ValueError(f"{where}.pattern must be a non-empty string")
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as e:
                    raise ValueError(f"{where}.pattern: bad regex ({e})") from None
        if layers is not None:
            if not isinstance(layers, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                       for i in layers):
                raise ValueError(f"{where}.layers must be a list of integers")
            layers = tuple(layers)
        group_size = data.get("group_size")
        if group_size is not None:
            check_group_size(group_size, f"{where}.group_size")
        return cls(bits, pattern, layers, group_size)

    def to_dict(self) -> dict:
        out: dict = {}
        if self.pattern is not None:
            out["pattern"] = self.pattern
        if self.layers is not None:
            out["layers"] = list(self.layers)
        out["bits"] = self.bits
        if self.group_size is not None:
            out["group_size"] = self.group_size
        return out

    def matches(self, path: str, num_layers: int) -> bool:
        if self.layers is not None:
            index = decoder_layer_index(path)
            if index is None or not any(i % num_layers == index for i in self.layers
                                        if -num_layers <= i < num_layers):
                return False
        if self.pattern is None:
            return True
        if self.pattern.startswith("re:"):
            return re.fullmatch(self.pattern[3:], path) is not None
        return fnmatch.fnmatchcase(path, self.pattern)


@dataclass(frozen=True)
class QuantRecipe:
    name: str
    bits: Optional[int] = None  # None: the caller's --bits
    group_size: Optional[int] = None  # None: the caller's --group-size, else DEFAULT_GROUP_SIZE
    overrides: tuple[Override, ...] = ()
    description: str = ""
    # embed_tokens at the default bits too (off: it is a lookup table, smaller not faster)
    quantize_embeddings: bool = False

    @classmethod
    def from_dict(cls, data: dict, where: str = "recipe") -> "QuantRecipe":
        if not isinstance(data, dict):
            raise ValueError(f"{where}: a recipe is a JSON object")
        unknown = set(data) - {"name", "bits", "group_size", "overrides", "description", "quantize_embeddings"}
        if unknown:
            raise ValueError(f"{where}: unknown key {sorted(unknown)[0]!r}")
        bits = data.get("bits")
        if bits is not None:
            check_bits(bits, f"{where}.bits")
        group_size = data.get("group_size")
        if group_size is not None:
            check_group_size(group_size, f"{where}.group_size")
        rules = data.get("overrides", [])
        if not isinstance(rules, list):
            raise ValueError(f"{where}.overrides must be a list")
        overrides = []
        for i, rule in enumerate(rules):
            if not isinstance(rule, dict):
                raise ValueError(f"{where}.overrides[{i}]: each override is an object like "
                                 f'{{"pattern": ..., "bits": 8}}')
            overrides.append(Override.from_dict(rule, f"{where}.overrides[{i}]"))
        embeddings = data.get("quantize_embeddings", False)
        if not isinstance(embeddings, bool):
            raise ValueError(f"{where}.quantize_embeddings must be true or false")
        return cls(str(data.get("name", "custom")), bits, group_size, tuple(overrides),
                   str(data.get("description", "")), embeddings)

    @classmethod
    def from_file(cls, path: Path | str) -> "QuantRecipe":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such recipe file") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        recipe = cls.from_dict(data, path.name)
        return recipe if "name" in data else replace(recipe, name=path.stem)

    def to_dict(self) -> dict:
        out: dict = {"name": self.name, "description": self.description}
        if self.bits is not None:
            out["bits"] = self.bits
        if self.group_size is not None:
            out["group_size"] = self.group_size
        out["overrides"] = [o.to_dict() for o in self.overrides]
        if self.quantize_embeddings:
            out["quantize_embeddings"] = True
        return out


# The same recipes ship as JSON under quantize/recipes/ (a test keeps them equal).
BUILTIN_RECIPES: dict[str, QuantRecipe] = {
    "flat": QuantRecipe("flat", description="every decoder linear at --bits; shims, norms and "
                                            "embed_tokens in bf16"),
    # First and last two decoder layers at 8 bits: the first layers turn raw patch embeddings
    # into the residual stream and the last ones feed final_layer2 directly, so their rounding
    # error is not averaged away by later layers; users measured that this fixes Q4 darkening
    # (SPEC §4-5) for ~1 GB (bf16 edges) — at 8 bits the edges cost half that.
    "q4-selective": QuantRecipe(
        "q4-selective", bits=4,
        overrides=(Override(8, layers=(0, 1, -2, -1)),),
        description="4-bit decoder with the first 2 and last 2 layers at 8 bits (fixes Q4 darkening)"),
    # Every layer's down_proj at 8 bits: real LLM weights feed down_proj a few channels with
    # activations orders of magnitude above the rest, which dominate its 4-bit rounding error;
    # another MLX port found this alone removes flat Q4's darkening.
    "q4-down8": QuantRecipe(
        "q4-down8", bits=4,
        overrides=(Override(8, pattern="*.mlp.down_proj"),),
        description="4-bit decoder with every layer's mlp.down_proj at 8 bits (protects the outlier channels)"),
}


def get_quant_recipe(name: str) -> QuantRecipe:
    try:
        return BUILTIN_RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown quantization recipe {name!r}; choose one of "
                         f"{', '.join(BUILTIN_RECIPES)} or pass --recipe-file") from None


@dataclass
class QuantPlan:
    """A recipe resolved against one model: a setting (or None = bf16) for every weight matrix."""

    recipe: QuantRecipe
    default: LayerSetting
    layers: dict[str, Optional[LayerSetting]]
    # decoder linears kept in bf16 because the group size does not divide their input width
    indivisible: list[str] = field(default_factory=list)
    unused_overrides: list[Override] = field(default_factory=list)

    def description(self) -> dict:
        """The ``quantization`` block of config.json: defaults plus every layer that differs."""
        block: dict = {"mode": MODE, "bits": self.default.bits, "group_size": self.default.group_size}
        for path, setting in sorted(self.layers.items()):
            if setting is None:
                block[path] = KEEP
            elif setting != self.default or not is_decoder_linear(path):
                # the loader quantizes a non-decoder layer (embed_tokens) only when it is named
                block[path] = setting.to_dict()
        return block

    def notices(self) -> list[str]:
        out = []
        if self.indivisible:
            out.append(f"group size {self.default.group_size} does not divide the input width of "
                       f"{len(self.indivisible)} layer(s); kept in bf16: {', '.join(self.indivisible)}")
        for o in self.unused_overrides:
            out.append(f"recipe {self.recipe.name}: override {o.to_dict()} matches no decoder linear")
        return out


def resolve_plan(recipe: QuantRecipe, matrices: dict[str, int], num_layers: int,
                 bits: Optional[int] = None, group_size: Optional[int] = None) -> QuantPlan:
    """Settings for ``matrices`` (module path -> input width) under ``recipe``.

    ``bits``/``group_size`` are the caller's (command-line) choices; a recipe that fixes its
    bits refuses a different ``bits`` rather than silently changing meaning.
    """
    if bits is not None:
        check_bits(bits)
        if recipe.bits is not None and bits != recipe.bits:
            raise ValueError(f"recipe {recipe.name} is {recipe.bits}-bit; drop --bits {bits} "
                             f"or write a recipe file with the bits you want")
    chosen_bits = recipe.bits if bits is None else bits
    if chosen_bits is None:
        raise ValueError(f"recipe {recipe.name} needs --bits (one of {', '.join(map(str, SUPPORTED_BITS))})")
    chosen_group = group_size or recipe.group_size or DEFAULT_GROUP_SIZE
    check_group_size(chosen_group)
    default = LayerSetting(chosen_bits, chosen_group)
    layers: dict[str, Optional[LayerSetting]] = {}
    indivisible, used = [], set()
    for path, in_dims in sorted(matrices.items()):
        if path == EMBEDDINGS and recipe.quantize_embeddings:
            # an embedding quantizes along its hidden width, which the group size must divide
            layers[path] = None if in_dims % default.group_size else default
            if layers[path] is None:
                indivisible.append(path)
            continue
        if not is_decoder_linear(path):
            layers[path] = None
            continue
        setting: Optional[LayerSetting] = default
        for i, rule in enumerate(recipe.overrides):
            if rule.matches(path, num_layers):
                used.add(i)
                setting = None if rule.bits == KEEP else LayerSetting(rule.bits, rule.group_size or chosen_group)
                break
        if setting is not None and in_dims % setting.group_size:
            indivisible.append(path)
            setting = None
        layers[path] = setting
    unused = [o for i, o in enumerate(recipe.overrides) if i not in used]
    return QuantPlan(recipe, default, layers, indivisible, unused)


def plan_from_description(block: dict, matrices: dict[str, int]) -> dict[str, Optional[LayerSetting]]:
    """Read a config.json ``quantization`` block back into per-layer settings.

    Layers without an entry take the defaults only if they are decoder linears: anything else
    is quantized only when the block names it explicitly.
    """
    if not isinstance(block, dict):
        raise ValueError("config.json: quantization must be an object")
    mode = block.get("mode", MODE)
    if mode != MODE:
        raise ValueError(f"config.json: quantization.mode {mode!r} is not supported (only {MODE!r})")
    for key in ("bits", "group_size"):
        if not isinstance(block.get(key), int):
            raise ValueError(f"config.json: quantization.{key} is missing; the folder does not say how it "
                             f"was quantized (re-convert it with hidream-mlx quantize)")
    default = LayerSetting(block["bits"], block["group_size"])
    out: dict[str, Optional[LayerSetting]] = {}
    for path in matrices:
        entry = block.get(path, None)
        if entry == KEEP or entry is False:
            out[path] = None
        elif isinstance(entry, dict):
            out[path] = LayerSetting(int(entry.get("bits", default.bits)),
                                     int(entry.get("group_size", default.group_size)))
        else:
            out[path] = default if is_decoder_linear(path) else None
    return out


def weight_matrices(model: nn.Module) -> dict[str, int]:
    """Module path -> input width of every linear and embedding of a model skeleton."""
    return {path: m.weight.shape[1] for path, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Embedding))}


def apply_plan(model: nn.Module, layers: dict[str, Optional[LayerSetting]]) -> None:
    """Swap the planned modules for quantized ones (quantizing whatever weights they hold)."""

    def predicate(path: str, module: nn.Module):
        setting = layers.get(path)
        if setting is None or not hasattr(module, "to_quantized"):
            return False
        return {"bits": setting.bits, "group_size": setting.group_size, "mode": MODE}

    nn.quantize(model, class_predicate=predicate)


def quantize_loaded(model: nn.Module, layers: dict[str, Optional[LayerSetting]]) -> None:
    """Quantize loaded float weights exactly as the converter does (bf16 weights in, bf16 scales
    and biases), then give the scales the model's dtype, so ``-q B`` equals a converted folder."""
    modules = dict(model.named_modules())
    dtypes = {}
    for path, setting in layers.items():
        if setting is not None and path in modules:
            dtypes[path] = modules[path].weight.dtype
            modules[path].weight = modules[path].weight.astype(mx.bfloat16)
    apply_plan(model, layers)
    for path, module in model.named_modules():
        if path in dtypes:
            module.scales = module.scales.astype(dtypes[path])
            module.biases = module.biases.astype(dtypes[path])


def quantize_weight(weight: mx.array, setting: LayerSetting) -> tuple[mx.array, mx.array, mx.array]:
    """Packed weight, scales and biases, the same bytes whether converted or quantized at load.

    The weight is rounded to bf16 first, so a float32 checkpoint converts to exactly what
    loading it in bf16 and quantizing in memory gives.
    """
    return mx.quantize(weight.astype(mx.bfloat16), group_size=setting.group_size, bits=setting.bits,
                       mode=MODE)


@dataclass(frozen=True)
class LoadPlan:
    """How a model loads quantized: the setting (or None = floats) of every weight matrix, the
    ``quantization`` block it runs with, and whether the folder already holds the quantized
    tensors (``stored``) or each float weight is quantized as it is read (``-q BITS``)."""

    layers: dict[str, Optional[LayerSetting]]
    description: dict
    stored: bool


def load_plan(model: nn.Module, stored: Optional[dict] = None, bits: Optional[int] = None,
              group_size: int = DEFAULT_GROUP_SIZE) -> Optional[LoadPlan]:
    """The plan for loading into ``model`` (a float skeleton): a folder's stored ``quantization``
    block, or ``-q BITS`` with the flat recipe (the same rules as ``hidream-mlx quantize``);
    None when neither is given."""
    matrices = weight_matrices(model)
    if stored:
        stored_bits = stored.get("bits") if isinstance(stored, dict) else None
        if bits is not None and bits != stored_bits:
            raise ValueError(f"this folder is already quantized to {stored_bits} bits; drop -q or convert "
                             f"from the original checkpoint")
        return LoadPlan(plan_from_description(stored, matrices), stored, stored=True)
    if bits is None:
        return None
    check_bits(bits, "-q/--quantize")
    check_group_size(group_size)
    if bits_warning(bits):
        warnings.warn(bits_warning(bits), stacklevel=2)
    plan = resolve_plan(BUILTIN_RECIPES["flat"], matrices, len(model.language_model.layers), bits, group_size)
    return LoadPlan(plan.layers, plan.description(), stored=False)


def quantize_tensor(path: str, weight: mx.array, setting: LayerSetting, dtype: mx.Dtype) -> list[tuple[str, mx.array]]:
    """One float weight of module ``path`` as the parameters of its quantized layer: the
    converter's bytes (``quantize_weight``), scales and biases in the load dtype, so ``-q B``
    equals loading a converted folder bit for bit."""
    packed, scales, biases = quantize_weight(weight, setting)
    return [(f"{path}.weight", packed), (f"{path}.scales", scales.astype(dtype)),
            (f"{path}.biases", biases.astype(dtype))]


def quantize_in_memory(model: nn.Module, bits: int, group_size: int = DEFAULT_GROUP_SIZE) -> dict:
    """``-q BITS`` on a model already holding float weights (random weights for benchmarks):
    apply the flat plan to the module; returns the quantization block."""
    check_bits(bits, "-q/--quantize")
    plan = load_plan(model, bits=bits, group_size=group_size)
    quantize_loaded(model, plan.layers)
    return plan.description
