"""Weight precisions: the dtype names users type, and the official Dev-2604 mixed mode.

``mixed`` is how the official Dev-2604 pipeline runs (``inference.py`` on the ``dev`` branch loads
float32 weights and samples under ``torch.autocast(dtype=bfloat16)``; its authors note that
float32 keeps more detail): weights, the residual stream and the norms stay float32, and every
linear layer multiplies in bfloat16. It costs float32 weight memory (twice bfloat16) plus one
layer's bfloat16 copy at a time.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

# Name -> (dtype the weights are stored in memory, matmul dtype or None for "the same").
PRECISIONS: dict[str, tuple[mx.Dtype, mx.Dtype | None]] = {
    "bfloat16": (mx.bfloat16, None),
    "float32": (mx.float32, None),
    "mixed": (mx.float32, mx.bfloat16),
}
DTYPE_NAMES = {mx.bfloat16: "bfloat16", mx.float32: "float32", mx.float16: "float16"}


def check_precision(name: str) -> str:
    if name not in PRECISIONS:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(PRECISIONS)}")
    return name


def parse_dtype(name: str) -> mx.Dtype:
    """The dtype weights are held in for precision ``name``."""
    return PRECISIONS[check_precision(name)][0]


def check_with_quantization(name: str, bits) -> None:
    """Refused before any weight loads: the mixed mode exists to keep float32 weights."""
    if name == "mixed" and bits:
        raise ValueError("--dtype mixed keeps float32 weights and cannot be combined with -q")


class AutocastLinear(nn.Module):
    """A linear layer that keeps float32 weights but multiplies in ``compute`` (autocast)."""

    def __init__(self, linear: nn.Linear, compute: mx.Dtype):
        super().__init__()
        self.weight = linear.weight
        if "bias" in linear:
            self.bias = linear.bias
        self._compute = compute

    def __call__(self, x: mx.array) -> mx.array:
        y = x.astype(self._compute) @ self.weight.astype(self._compute).T
        if "bias" in self:
            y = y + self.bias.astype(self._compute)
        return y.astype(x.dtype)


def apply_precision(model: nn.Module, name: str) -> None:
    """Swap the float linears of a loaded model for autocast ones when ``name`` asks for it."""
    compute = PRECISIONS[check_precision(name)][1]
    if compute is None:
        return
    modules = model.named_modules()
    if any(isinstance(m, nn.QuantizedLinear) for _, m in modules):
        raise ValueError("--dtype mixed keeps float32 weights and cannot be combined with quantization")
    model.update_modules(tree_unflatten([(path, AutocastLinear(m, compute)) for path, m in modules
                                         if type(m) is nn.Linear]))
