"""Rotate-half rotary embeddings, shared by the O1 decoder, the O1 vision tower and the I1 Llama.

These models pair dimension ``j`` with ``j + head_dim/2`` (the "rotate half" layout); the I1
transformer pairs adjacent dimensions instead and has its own (``families/i1/blocks.apply_rope``).
"""

from __future__ import annotations

import mlx.core as mx


def rotate_half(x: mx.array) -> mx.array:
    """``[-x2, x1]`` of the two halves of the last axis."""
    half = x.shape[-1] // 2
    return mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotate_half(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """``x cos + rotate_half(x) sin`` computed in float32, returned in ``x``'s dtype.

    Float32 because the references rotate in float32 whatever the weight dtype, and positions
    reach the thousands, where bf16 phases would be visibly off."""
    xf = x.astype(mx.float32)
    return (xf * cos + rotate_half(xf) * sin).astype(x.dtype)
