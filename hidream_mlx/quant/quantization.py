"""The tensor maths of quantization: one float weight to packed weight, scales and biases, and
swapping a model's planned layers for quantized ones.

What gets quantized is decided elsewhere (``recipes`` for what a user asks, ``plans`` for what
that means for one model's layers); everything here takes a plan's ``LayerSetting`` per layer.
The converter and ``-q`` at load both go through ``quantize_weight``, so a converted folder
and an in-memory quantization hold the same bytes.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from hidream_mlx.quant.plans import O1_LAYERS, LayerScheme, load_plan
from hidream_mlx.quant.recipes import DEFAULT_GROUP_SIZE, MODE, LayerSetting, check_bits


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


def quantize_tensor(path: str, weight: mx.array, setting: LayerSetting, dtype: mx.Dtype) -> list[tuple[str, mx.array]]:
    """One float weight of module ``path`` as the parameters of its quantized layer: the
    converter's bytes (``quantize_weight``), scales and biases in the load dtype, so ``-q B``
    equals loading a converted folder bit for bit."""
    packed, scales, biases = quantize_weight(weight, setting)
    return [(f"{path}.weight", packed), (f"{path}.scales", scales.astype(dtype)),
            (f"{path}.biases", biases.astype(dtype))]


def quantize_in_memory(model: nn.Module, bits: int, group_size: int = DEFAULT_GROUP_SIZE,
                       scheme: LayerScheme = O1_LAYERS) -> dict:
    """``-q BITS`` on a model already holding float weights (random weights for benchmarks):
    apply the flat plan to the module; returns the quantization block."""
    check_bits(bits, "-q/--quantize")
    plan = load_plan(model, bits=bits, group_size=group_size, scheme=scheme)
    quantize_loaded(model, plan.layers)
    return plan.description
