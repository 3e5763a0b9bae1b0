"""The HiDream-O1 model's LoRA targets, known before any weight loads.

A LoRA file that does not fit (a missing module, a wrong shape, rank 0, NaN weights) must be
refused before minutes of loading, and the same way for a float checkpoint, ``-q`` and a folder
quantized beforehand. The model's module tree built from its config (parameters never evaluated,
so nothing is allocated) gives every linear layer's float (out, in) shape, whatever the layer
is quantized to later, which is all :func:`~hidream_mlx.weights.lora.read_lora` checks.
"""

from __future__ import annotations

from typing import Sequence

from hidream_mlx.families.o1.transformer import HiDreamO1
from hidream_mlx.weights.lora import layer_shape, linear_targets, read_lora
from hidream_mlx.weights.lora_specs import LoRASpec, checked_specs


def model_targets(source) -> dict[str, tuple[int, int]]:
    """Our module path -> (out, in) of every linear layer of ``source``'s model (a ModelSource)."""
    skeleton = HiDreamO1(source.config)
    return {path: layer_shape(module) for path, module in linear_targets(skeleton).items()}


def check_loras(source, specs: Sequence[LoRASpec]) -> list[LoRASpec]:
    """``specs`` with every file read against the model's layers (one line naming the file and
    key for the first that does not fit)."""
    specs = checked_specs(specs)
    if specs:
        targets = model_targets(source)
        for spec in specs:
            read_lora(spec.path, targets)
    return specs
