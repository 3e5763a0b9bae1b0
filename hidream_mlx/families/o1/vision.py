"""The Qwen3-VL vision tower, used only to read reference images (editing, personalization).

Input rows are the image processor's flattened 16x16 patches in *merge order*: for each 2x2 block
of patches (row-major over blocks), its four patches row-major. Every per-patch quantity built
here (learned position embedding, 2D rotary angles) follows that same order, so the merger can
fuse each block by a plain reshape. Attention is full within each frame and never across frames
or images (the reference's ``cu_seqlens``).

Module attribute names mirror the checkpoint under ``model.visual.`` so weights load by
stripping that prefix; ``VisionTower.sanitize`` does that and flattens the Conv3d kernel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from hidream_mlx.families.o1.config import ModelConfig, VisionConfig
from hidream_mlx.weights.loading import checkpoint_index, is_vision, load_tensors, select_tensors
from hidream_mlx.rope import apply_rotate_half

CHECKPOINT_PREFIX = "model.visual."
LAYER_NORM_EPS = 1e-6
ROPE_THETA = 10000.0


def _as_grid(grid_thw) -> np.ndarray:
    grid = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    if (grid <= 0).any():
        raise ValueError(f"image_grid_thw must be positive, got {grid.tolist()}")
    return grid


def merge_order(height: int, width: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of every patch of an height x width grid, listed in merge order."""
    rows = np.arange(height).reshape(height // merge, 1, merge, 1)
    cols = np.arange(width).reshape(1, width // merge, 1, merge)
    shape = (height // merge, width // merge, merge, merge)
    return np.broadcast_to(rows, shape).reshape(-1), np.broadcast_to(cols, shape).reshape(-1)


class PatchEmbed(nn.Module):
    """Conv3d with kernel == stride over one flattened (C, T, P, P) patch is a matmul."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        patch_dim = config.in_channels * config.temporal_patch_size * config.patch_size**2
        self.proj = nn.Linear(patch_dim, config.hidden_size, bias=True)

    def __call__(self, pixel_values: mx.array) -> mx.array:
        return self.proj(pixel_values)


class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array, segments: list[tuple[int, int]]) -> mx.array:
        length = x.shape[0]
        qkv = self.qkv(x).reshape(length, 3, self.num_heads, -1).transpose(1, 2, 0, 3)
        q, k, v = qkv[0], qkv[1], qkv[2]  # [heads, L, head_dim]
        q, k = apply_rotate_half(q, cos, sin), apply_rotate_half(k, cos, sin)
        outputs = [
            mx.fast.scaled_dot_product_attention(
                q[None, :, start:end], k[None, :, start:end], v[None, :, start:end], scale=self.scale
            )
            for start, end in segments
        ]
        out = outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=2)
        return self.proj(out[0].transpose(1, 0, 2).reshape(length, -1))


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.linear_fc1 = nn.Linear(dim, hidden_dim, bias=True)
        self.linear_fc2 = nn.Linear(hidden_dim, dim, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_fc2(nn.gelu_approx(self.linear_fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=LAYER_NORM_EPS)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=LAYER_NORM_EPS)
        self.attn = VisionAttention(config.hidden_size, config.num_heads)
        self.mlp = VisionMLP(config.hidden_size, config.intermediate_size)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array, segments: list[tuple[int, int]]) -> mx.array:
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Fuses each merge x merge block of patches into one token of the language model's width.

    The final merger normalizes each patch before fusing; the deepstack mergers normalize the
    fused vector ("postshuffle").
    """

    def __init__(self, config: VisionConfig, postshuffle_norm: bool):
        super().__init__()
        self.merged_dim = config.hidden_size * config.spatial_merge_size**2
        self.postshuffle_norm = postshuffle_norm
        self.norm = nn.LayerNorm(self.merged_dim if postshuffle_norm else config.hidden_size, eps=LAYER_NORM_EPS)
        self.linear_fc1 = nn.Linear(self.merged_dim, self.merged_dim, bias=True)
        self.linear_fc2 = nn.Linear(self.merged_dim, config.out_hidden_size, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        if self.postshuffle_norm:
            x = self.norm(x.reshape(-1, self.merged_dim))
        else:
            x = self.norm(x).reshape(-1, self.merged_dim)
        # Exact (erf) GELU here, unlike the tanh GELU of the blocks' MLPs.
        return self.linear_fc2(nn.gelu(self.linear_fc1(x)))


class VisionTower(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.merge = config.spatial_merge_size
        self.grid_per_side = int(round(config.num_position_embeddings**0.5))
        if self.grid_per_side**2 != config.num_position_embeddings:
            raise ValueError(
                f"vision_config.num_position_embeddings ({config.num_position_embeddings}) must be a square"
            )
        self.deepstack_visual_indexes = tuple(config.deepstack_visual_indexes)
        head_dim = config.hidden_size // config.num_heads
        rotary_dim = head_dim // 2
        self._inv_freq = 1.0 / ROPE_THETA ** (np.arange(0, rotary_dim, 2, dtype=np.float32) / rotary_dim)

        self.patch_embed = PatchEmbed(config)
        self.pos_embed = nn.Embedding(config.num_position_embeddings, config.hidden_size)
        self.blocks = [VisionBlock(config) for _ in range(config.depth)]
        self.merger = PatchMerger(config, postshuffle_norm=False)
        self.deepstack_merger_list = [
            PatchMerger(config, postshuffle_norm=True) for _ in self.deepstack_visual_indexes
        ]

    def __call__(self, pixel_values: mx.array, grid_thw) -> tuple[mx.array, list[mx.array]]:
        """pixel_values [L, C*T*P*P], grid_thw [n, 3] (frames, patch rows, patch cols) ->
        (merged embeddings [L/merge^2, out_hidden], one [L/merge^2, out_hidden] per deepstack index)."""
        grid = _as_grid(grid_thw)
        self._check_inputs(pixel_values, grid)
        # The bias keeps the compute dtype even if the projection weight is ever quantized.
        x = self.patch_embed(pixel_values.astype(self.patch_embed.proj.bias.dtype))
        x = x + self.position_embeddings(grid).astype(x.dtype)
        cos, sin = self.rotary_cos_sin(grid)
        frame_lengths = np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0])
        bounds = np.concatenate([[0], np.cumsum(frame_lengths)]).tolist()
        segments = list(zip(bounds[:-1], bounds[1:]))

        deepstack = []
        for layer, block in enumerate(self.blocks):
            x = block(x, cos, sin, segments)
            if layer in self.deepstack_visual_indexes:
                merger = self.deepstack_merger_list[self.deepstack_visual_indexes.index(layer)]
                deepstack.append(merger(x))
        return self.merger(x), deepstack

    def _check_inputs(self, pixel_values: mx.array, grid: np.ndarray) -> None:
        expected = int((grid[:, 0] * grid[:, 1] * grid[:, 2]).sum())
        c = self.config
        patch_dim = c.in_channels * c.temporal_patch_size * c.patch_size**2
        if pixel_values.ndim != 2 or tuple(pixel_values.shape) != (expected, patch_dim):
            raise ValueError(
                f"pixel_values must be [{expected}, {patch_dim}] for image_grid_thw {grid.tolist()}, "
                f"got {list(pixel_values.shape)}"
            )
        if (grid[:, 1:] % self.merge).any():
            raise ValueError(f"image_grid_thw {grid.tolist()} has sides not divisible by merge size {self.merge}")

    def position_embeddings(self, grid: np.ndarray) -> mx.array:
        """The learned grid_per_side^2 table bilinearly resampled to each frame's grid, merge order."""
        g = self.grid_per_side
        indices, weights = [], []
        for frames, height, width in grid:
            rows, cols = merge_order(int(height), int(width), self.merge)
            # The reference samples with float32 linspace and truncation towards zero.
            ys = np.linspace(0, g - 1, height, dtype=np.float32)[rows]
            xs = np.linspace(0, g - 1, width, dtype=np.float32)[cols]
            y0, x0 = ys.astype(np.int64), xs.astype(np.int64)
            y1, x1 = np.minimum(y0 + 1, g - 1), np.minimum(x0 + 1, g - 1)
            dy, dx = ys - y0, xs - x0
            corner_index = np.stack([y0 * g + x0, y0 * g + x1, y1 * g + x0, y1 * g + x1])
            corner_weight = np.stack([(1 - dy) * (1 - dx), (1 - dy) * dx, dy * (1 - dx), dy * dx])
            indices.append(np.tile(corner_index, (1, int(frames))))
            weights.append(np.tile(corner_weight, (1, int(frames))))
        index = mx.array(np.concatenate(indices, axis=1).astype(np.int32))
        weight = mx.array(np.concatenate(weights, axis=1).astype(np.float32))
        table = self.pos_embed.weight
        corners = table[index] * weight[..., None].astype(table.dtype)
        return corners[0] + corners[1] + corners[2] + corners[3]

    def rotary_cos_sin(self, grid: np.ndarray) -> tuple[mx.array, mx.array]:
        """cos and sin [L, head_dim]: half the frequencies turn with the row, half with the column."""
        coords = []
        for frames, height, width in grid:
            rows, cols = merge_order(int(height), int(width), self.merge)
            coords.append(np.tile(np.stack([rows, cols], axis=1), (int(frames), 1)))
        coords = np.concatenate(coords).astype(np.float32)
        angles = (coords[:, :, None] * self._inv_freq[None, None, :]).reshape(len(coords), -1)
        angles = mx.array(np.concatenate([angles, angles], axis=-1))
        return mx.cos(angles), mx.sin(angles)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Checkpoint names -> module names: strip ``model.visual.``, drop the rest of the
        checkpoint, flatten the Conv3d kernel [out, C, T, P, P] to [out, C*T*P*P]. Idempotent."""
        out = {}
        for name, value in weights.items():
            if name.startswith(CHECKPOINT_PREFIX):
                name = name[len(CHECKPOINT_PREFIX) :]
            elif name.startswith(("model.", "lm_head.")):
                continue
            if name == "patch_embed.proj.weight" and value.ndim != 2:
                value = value.reshape(value.shape[0], -1)
            out[name] = value
        return out


def load_vision_tower(
    model_dir: Union[str, Path],
    config: Optional[Union[ModelConfig, VisionConfig]] = None,
    dtype: mx.Dtype = mx.float32,
) -> VisionTower:
    """Build the tower from ``config`` (read from the folder's config.json if None) and load only
    the ``model.visual.*`` tensors of the folder's safetensors, cast to ``dtype``. Missing,
    unexpected or mis-shaped tensors raise ValueError."""
    model_dir = Path(model_dir)
    if config is None:
        config = ModelConfig.from_file(model_dir / "config.json")
    vision = config.vision if isinstance(config, ModelConfig) else config
    if vision is None:
        raise ValueError(f"{model_dir}: config.json has no vision_config (needed for reference images)")

    # The shared loader checks every shard's header first (a truncated download names its file).
    infos = select_tensors(checkpoint_index(model_dir), is_vision)
    tensors = {f"model.{name}": value for name, value in load_tensors(infos, dtype).items()}

    tower = VisionTower(vision)
    weights = tower.sanitize(tensors)
    expected = dict(tree_flatten(tower.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{model_dir}: vision tower weights do not match the config "
            f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''})"
        )
    for name, value in weights.items():
        if value.shape != expected[name].shape:
            raise ValueError(
                f"{model_dir}: {CHECKPOINT_PREFIX}{name} has shape {list(value.shape)}, "
                f"config expects {list(expected[name].shape)}"
            )
    tower.load_weights(list(weights.items()), strict=True)
    mx.eval(tower.parameters())
    return tower
