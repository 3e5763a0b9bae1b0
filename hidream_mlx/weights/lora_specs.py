"""What a user asks of LoRAs: files (``--lora``, a battery's ``"loras"``) with their strengths,
checked before any weight loads. Reading and applying them is ``lora.py``'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from hidream_mlx.files import check_regular_file
from hidream_mlx.weights.lora_keys import LoRAError

MAX_LORA_SCALE = 100.0  # --lora-scale's range, as the other strengths (--guidance, --shift) have theirs


@dataclass(frozen=True)
class LoRASpec:
    path: Path
    scale: float = 1.0


def check_scale(value, what: str = "--lora-scale") -> float:
    """A LoRA strength checked like every other number: finite and within +-MAX_LORA_SCALE."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LoRAError(f"{what} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise LoRAError(f"{what} must be a finite number, got {value}")
    if abs(value) > MAX_LORA_SCALE:
        raise LoRAError(f"{what} must be >= {-MAX_LORA_SCALE:g} and <= {MAX_LORA_SCALE:g}, got {value:g}")
    return float(value)


def parse_lora_options(paths: Sequence, scales: Sequence[float] = ()) -> list[LoRASpec]:
    """Pair ``--lora`` paths with ``--lora-scale`` values in order; missing scales are 1.0."""
    if len(scales) > len(paths):
        raise LoRAError(f"{len(scales)} LoRA scales given for {len(paths)} LoRA files")
    specs = []
    for i, p in enumerate(paths):
        scale = check_scale(scales[i]) if i < len(scales) else 1.0
        specs.append(LoRASpec(Path(p), scale))
    return specs


def specs_from_json(items, where: str) -> list[LoRASpec]:
    """``"loras": [{"path": ..., "scale": ...}]`` as a battery job writes it."""
    if not isinstance(items, list):
        raise LoRAError(f"{where}.loras must be a list of {{\"path\", \"scale\"}} objects")
    specs = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "path" not in item or set(item) - {"path", "scale"}:
            raise LoRAError(f"{where}.loras[{i}] must be an object with \"path\" and an optional \"scale\"")
        if not isinstance(item["path"], str):
            raise LoRAError(f"{where}.loras[{i}].path must be a file name, got {item['path']!r}")
        scale = check_scale(item.get("scale", 1.0), f"{where}.loras[{i}].scale")
        specs.append(LoRASpec(Path(item["path"]), scale))
    return specs


def check_path(path: Path | str) -> Path:
    """A LoRA path that names a regular ``.safetensors`` file (never a FIFO or device to block on)."""
    path = Path(path)
    try:
        check_regular_file(path, "LoRA file")
    except (OSError, ValueError) as e:
        raise LoRAError(str(e)) from None
    if path.suffix != ".safetensors":
        raise LoRAError(f"{path}: LoRAs are read from .safetensors files only")
    return path


def checked_specs(specs: Sequence[LoRASpec]) -> list[LoRASpec]:
    """``specs`` with every file checked to exist, so a typo fails before the weights load."""
    for spec in specs:
        check_path(spec.path)
    return list(specs)
