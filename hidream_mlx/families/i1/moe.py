"""Feed-forward layers of HiDream-I1: SwiGLU and the routed mixture of experts."""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from hidream_mlx.families.i1.experts import ExpertStacks, gathered_outputs, per_expert_outputs
from hidream_mlx.families.i1.routing import weighted_sum


class SwiGLU(nn.Module):
    """``w2(silu(w1 x) * w3 x)``; the hidden width comes from the weights."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def __call__(self, x):
        return self.w2(nn.silu(self.w1(x)) * self.w3(x))


def swiglu_hidden(hidden: int, multiple_of: int = 256) -> int:
    """The reference's SwiGLU width: ``int(2*hidden/3)`` rounded up to a multiple of 256."""
    h = int(2 * hidden / 3)
    return multiple_of * ((h + multiple_of - 1) // multiple_of)


def top_k_experts(scores: mx.array, top_k: int) -> mx.array:
    """The ``top_k`` largest scores' expert indices per row, in ascending expert order. Ties go
    to the lower expert index (a stable sort on the negated scores), which is the order
    torch.topk gives here."""
    order = mx.argsort(-scores, axis=-1)  # MLX argsort is stable
    return mx.sort(order[..., :top_k], axis=-1)


def route(scores: mx.array, top_k: int) -> mx.array:
    """0/1 mask [..., E] of the experts :func:`top_k_experts` chooses (the reference's
    ``dbg.moe.*.selected``)."""
    chosen = top_k_experts(scores, top_k)
    experts = mx.arange(scores.shape[-1])
    return (chosen[..., :, None] == experts).any(axis=-2).astype(scores.dtype)


class MoEGate(nn.Module):
    """Softmax gate over the routed experts; parameter ``weight`` [E, D], no bias."""

    def __init__(self, dim: int, num_experts: int, top_k: int):
        super().__init__()
        self.weight = mx.zeros((num_experts, dim))
        self.top_k = top_k

    def scores(self, x) -> mx.array:
        """Softmax over the routed experts' logits, in float32 [..., E]."""
        return mx.softmax((x @ self.weight.T).astype(mx.float32), axis=-1)

    def __call__(self, x):
        """(scores, 0/1 mask of the chosen experts), as the reference's debug outputs."""
        scores = self.scores(x)
        return scores, route(scores, self.top_k)


class MoEFeedForward(nn.Module):
    """``sum_k score_k * expert_k(x) + shared(x)`` with raw (not renormalised) softmax scores.

    Each expert runs on the tokens routed to it only (``experts.gathered_outputs``: gathered
    matmuls over blocks of tokens sorted by expert, no host round-trip), and every token's
    weighted outputs are added in ascending expert order into what starts as the first one:
    the reference's per-expert scatter-add into a zero buffer, term for term. An expert that no
    token chose is never evaluated.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, hidden: int, shared_hidden: int):
        super().__init__()
        self.gate = MoEGate(dim, num_experts, top_k)
        self.experts = [SwiGLU(dim, hidden) for _ in range(num_experts)]
        self.shared_experts = SwiGLU(dim, shared_hidden)
        self._stacks = ExpertStacks()  # a plain attribute: not a parameter, not a child module

    def routed(self, x: mx.array) -> mx.array:
        """The routed experts' weighted sum for tokens ``x`` [T, D] (no shared expert)."""
        scores = self.gate.scores(x)
        chosen = top_k_experts(scores, self.gate.top_k)
        stacks = self._stacks.get(self.experts, x.dtype)
        if stacks is None:
            outputs = per_expert_outputs(self.experts, x, chosen)
        else:
            outputs = gathered_outputs(stacks, x, chosen, len(self.experts))
        return weighted_sum(outputs, mx.take_along_axis(scores, chosen, axis=-1).astype(x.dtype))

    def __call__(self, x):
        y = self.routed(x.reshape(-1, x.shape[-1])).reshape(x.shape)
        return y + self.shared_experts(x)
