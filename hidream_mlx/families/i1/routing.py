"""Where each routed (token, expert) pair is computed: rows grouped by expert into equal blocks.

A gathered matmul (``mx.gather_mm`` / ``mx.gather_qmm``) multiplies a batch of blocks of ``M``
rows, each block by the one expert its index names. :func:`layout` builds that batch from the
gate's choices on the device, with shapes that depend only on the token count, so a layer never
waits for the host:

* pair ``p = (token t, slot k)`` (``P = T * K`` pairs) goes to row ``positions[t, k]`` of a table
  in which every expert's rows are contiguous, in token order, and start on a block boundary;
* each expert's segment is padded to a multiple of ``M``, so the table needs at most
  ``P + E * (M - 1)`` rows (rounded up to whole blocks); padding rows repeat token 0 and their
  results are never read;
* blocks past the last one in use repeat the last expert that has tokens: an expert that no
  token chose owns no block and its weights are never read.

Why blocks rather than one row per matmul (mlx-lm's layout): MLX's CPU backend runs one BLAS
call per batch entry, so one-row entries would be matrix-vector products that re-read the
expert's whole weight per token; blocks of many rows keep the work in matrix-matrix products on
every backend. The price is the padding, ``E * (M - 1)`` rows whatever the routing (shapes
are fixed before it is known), which :func:`block_rows` weighs against the cost of more blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx

MAX_BLOCK_ROWS = 256
# What one more block costs beyond its rows' work, in rows (a BLAS call's setup and thread
# hand-off; measured on a 2-core CPU with OpenBLAS: about 3 rows idle, 10 under load).
BLOCK_COST_ROWS = 8


def block_rows(pairs: int, num_experts: int) -> int:
    """Rows per block: the power of two at or below ``sqrt(BLOCK_COST_ROWS * pairs / E)`` (at
    most 256), which balances the padding, ``E * (M - 1)`` rows, against the per-block cost,
    ``BLOCK_COST_ROWS * pairs / M``. About 128 for one 1024x1024 step of I1 (8960 pairs)."""
    target = min(math.sqrt(BLOCK_COST_ROWS * pairs / num_experts), MAX_BLOCK_ROWS)
    m = 1
    while 2 * m <= target:
        m *= 2
    return m


@dataclass(frozen=True)
class Layout:
    """The block table of one call (see the module docstring)."""

    rows: mx.array  # [blocks * block] int32: the token each table row holds
    positions: mx.array  # [T, K]: the table row of each (token, slot) pair
    block_experts: mx.array  # [blocks] uint32, non-decreasing: the expert of each block
    block: int  # rows per block

    @property
    def blocks(self) -> int:
        return self.block_experts.shape[0]


def layout(chosen: mx.array, num_experts: int) -> Layout:
    """The block table for ``chosen`` [T, K] (each token's experts, any order)."""
    tokens, k = chosen.shape
    pairs = tokens * k
    m = block_rows(pairs, num_experts)
    flat = chosen.reshape(pairs).astype(mx.int32)
    one_hot = (flat[:, None] == mx.arange(num_experts)).astype(mx.int32)
    counts = one_hot.sum(axis=0)
    # Rank of each pair among the pairs of its expert, in token order.
    rank = mx.take_along_axis(mx.cumsum(one_hot, axis=0) - one_hot, flat[:, None], axis=1)[:, 0]
    padded = (counts + m - 1) // m * m
    ends = mx.cumsum(padded)
    positions = (ends - padded)[flat] + rank
    blocks = -(-(pairs + num_experts * (m - 1)) // m)
    rows = mx.zeros((blocks * m,), mx.int32).at[positions].add(mx.arange(pairs, dtype=mx.int32) // k)
    # Block b belongs to the expert whose segment covers row b*m: the number of segments that
    # end at or before it. Past the last segment that count is E; those blocks take the last
    # expert in use instead, so no unchosen expert is ever multiplied.
    starts = mx.arange(blocks, dtype=mx.int32)[:, None] * m
    owner = (ends[None, :] <= starts).astype(mx.int32).sum(axis=1)
    last_used = num_experts - 1 - mx.argmax((counts[::-1] > 0).astype(mx.int32))
    block_experts = mx.minimum(owner, last_used).astype(mx.uint32)
    return Layout(rows, positions.reshape(tokens, k), block_experts, m)


def weighted_sum(outputs: mx.array, weights: mx.array) -> mx.array:
    """``sum_k weights[:, k] * outputs[:, k]`` [T, D] from outputs [T, K, D], added slot by slot
    in slot order: with each token's experts in ascending order that is the reference's
    expert-order sum (it adds every expert's weighted output into a zero buffer in turn)."""
    y = weights[:, 0:1] * outputs[:, 0]
    for k in range(1, outputs.shape[1]):
        y = y + weights[:, k:k + 1] * outputs[:, k]
    return y
