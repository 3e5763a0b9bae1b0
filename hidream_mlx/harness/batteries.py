"""Battery files and variant specs: parsing and validation, before any model is loaded.

A battery is JSONL, one prompt per line: ``id`` and ``prompt``, optionally ``genre``, ``seed``,
``size`` ("WxH"), ``steps``, ``guidance``, ``recipe``, a free-text ``note``, and to start from an
image ``init_image``, ``strength``, ``mask`` and ``mask_blur`` (file paths relative to the battery
file; the request builder checks the files and numbers once the model is known). A variant is a
named set of setting overrides, ``NAME:key=value,...`` with keys from :data:`VARIANT_KEYS`.
Every problem is reported with the file and line, or the variant, it comes from.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from hidream_mlx.families import option_choices, recipe_names
from hidream_mlx.family import RANGES, START_OPTIONS
from hidream_mlx.files import parse_json, read_text_file
from hidream_mlx.weights.lora_specs import checked_specs, specs_from_json

VARIANT_KEYS = ("steps", "guidance", "size", "recipe", "shift", "blend_seams", "noise", "snap",
                "seam_smoothing", "seam_window", "seam_strength", "strength")
BATTERY_FIELDS = ("id", "prompt", "genre", "seed", "size", "steps", "guidance", "recipe", "note", "loras",
                  "init_image", "strength", "mask", "mask_blur")
START_FIELDS = START_OPTIONS  # passed to the request builder as they are
DEFAULT_SIZE = (1024, 1024)  # the size the seeds' batteries were run at
DEFAULT_SEED = 42
# Ids and variant names become file and folder names.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


# --- values shared by battery lines and variants ---------------------------------------------

def parse_size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
    if not match:
        raise ValueError(f"size must look like 1024x768, got {text!r}")
    return int(match.group(1)), int(match.group(2))


def _positive_int(key: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{key} must be a positive integer, got {value!r}")
    return value


def _number(key: str, value, minimum: float, inclusive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key} must be a number, got {value!r}")
    if value < minimum or (not inclusive and value == minimum):
        raise ValueError(f"{key} must be {'at least' if inclusive else 'above'} {minimum:g}, got {value!r}")
    return float(value)


def _recipe_name(value) -> str:
    """A recipe of any family; the request builder checks it against the model."""
    name = str(value)
    if name not in recipe_names():
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(recipe_names())}")
    return name


def _check_name(kind: str, name) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"{kind} {name!r} must be letters, digits, '_', '-' or '.', starting with a letter or digit")
    return name


# --- batteries ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class BatteryItem:
    id: str
    prompt: str
    genre: str = ""
    seed: Optional[int] = None
    size: Optional[tuple[int, int]] = None
    steps: Optional[int] = None
    guidance: Optional[float] = None
    recipe: Optional[str] = None
    note: str = ""
    loras: tuple = ()  # LoRASpec per LoRA this item runs with ("loras": [{"path", "scale"}])
    init_image: Optional[str] = None  # the start image (a path, resolved against the battery's folder)
    strength: Optional[float] = None
    mask: Optional[str] = None
    mask_blur: Optional[int] = None
    where: str = field(default="", compare=False)  # "FILE:LINE", for errors found once the model is known

    def settings(self) -> dict:
        keys = ("size", "steps", "guidance", "recipe", *START_FIELDS)
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


def _battery_item(entry: dict) -> BatteryItem:
    if not isinstance(entry, dict):
        raise ValueError("expected a JSON object")
    unknown = sorted(set(entry) - set(BATTERY_FIELDS))
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r}; allowed: {', '.join(BATTERY_FIELDS)}")
    for required in ("id", "prompt"):
        if required not in entry:
            raise ValueError(f"missing {required!r}")
    prompt = entry["prompt"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("'prompt' must be a non-empty string")
    seed = entry.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return BatteryItem(
        id=_check_name("id", entry["id"]),
        prompt=prompt,
        genre=str(entry.get("genre", "")),
        seed=seed,
        size=parse_size(entry["size"]) if "size" in entry else None,
        steps=_positive_int("steps", entry["steps"]) if "steps" in entry else None,
        guidance=_number("guidance", entry["guidance"], 0.0) if "guidance" in entry else None,
        recipe=_recipe_name(entry["recipe"]) if "recipe" in entry else None,
        note=str(entry.get("note", "")),
        loras=tuple(checked_specs(specs_from_json(entry["loras"], "item"))) if "loras" in entry else (),
        **{key: entry[key] for key in START_FIELDS if key in entry},
    )


def _start_files(item: BatteryItem, folder: Path) -> BatteryItem:
    """``item`` with its image paths taken from the battery's ``folder`` (absolute ones stay)."""
    files = {}
    for key in ("init_image", "mask"):
        value = getattr(item, key)
        if value is None:
            continue
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{key} must be an image file path, got {value!r}")
        files[key] = str(folder / value)
    return dataclasses.replace(item, **files)


def read_battery(path: Path | str) -> list[BatteryItem]:
    """Parse a JSONL battery; any problem is reported as ``FILE:LINE: what is wrong``."""
    path = Path(path)
    items, seen = [], {}
    for number, line in enumerate(read_text_file(path, "battery file").splitlines(), start=1):
        if not line.strip():
            continue
        entry = parse_json(line, f"{path}:{number}", "the line")
        try:
            item = _start_files(_battery_item(entry), path.parent)
        except ValueError as e:
            raise ValueError(f"{path}:{number}: {e}") from None
        if item.id in seen:
            raise ValueError(f"{path}:{number}: id {item.id!r} already used on line {seen[item.id]}")
        seen[item.id] = number
        items.append(dataclasses.replace(item, where=f"{path}:{number}"))
    if not items:
        raise ValueError(f"{path}: the battery has no prompts")
    return items


# --- variants ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    name: str
    overrides: dict = field(default_factory=dict)
    where: str = field(default="", compare=False)  # "FILE:LINE" when it came from a variants file

    def spec(self) -> str:
        body = ",".join(f"{k}={_format_value(v)}" for k, v in self.overrides.items())
        return f"{self.name}:{body}" if body else self.name


DEFAULT_VARIANT = Variant("default")


def _format_value(value) -> str:
    if isinstance(value, tuple):
        return f"{value[0]}x{value[1]}"
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _parse_number(key: str, text: str, kind: type):
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{key} must be {'an integer' if kind is int else 'a number'}, got {text!r}") from None


def _variant_value(key: str, text: str):
    if key == "steps":
        return _positive_int(key, _parse_number(key, text, int))
    if key in ("guidance", "shift"):
        return _number(key, _parse_number(key, text, float), 0.0, inclusive=(key == "guidance"))
    if key == "strength":
        value = _parse_number(key, text, float)
        if not RANGES[key].contains(value):
            raise ValueError(f"strength must be {RANGES[key].text()}, got {value}")
        return value
    if key == "blend_seams":
        radius = _parse_number(key, text, int)
        if not RANGES[key].contains(radius):
            raise ValueError(f"blend_seams must be between {RANGES[key].low} and {RANGES[key].high}, got {radius}")
        return radius
    if key == "seam_window":
        if text not in option_choices(key):
            raise ValueError(f"--seam-window must be one of {', '.join(option_choices(key))}, got {text!r}")
        return text
    if key.startswith("seam_"):
        value = _parse_number(key, text, float)
        if not RANGES[key].contains(value):
            raise ValueError(f"--{key.replace('_', '-')} must be between 0 and 1, got {value}")
        return value
    if key == "size":
        return parse_size(text)
    if key == "recipe":
        return _recipe_name(text)
    if key == "noise":
        if text not in option_choices(key):
            raise ValueError(f"noise must be {' or '.join(option_choices(key))}, got {text!r}")
        return text
    if text.lower() in _TRUE + _FALSE:  # snap
        return text.lower() in _TRUE
    raise ValueError(f"snap must be true or false, got {text!r}")


def parse_variant(spec: str) -> Variant:
    """``NAME`` or ``NAME:key=value,key=value`` with keys from :data:`VARIANT_KEYS`."""
    name, _, body = spec.strip().partition(":")
    _check_name("variant name", name.strip())
    overrides = {}
    for part in filter(None, (p.strip() for p in body.split(","))):
        key, eq, value = part.partition("=")
        key = key.strip()
        if key not in VARIANT_KEYS:
            raise ValueError(f"variant {name!r}: unknown key {key!r}; allowed: {', '.join(VARIANT_KEYS)}")
        if not eq or not value.strip():
            raise ValueError(f"variant {name!r}: {key} needs a value ({key}=...)")
        if key in overrides:
            raise ValueError(f"variant {name!r}: {key} given twice")
        overrides[key] = _variant_value(key, value.strip())
    return Variant(name.strip(), overrides)


def read_variants_file(path: Path | str) -> list[str]:
    """Variant specs, one per line; blank lines and ``#`` comments are skipped. A bad spec is
    reported as ``FILE:LINE: what is wrong``."""
    return [spec for spec, _ in variant_lines(path)]


def variant_lines(path: Path | str) -> list[tuple[str, str]]:
    """:func:`read_variants_file`'s specs, each with its ``FILE:LINE`` (for :func:`parse_variants`)."""
    path = Path(path)
    specs = []
    for number, line in enumerate(read_text_file(path, "variants file").splitlines(), start=1):
        spec = line.split("#", 1)[0].strip()
        if not spec:
            continue
        try:
            parse_variant(spec)
        except ValueError as e:
            raise ValueError(f"{path}:{number}: {e}") from None
        specs.append((spec, f"{path}:{number}"))
    return specs


def parse_variants(specs: list[str], origins: Optional[dict[str, str]] = None) -> list[Variant]:
    """``origins``: spec -> ``FILE:LINE`` for specs read from a variants file."""
    origins = origins or {}
    variants = [dataclasses.replace(parse_variant(s), where=origins.get(s, "")) for s in specs] or [DEFAULT_VARIANT]
    names = [v.name for v in variants]
    for name in names:
        if names.count(name) > 1:
            raise ValueError(f"variant {name!r} is given more than once")
    return variants


def parse_seeds(text: Optional[str]) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds):
        raise ValueError(f"--seeds must be non-negative integers, got {text!r}")
    return list(dict.fromkeys(seeds))
