"""Which layers of a model get quantized to how many bits: a recipe resolved against its layers.

A *plan* maps module path -> ``LayerSetting`` or ``None`` (kept as floats). It is what the
converter writes, what ``config.json`` stores (mlx-lm style: ``mode``, ``bits``, ``group_size``
plus one entry per layer that differs) and what the loader reads back, so a converted folder
loads with no flags.

Each family has a *layer scheme*: the layers quantized at the default bits, and the layers a
recipe may quantize only by naming them with a pattern.

* O1: only the decoder's attention and MLP projections. The pixel shims (``x_embedder``,
  ``t_embedder1``, ``final_layer2``), the norms, the biases and ``embed_tokens`` stay in bf16:
  error in the shims lands directly on the pixels (flat Q4 darkens images: docs/model.md, *Quantization*), and
  ``embed_tokens`` (a lookup run once per prompt) is quantized only on request.
* I1: every linear inside the double and single stream blocks: attention q/k/v/out of both
  streams, the routed and shared experts, the text FFN and the blocks' adaLN modulation (15% of
  the weights; quantizing it is what brings 17B to ~10 GB at 4 bits). The MoE gate (a softmax
  over 4 logits: routing must not flip), norms, embedders, caption projections and the final
  layer stay unquantized; a recipe override whose pattern names an embedder, a caption
  projection or the final layer quantizes it. The gate never is.

A layer whose input width the group size does not divide stays unquantized and is listed in
``QuantPlan.indivisible`` (``quantize`` and ``info`` print it).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

import mlx.nn as nn

from hidream_mlx.quant.recipes import (
    BUILTIN_RECIPES,
    DEFAULT_GROUP_SIZE,
    KEEP,
    MODE,
    LayerSetting,
    Override,
    QuantRecipe,
    bits_warning,
    check_bits,
    check_group_size,
    SUPPORTED_BITS,
)

EMBEDDINGS = "language_model.embed_tokens"

_DECODER_LINEAR = re.compile(
    r"language_model\.layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)")
_I1_BLOCK_LINEAR = re.compile(
    r"(double|single)_stream_blocks\.(\d+)\.block\.(attn1\.to_(q|k|v|out)(_t)?|ff_i\.experts\.\d+\.w[123]"
    r"|ff_i\.shared_experts\.w[123]|ff_t\.w[123]|adaLN_modulation\.1)")
_I1_OPTIONAL = re.compile(
    r"caption_projection\.\d+\.linear|x_embedder\.proj|[tp]_embedder\.\w+\.linear_[12]"
    r"|final_layer\.(linear|adaLN_modulation\.1)")
_I1_BLOCK = re.compile(r"(double|single)_stream_blocks\.(\d+)\.")


def is_decoder_linear(path: str) -> bool:
    """The only layers an O1 recipe may quantize: the decoder's attention and MLP projections."""
    return _DECODER_LINEAR.fullmatch(path) is not None


def decoder_layer_index(path: str) -> Optional[int]:
    m = _DECODER_LINEAR.fullmatch(path)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class LayerScheme:
    """What one family quantizes: ``default`` layers at the plan's bits, ``optional`` ones only
    when an override's pattern names them; ``layers(matrices)`` -> (count, path -> index) for the
    ``layers`` key of overrides."""

    family: str
    what: str  # what the default layers are called, for notices
    default: Callable[[str], bool]
    optional: Callable[[str], bool]
    layers: Callable[[Mapping[str, int]], tuple[int, Callable[[str], Optional[int]]]]


def _o1_layers(matrices: Mapping[str, int]):
    indices = {decoder_layer_index(p) for p in matrices} - {None}
    return (max(indices) + 1 if indices else 0), decoder_layer_index


def _i1_layers(matrices: Mapping[str, int]):
    """Blocks in run order: double 0..N-1, then single 0..M-1 as N..N+M-1."""
    found = {"double": set(), "single": set()}
    for path in matrices:
        m = _I1_BLOCK.match(path)
        if m:
            found[m.group(1)].add(int(m.group(2)))
    doubles = max(found["double"]) + 1 if found["double"] else 0
    singles = max(found["single"]) + 1 if found["single"] else 0

    def index(path: str) -> Optional[int]:
        m = _I1_BLOCK.match(path)
        if not m:
            return None
        return int(m.group(2)) + (doubles if m.group(1) == "single" else 0)

    return doubles + singles, index


O1_LAYERS = LayerScheme("o1", "decoder linear", is_decoder_linear, lambda path: False, _o1_layers)
I1_LAYERS = LayerScheme("i1", "quantizable layer", lambda p: _I1_BLOCK_LINEAR.fullmatch(p) is not None,
                        lambda p: _I1_OPTIONAL.fullmatch(p) is not None, _i1_layers)
SCHEMES = {"o1": O1_LAYERS, "i1": I1_LAYERS}


@dataclass
class QuantPlan:
    """A recipe resolved against one model: a setting (or None = bf16) for every weight matrix."""

    recipe: QuantRecipe
    default: LayerSetting
    layers: dict[str, Optional[LayerSetting]]
    # layers kept in bf16 because the group size does not divide their input width
    indivisible: list[str] = field(default_factory=list)
    unused_overrides: list[Override] = field(default_factory=list)
    scheme: LayerScheme = O1_LAYERS

    def description(self) -> dict:
        """The ``quantization`` block of config.json: defaults plus every layer that differs."""
        block: dict = {"mode": MODE, "bits": self.default.bits, "group_size": self.default.group_size}
        for path, setting in sorted(self.layers.items()):
            if setting is None:
                block[path] = KEEP
            elif setting != self.default or not self.scheme.default(path):
                # the loader quantizes a layer outside the scheme's default set only when it is named
                block[path] = setting.to_dict()
        return block

    def notices(self) -> list[str]:
        out = []
        if self.indivisible:
            out.append(f"group size {self.default.group_size} does not divide the input width of "
                       f"{len(self.indivisible)} layer(s); kept in bf16: {', '.join(self.indivisible)}")
        for o in self.unused_overrides:
            out.append(f"recipe {self.recipe.name}: override {o.to_dict()} matches no {self.scheme.what}")
        return out


def resolve_plan(recipe: QuantRecipe, matrices: Mapping[str, int], num_layers: Optional[int] = None,
                 bits: Optional[int] = None, group_size: Optional[int] = None,
                 scheme: LayerScheme = O1_LAYERS) -> QuantPlan:
    """Settings for ``matrices`` (module path -> input width) under ``recipe``.

    ``bits``/``group_size`` are the caller's (command-line) choices; a recipe that fixes its
    bits refuses a different ``bits`` rather than silently changing meaning. ``num_layers``
    (what negative ``layers`` indices count from) defaults to the count the matrices show.
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
    counted, layer_index = scheme.layers(matrices)
    num_layers = counted if num_layers is None else num_layers
    layers: dict[str, Optional[LayerSetting]] = {}
    indivisible, used = [], set()
    for path, in_dims in sorted(matrices.items()):
        if path == EMBEDDINGS and recipe.quantize_embeddings:
            # an embedding quantizes along its hidden width, which the group size must divide
            layers[path] = None if in_dims % default.group_size else default
            if layers[path] is None:
                indivisible.append(path)
            continue
        by_default = scheme.default(path)
        if not by_default and not scheme.optional(path):
            layers[path] = None
            continue
        setting: Optional[LayerSetting] = default if by_default else None
        for i, rule in enumerate(recipe.overrides):
            if (by_default or rule.names(path)) and rule.matches(path, num_layers, layer_index):
                used.add(i)
                setting = None if rule.bits == KEEP else LayerSetting(rule.bits, rule.group_size or chosen_group)
                break
        if setting is not None and in_dims % setting.group_size:
            indivisible.append(path)
            setting = None
        layers[path] = setting
    unused = [o for i, o in enumerate(recipe.overrides) if i not in used]
    return QuantPlan(recipe, default, layers, indivisible, unused, scheme)


def plan_from_description(block: dict, matrices: Mapping[str, int],
                          scheme: LayerScheme = O1_LAYERS) -> dict[str, Optional[LayerSetting]]:
    """Read a config.json ``quantization`` block back into per-layer settings.

    Layers without an entry take the defaults only if the scheme quantizes them by default:
    anything else is quantized only when the block names it explicitly.
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
            out[path] = default if scheme.default(path) else None
    return out


def weight_matrices(model: nn.Module) -> dict[str, int]:
    """Module path -> input width of every linear and embedding of a model skeleton."""
    return {path: m.weight.shape[1] for path, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Embedding))}


def index_matrices(index: Mapping, strip: str = "") -> dict[str, int]:
    """Module path -> input width of every 2-D ``.weight`` in a safetensors header index
    (name -> anything with ``.shape``); ``strip`` is a prefix the names carry (``model.``)."""
    out = {}
    for name, info in index.items():
        if name.endswith(".weight") and len(info.shape) == 2:
            path = name[len(strip):] if strip and name.startswith(strip) else name
            out[path[: -len(".weight")]] = int(info.shape[1])
    return out


def flat_plan(matrices: Mapping[str, int], bits: int, group_size: int = DEFAULT_GROUP_SIZE,
              scheme: LayerScheme = O1_LAYERS) -> QuantPlan:
    """What ``-q BITS`` (and ``quantize --bits BITS`` with no recipe) does to these layers.

    ``plan.indivisible`` is the list of layers the group size leaves unquantized, ``plan.layers``
    the setting of every weight matrix (for sizing a load without reading a weight)."""
    return resolve_plan(BUILTIN_RECIPES["flat"], matrices, None, bits, group_size, scheme)


def unquantized_layers(index: Mapping, family: str, bits: int, group_size: int = DEFAULT_GROUP_SIZE) -> list[str]:
    """The layers ``-q BITS`` keeps in floats only because the group size does not divide their
    input width, for a header index (O1 names with ``model.``, I1 transformer names as stored)."""
    strip = "model." if family == "o1" else ""
    return flat_plan(index_matrices(index, strip), bits, group_size, SCHEMES[family]).indivisible


@dataclass(frozen=True)
class LoadPlan:
    """How a model loads quantized: the setting (or None = floats) of every weight matrix, the
    ``quantization`` block it runs with, and whether the folder already holds the quantized
    tensors (``stored``) or each float weight is quantized as it is read (``-q BITS``)."""

    layers: dict[str, Optional[LayerSetting]]
    description: dict
    stored: bool
    indivisible: tuple[str, ...] = ()


def check_requested_bits(stored: Optional[dict], bits: Optional[int]) -> None:
    """``-q BITS`` on a folder that is already quantized: the same width changes nothing, another
    one is refused (re-quantizing quantized weights would compound the error)."""
    stored_bits = stored.get("bits") if isinstance(stored, dict) else None
    if stored and bits is not None and bits != stored_bits:
        raise ValueError(f"this folder is already quantized to {stored_bits} bits; drop -q or convert "
                         f"from the original checkpoint")


def load_plan(model: nn.Module, stored: Optional[dict] = None, bits: Optional[int] = None,
              group_size: int = DEFAULT_GROUP_SIZE, scheme: LayerScheme = O1_LAYERS) -> Optional[LoadPlan]:
    """The plan for loading into ``model`` (a float skeleton): a folder's stored ``quantization``
    block, or ``-q BITS`` with the flat recipe (the same rules as ``hidream-mlx quantize``);
    None when neither is given."""
    matrices = weight_matrices(model)
    if stored:
        check_requested_bits(stored, bits)
        return LoadPlan(plan_from_description(stored, matrices, scheme), stored, stored=True)
    if bits is None:
        return None
    check_bits(bits, "-q/--quantize")
    check_group_size(group_size)
    if bits_warning(bits):
        warnings.warn(bits_warning(bits), stacklevel=2)
    plan = flat_plan(matrices, bits, group_size, scheme)
    return LoadPlan(plan.layers, plan.description(), stored=False, indivisible=tuple(plan.indivisible))
