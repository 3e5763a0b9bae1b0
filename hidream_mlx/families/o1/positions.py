"""Position ids and interleaved 3-axis MRoPE tables.

Text tokens sit at (i, i, i). Target patch (r, c) sits at (4096, 4096 + r, 4096 + c) whatever
the text length, so the image's positions do not move when the prompt changes.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from hidream_mlx.families.o1.config import FIX_POINT, TextConfig


def text_positions(length: int, start: int = 0) -> np.ndarray:
    """[3, length] positions of plain text tokens."""
    return np.broadcast_to(np.arange(start, start + length, dtype=np.int64), (3, length)).copy()


def patch_positions(grid_h: int, grid_w: int, fix_point: int = FIX_POINT) -> np.ndarray:
    """[3, grid_h*grid_w] positions of target patches, row-major."""
    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    return np.stack(
        [
            np.full(grid_h * grid_w, fix_point, dtype=np.int64),
            fix_point + rows.reshape(-1).astype(np.int64),
            fix_point + cols.reshape(-1).astype(np.int64),
        ]
    )


def t2i_positions(text_len: int, grid_h: int, grid_w: int) -> np.ndarray:
    """[3, text_len + grid_h*grid_w] for a text-to-image sequence (text includes boi and tms)."""
    return np.concatenate([text_positions(text_len), patch_positions(grid_h, grid_w)], axis=1)


def _axis_of_slot(cfg: TextConfig) -> np.ndarray:
    """Which position axis (0=T, 1=H, 2=W) drives each rotary frequency slot."""
    half = cfg.head_dim // 2
    slot = np.arange(half)
    axis = np.zeros(half, dtype=np.int64)
    _, sec_h, sec_w = cfg.mrope_section
    axis[(slot % 3 == 1) & (slot < 3 * sec_h)] = 1
    axis[(slot % 3 == 2) & (slot < 3 * sec_w)] = 2
    return axis


def rope_tables(cfg: TextConfig, positions) -> tuple[mx.array, mx.array]:
    """cos and sin tables [L, head_dim] (rotate-half layout) for positions [3, L], in float32."""
    positions = np.asarray(positions, dtype=np.int64).reshape(3, -1)
    half = cfg.head_dim // 2
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float32) / cfg.head_dim))
    pos = mx.array(positions[_axis_of_slot(cfg), :].T.astype(np.float32))  # [L, half]
    freqs = pos * mx.array(inv_freq.astype(np.float32))[None, :half]
    emb = mx.concatenate([freqs, freqs], axis=-1)
    return mx.cos(emb), mx.sin(emb)
