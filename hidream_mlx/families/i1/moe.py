"""Feed-forward layers of HiDream-I1: SwiGLU and the routed mixture of experts."""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


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


def route(scores: mx.array, top_k: int) -> mx.array:
    """0/1 mask of the ``top_k`` largest scores per row; ties go to the lower expert index
    (a stable sort on the negated scores), which is the order torch.topk gives here."""
    order = mx.argsort(-scores, axis=-1)  # MLX argsort is stable
    chosen = order[..., :top_k]
    experts = mx.arange(scores.shape[-1])
    return (chosen[..., :, None] == experts).any(axis=-2).astype(scores.dtype)


class MoEGate(nn.Module):
    """Softmax gate over the routed experts; parameter ``weight`` [E, D], no bias."""

    def __init__(self, dim: int, num_experts: int, top_k: int):
        super().__init__()
        self.weight = mx.zeros((num_experts, dim))
        self.top_k = top_k

    def __call__(self, x):
        scores = mx.softmax((x @ self.weight.T).astype(mx.float32), axis=-1)
        return scores, route(scores, self.top_k)


class MoEFeedForward(nn.Module):
    """``sum_k score_k * expert_k(x) + shared(x)`` with raw (not renormalised) softmax
    scores. Every expert runs on every token and unchosen ones are weighted by an exact 0,
    which sums in expert order like the reference's per-expert scatter."""

    def __init__(self, dim: int, num_experts: int, top_k: int, hidden: int, shared_hidden: int):
        super().__init__()
        self.gate = MoEGate(dim, num_experts, top_k)
        self.experts = [SwiGLU(dim, hidden) for _ in range(num_experts)]
        self.shared_experts = SwiGLU(dim, shared_hidden)
        self.debug = None

    def __call__(self, x):
        scores, selected = self.gate(x)
        weights = (scores * selected).astype(x.dtype)
        y = mx.zeros_like(x)
        for e, expert in enumerate(self.experts):
            y = y + weights[..., e:e + 1] * expert(x)
        if self.debug is not None:
            self.debug.append((scores, selected))
        return y + self.shared_experts(x)
