"""The HiDream-I1 transformer's LoRA targets, known before any weight loads.

The engine applies LoRAs after the prompts are encoded and the transformer has loaded; a file
that does not fit must fail before all that. The transformer's module tree built from its
config (parameters never evaluated, so nothing is allocated) gives every linear layer's path
and shape, which is all :func:`~hidream_mlx.weights.lora.read_lora` checks.
"""

from __future__ import annotations

from typing import Sequence

from hidream_mlx.families.i1.transformer import HiDreamImageTransformer
from hidream_mlx.families.i1.weights import expert_widths
from hidream_mlx.weights.lora import I1_KEYS, layer_shape, linear_targets, read_lora
from hidream_mlx.weights.lora_specs import LoRASpec, checked_specs


def transformer_targets(source) -> dict[str, tuple[int, int]]:
    """Our module path -> (out, in) of every linear layer of ``source``'s transformer."""
    folder = source.path / "transformer"
    skeleton = HiDreamImageTransformer(source.transformer, expert_widths(source.index, folder))
    return {path: layer_shape(module) for path, module in linear_targets(skeleton).items()}


def check_loras(source, specs: Sequence[LoRASpec]) -> list[LoRASpec]:
    """``specs`` with every file read against the transformer's layers (one line naming the
    file and key for the first that does not fit)."""
    specs = checked_specs(specs)
    if specs:
        targets = transformer_targets(source)
        for spec in specs:
            read_lora(spec.path, targets, I1_KEYS)
    return specs
