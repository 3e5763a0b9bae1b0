"""Quantization recipes: what a user asks for, before it meets a model's layers.

A *recipe* gives default bits and group size, then overrides (first match wins) that move single
layers or blocks to other bits or keep them in bf16. ``plans.resolve_plan`` resolves a recipe
against one model's layers; this module only holds the vocabulary (widths, group sizes, the
``"bf16"`` keep marker), the validation of user input and the built-in recipes.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Union

from hidream_mlx.files import read_json_file

MODE = "affine"
SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)  # every width MLX's affine mode packs
LOW_QUALITY_BITS = (2, 3)  # below 4 bits the rounding error is visible in the image
GROUP_SIZES = (32, 64, 128)
# The one default group size (quantize, -q, info, the text encoders): mlx-lm's default, and a
# divisor of every real layer width of both families.
DEFAULT_GROUP_SIZE = 64
KEEP = "bf16"  # a plan / config entry meaning: not quantized, stored as bf16


@dataclass(frozen=True)
class LayerSetting:
    bits: int
    group_size: int

    def to_dict(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size}


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
    ``layers`` picks layers by index (decoder layers for O1, blocks in run order for I1;
    negative counts from the end). Both given: both must match. ``bits`` is a width or ``"bf16"``."""

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

    def matches(self, path: str, num_layers: int, layer_index: Callable[[str], Optional[int]]) -> bool:
        if self.layers is not None:
            index = layer_index(path)
            if index is None or not any(i % num_layers == index for i in self.layers
                                        if -num_layers <= i < num_layers):
                return False
        return self.pattern is None or self.names(path)

    def names(self, path: str) -> bool:
        """True when the pattern (not just a layer range) matches ``path``."""
        if self.pattern is None:
            return False
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
        data = read_json_file(path, "recipe file")
        recipe = cls.from_dict(data, str(path))
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
    # (docs/model.md, *Quantization: what users measured*) for ~1 GB (bf16 edges) — at 8 bits the edges cost half that.
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
