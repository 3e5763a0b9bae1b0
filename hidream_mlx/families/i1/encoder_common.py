"""What the four I1 text encoders share: config reading, strict loading, quantization, activations.

Each encoder folder (``text_encoder{,_2,_3,_4}/``) is loaded strictly: every parameter of our
skeleton must be in the safetensors with its shape, and nothing else may be there (so a folder
for another architecture fails naming the first odd tensor, not deep inside a matmul).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable, Optional

import mlx.core as mx
import mlx.nn as nn

from hidream_mlx.weights.loading import (
    ModelLoadError,
    TensorInfo,
    assign,
    check_against,
    checkpoint_index,
    load_tensors,
    select_tensors,
)
from hidream_mlx.quant.recipes import DEFAULT_GROUP_SIZE, GROUP_SIZES, MODE

ENCODER_BITS = (4, 8)


def read_json_config(folder: Path, what: str) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{folder}: no config.json (not a {what} folder)")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from None


def require(config: dict, key: str, where: str):
    if key not in config:
        raise ModelLoadError(f"{where}: config.json has no {key!r}")
    return config[key]


def activation(name: str) -> Callable[[mx.array], mx.array]:
    """The transformers activation names the encoders use."""
    table = {
        "quick_gelu": lambda x: x * mx.sigmoid(1.702 * x),
        "gelu": nn.gelu,  # exact (erf)
        "gelu_new": nn.gelu_approx,  # tanh approximation
        "gelu_pytorch_tanh": nn.gelu_approx,
        "relu": nn.relu,
        "silu": nn.silu,
    }
    try:
        return table[name]
    except KeyError:
        raise ModelLoadError(f"unsupported activation {name!r}; known: {', '.join(table)}") from None


def encoder_tensors(folder: Path, strip_model_prefix: bool,
                    drop: Iterable[str] = (), aliases: Optional[dict[str, str]] = None
                    ) -> dict[str, TensorInfo]:
    """The folder's tensors by module path: ``model.`` stripped (Llama) or names as stored.

    ``drop`` names known non-parameter buffers; ``aliases`` maps a stored name to ours when the
    ours is absent (a tied table saved under its other name).
    """
    index = checkpoint_index(Path(folder))
    if strip_model_prefix:
        tensors = select_tensors(index, lambda name: True)
    else:
        tensors = dict(index)
    for name in drop:
        tensors.pop(name, None)
    for stored, ours in (aliases or {}).items():
        if stored in tensors:
            info = tensors.pop(stored)
            tensors.setdefault(ours, info)
    return tensors


def load_encoder(module: nn.Module, folder: Path, dtype: mx.Dtype, tensors: dict[str, TensorInfo],
                 strip_model_prefix: bool, lazy: bool = True) -> nn.Module:
    """Strict check, then the weights into ``module`` (mapped lazily unless ``lazy`` is False)."""
    check_against(module, tensors, Path(folder), prefix="model." if strip_model_prefix else "")
    assign(module, load_tensors(tensors, dtype), lazy=lazy)
    return module


def check_quant_args(bits: int, group_size: int) -> None:
    if isinstance(bits, bool) or bits not in ENCODER_BITS:
        raise ValueError(f"text encoder quantization: unsupported bits {bits!r}; choose "
                         f"{' or '.join(map(str, ENCODER_BITS))}")
    if isinstance(group_size, bool) or group_size not in GROUP_SIZES:
        raise ValueError(f"text encoder quantization: unsupported group size {group_size!r}; "
                         f"choose {', '.join(map(str, GROUP_SIZES))}")


def quantize_linears(module: nn.Module, bits: int, group_size: int = DEFAULT_GROUP_SIZE) -> list[str]:
    """Quantize every ``nn.Linear`` whose input width the group size divides; returns the paths
    kept in floats. Embedding tables stay floats: a lookup run once per prompt gains no speed."""
    check_quant_args(bits, group_size)
    kept: list[str] = []

    def predicate(path: str, m: nn.Module) -> bool:
        if not isinstance(m, nn.Linear):
            return False
        if m.weight.shape[1] % group_size:
            kept.append(path)
            return False
        return True

    nn.quantize(module, group_size=group_size, bits=bits, class_predicate=predicate)
    # One layer at a time: evaluating all at once would hold every float weight at the peak.
    for _, m in module.named_modules():
        if isinstance(m, nn.QuantizedLinear):
            mx.eval(m.parameters())
    return kept


def apply_stored_quantization(module: nn.Module, block: dict, tensors: dict[str, TensorInfo],
                              where: str) -> None:
    """Swap in quantized layers where the folder stores ``.scales`` (mlx-lm layout).

    ``block`` is config.json's ``quantization``: defaults ``bits``/``group_size`` and optional
    per-layer entries keyed by the stored path (with or without ``model.``), or ``false``.
    """
    if not isinstance(block, dict) or not isinstance(block.get("bits"), int) \
            or not isinstance(block.get("group_size"), int):
        raise ModelLoadError(f"{where}: config.json quantization block needs integer bits and group_size")
    mode = block.get("mode", MODE)
    if mode != MODE:
        raise ModelLoadError(f"{where}: quantization mode {mode!r} is not supported (only {MODE!r})")

    def predicate(path: str, m: nn.Module):
        if not hasattr(m, "to_quantized") or f"{path}.scales" not in tensors:
            return False
        entry = block.get(path, block.get(f"model.{path}"))
        if entry is False:
            return False
        if isinstance(entry, dict):
            return {"bits": int(entry.get("bits", block["bits"])),
                    "group_size": int(entry.get("group_size", block["group_size"])), "mode": MODE}
        return {"bits": block["bits"], "group_size": block["group_size"], "mode": MODE}

    nn.quantize(module, class_predicate=predicate)
