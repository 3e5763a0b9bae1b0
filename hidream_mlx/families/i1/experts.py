"""The routed experts computed on their own tokens only: stacked weights and gathered matmuls.

The experts stay separate ``SwiGLU`` modules, so their parameters keep the checkpoint's names
(``experts.N.w1.weight``) and loading, ``-q`` quantization, converted folders and LoRAs see
ordinary linear layers. A gathered matmul wants one array per matrix with the experts on a
leading axis; :class:`ExpertStacks` builds it at a layer's first call and then points every
expert's arrays at slices of it (views: the weights stay in memory once). Whenever an expert's
array or layer is replaced later (a LoRA merged into a float weight, a side path added to a
quantized one, weights reloaded), the next call sees a different object and stacks that matrix
again. While LoRAs merged into float experts are kept for undoing, the kept originals are views
of the old stack and hold all of it.

Supported stacks: every expert's matrix a plain ``nn.Linear`` without bias (``mx.gather_mm``) or
a ``nn.QuantizedLinear`` with the same bits, group size and mode (``mx.gather_qmm``), either of
them inside a ``LoRALinear`` whose side paths are gathered too. Anything else (experts quantized
differently from each other, a float dtype the backend's gathered matmul lacks: MLX's CPU
backend multiplies float32 only) takes :func:`per_expert_outputs`, which is exact as well but
reads the routing on the host to slice each expert's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from hidream_mlx.families.i1.routing import layout
from hidream_mlx.weights.lora import LoRALinear

LINEARS = ("w1", "w2", "w3")
_FLOAT_GATHER: dict[tuple[str, mx.Dtype], bool] = {}


def float_gather_supported(dtype: mx.Dtype) -> bool:
    """Whether ``mx.gather_mm`` multiplies ``dtype`` on the default device (tried once)."""
    key = (str(mx.default_device()), dtype)
    if key not in _FLOAT_GATHER:
        probe = mx.zeros((1, 1, 1), dtype)
        try:
            mx.eval(mx.gather_mm(probe, probe, rhs_indices=mx.zeros((1,), mx.uint32)))
            _FLOAT_GATHER[key] = True
        except RuntimeError:  # MLX refuses the dtype when it evaluates
            _FLOAT_GATHER[key] = False
    return _FLOAT_GATHER[key]


def _base(module):
    return module.base if isinstance(module, LoRALinear) else module


def _signature(layer) -> Optional[tuple]:
    """What must agree across experts for one gathered matmul; None for a layer it cannot take."""
    if "bias" in layer:
        return None
    if type(layer) is nn.Linear:
        return ("float", layer.weight.shape, layer.weight.dtype)
    if type(layer) is nn.QuantizedLinear:
        biases = layer.get("biases")
        return ("quantized", layer.weight.shape, layer.scales.shape, layer.scales.dtype,
                None if biases is None else biases.shape, layer.group_size, layer.bits, layer.mode)
    return None


def _leaves(layer) -> tuple:
    """The objects whose identity says a base layer still holds what was stacked."""
    if type(layer) is nn.QuantizedLinear:
        return (layer, layer.weight, layer.scales, layer.get("biases"))
    return (layer, layer.weight)


def _side_leaves(module) -> tuple:
    if isinstance(module, LoRALinear):
        return (module, *module.lora_A, *module.lora_B, *module.factors)
    return (module,)


def _same(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


@dataclass(frozen=True)
class SidePath:
    """Term ``j`` of every expert's LoRA side paths, stacked: ``f_e * (x @ A_e.T) @ B_e.T``.
    An expert with fewer terms, or a lower rank, is padded with zeros (and factor 0)."""

    A: mx.array  # [E, r, in]
    B: mx.array  # [E, out, r]
    factors: mx.array  # [E] float32


@dataclass(frozen=True)
class MatrixStack:
    """One matrix (w1, w2 or w3) of every expert, for a gathered matmul."""

    weight: mx.array  # [E, out, in] float, or [E, out, packed in] quantized
    scales: Optional[mx.array]
    biases: Optional[mx.array]
    quantization: Optional[tuple[int, int, str]]  # (group_size, bits, mode)
    side: tuple[SidePath, ...] = ()

    def __call__(self, x: mx.array, experts: mx.array) -> mx.array:
        """``x`` [blocks, M, in] times expert ``experts[b]``'s matrix, block by block, plus
        its side paths in the order ``LoRALinear`` adds them."""
        if self.quantization is None:
            y = mx.gather_mm(x, self.weight.swapaxes(-1, -2), rhs_indices=experts)
        else:
            group_size, bits, mode = self.quantization
            y = mx.gather_qmm(x, self.weight, self.scales, self.biases, rhs_indices=experts, transpose=True,
                              group_size=group_size, bits=bits, mode=mode)
        for term in self.side:
            low = mx.gather_mm(x, term.A.astype(x.dtype).swapaxes(-1, -2), rhs_indices=experts)
            update = mx.gather_mm(low, term.B.astype(x.dtype).swapaxes(-1, -2), rhs_indices=experts)
            y = y + term.factors.astype(x.dtype)[experts][:, None, None] * update
        return y


def _views(stacked: mx.array) -> list[mx.array]:
    """Expert e's array as a view of ``stacked`` (a plain slice shares the buffer; an integer
    index would copy)."""
    views = [stacked[e:e + 1].squeeze(0) for e in range(stacked.shape[0])]
    mx.eval(views)
    return views


def _stack_bases(bases: Sequence) -> tuple:
    """Stack the base layers' arrays and rebind each layer to views of the stack."""
    names = ("weight", "scales", "biases") if type(bases[0]) is nn.QuantizedLinear else ("weight",)
    stacked = {}
    for name in names:
        if bases[0].get(name) is None:
            stacked[name] = None
            continue
        array = mx.stack([b[name] for b in bases])
        mx.eval(array)
        for layer, view in zip(bases, _views(array)):
            setattr(layer, name, view)
        stacked[name] = array
    first = bases[0]
    quantization = (first.group_size, first.bits, first.mode) if type(first) is nn.QuantizedLinear else None
    return stacked["weight"], stacked.get("scales"), stacked.get("biases"), quantization


def _stack_side(modules: Sequence) -> tuple[SidePath, ...]:
    terms = [list(zip(m.lora_A, m.lora_B, m.factors)) if isinstance(m, LoRALinear) else [] for m in modules]
    out = []
    for j in range(max(len(t) for t in terms)):
        present = [t[j] for t in terms if len(t) > j]
        rank = max(int(a.shape[0]) for a, _, _ in present)
        a0, b0, _ = present[0]
        A, B, factors = [], [], []
        for t in terms:
            if len(t) > j:
                a, b, f = t[j]
                pad = rank - int(a.shape[0])
                A.append(mx.pad(a, [(0, pad), (0, 0)]) if pad else a)
                B.append(mx.pad(b, [(0, 0), (0, pad)]) if pad else b)
                factors.append(f)
            else:
                A.append(mx.zeros((rank, a0.shape[1]), a0.dtype))
                B.append(mx.zeros((b0.shape[0], rank), b0.dtype))
                factors.append(0.0)
        side = SidePath(mx.stack(A), mx.stack(B), mx.array(factors, dtype=mx.float32))
        mx.eval(side.A, side.B, side.factors)
        out.append(side)
    return tuple(out)


@dataclass
class _Slot:
    base_leaves: tuple
    side_leaves: tuple
    stack: MatrixStack


class ExpertStacks:
    """The stacked matrices of one MoE layer's experts, kept in step with the experts.

    Not a module: nothing here is a parameter (the experts' own arrays are views of it).
    """

    def __init__(self):
        self._slots: dict[str, _Slot] = {}

    def get(self, experts: Sequence[nn.Module], dtype: mx.Dtype) -> Optional[dict[str, MatrixStack]]:
        """w1/w2/w3 stacks for ``experts`` computing in ``dtype``, or None when they cannot be
        gathered (then nothing is stacked)."""
        modules = {name: [getattr(e, name) for e in experts] for name in LINEARS}
        float_dtypes = set()
        for name, layers in modules.items():
            signatures = {_signature(_base(m)) for m in layers}
            if None in signatures or len(signatures) != 1:
                return None
            if next(iter(signatures))[0] == "float":
                float_dtypes |= {dtype, _base(layers[0]).weight.dtype}
            if any(isinstance(m, LoRALinear) for m in layers):
                float_dtypes.add(dtype)
        if not all(float_gather_supported(d) for d in float_dtypes):
            return None
        return {name: self._matrix(name, layers) for name, layers in modules.items()}

    def _matrix(self, name: str, modules: list) -> MatrixStack:
        slot = self._slots.get(name)
        bases = [_base(m) for m in modules]
        base_leaves = tuple(x for b in bases for x in _leaves(b))
        side_leaves = tuple(x for m in modules for x in _side_leaves(m))
        if slot is not None and _same(slot.base_leaves, base_leaves) and _same(slot.side_leaves, side_leaves):
            return slot.stack
        if slot is not None and _same(slot.base_leaves, base_leaves):
            weight, scales, biases, quantization = (slot.stack.weight, slot.stack.scales, slot.stack.biases,
                                                    slot.stack.quantization)
        else:
            # Drop the old stack first: only the experts' current arrays should be alive while copying.
            self._slots.pop(name, None)
            slot = None
            weight, scales, biases, quantization = _stack_bases(bases)
            base_leaves = tuple(x for b in bases for x in _leaves(b))
        side = _stack_side(modules)
        stack = MatrixStack(weight, scales, biases, quantization, side)
        self._slots[name] = _Slot(base_leaves, side_leaves, stack)
        return stack


def gathered_outputs(stacks: dict[str, MatrixStack], x: mx.array, chosen: mx.array, num_experts: int) -> mx.array:
    """[T, K, D]: expert ``chosen[t, k]``'s SwiGLU of token ``x[t]``, computed on the routed
    tokens only (``layout``'s blocks), with no host round-trip."""
    table = layout(chosen, num_experts)
    xb = x[table.rows].reshape(table.blocks, table.block, x.shape[-1])
    experts = table.block_experts
    hidden = nn.silu(stacks["w1"](xb, experts)) * stacks["w3"](xb, experts)
    out = stacks["w2"](hidden, experts)
    out = out.reshape(-1, out.shape[-1])
    return out[table.positions.reshape(-1)].reshape(*chosen.shape, -1)


def per_expert_outputs(experts: Sequence[nn.Module], x: mx.array, chosen: mx.array) -> mx.array:
    """[T, K, D] as :func:`gathered_outputs`, each expert module called on its own tokens.

    The slice sizes are the routing's counts, read on the host: one round-trip per layer, paid
    only where the experts cannot be gathered (see the module docstring)."""
    tokens, k = chosen.shape
    flat = np.asarray(chosen).reshape(-1)
    order = np.argsort(flat, kind="stable")
    counts = np.bincount(flat, minlength=len(experts))
    routed = x[mx.array((order // k).astype(np.int32))]
    parts, start = [], 0
    for e, count in enumerate(counts):
        if count:
            parts.append(experts[e](routed[start:start + int(count)]))
            start += int(count)
    out = mx.concatenate(parts, axis=0)
    return out[mx.array(np.argsort(order).astype(np.int32))].reshape(tokens, k, -1)
