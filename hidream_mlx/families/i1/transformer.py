"""``HiDreamImageTransformer2DModel`` in MLX (eval mode), module names as in diffusers."""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from hidream_mlx.families.i1.blocks import DoubleBlock, SingleBlock, Wrapped, adaln, modulation, rope_angles, NORM_EPS
from hidream_mlx.families.i1.config import TransformerConfig
from hidream_mlx.families.i1.moe import swiglu_hidden

TIME_CHANNELS = 256


@lru_cache(maxsize=None)
def _frequencies(half: int) -> np.ndarray:
    """``exp(-ln(1e4) i / half)``: the exponent in float32 as the reference computes it, the exp
    correctly rounded. At t near 1000 one ulp of a frequency moves its sinusoid by ~1e-4, which
    MLX's float32 exp would cost."""
    exponent = np.float32(-math.log(10000.0)) * np.arange(half, dtype=np.float32) / np.float32(half)
    return np.exp(exponent.astype(np.float64)).astype(np.float32)


def timestep_features(t: mx.array, channels: int = TIME_CHANNELS) -> mx.array:
    """Sinusoid of raw t in [0, 1000], ``[cos, sin]``, frequencies ``exp(-ln(1e4) i / half)``."""
    freqs = mx.array(_frequencies(channels // 2))
    arg = t.astype(mx.float32)[:, None] * freqs[None]
    return mx.concatenate([mx.cos(arg), mx.sin(arg)], axis=-1)


class Embedding(nn.Module):
    """Linear-SiLU-Linear (diffusers ``TimestepEmbedding``)."""

    def __init__(self, dim_in: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def __call__(self, x):
        return self.linear_2(nn.silu(self.linear_1(x)))


class TimestepEmbed(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.timestep_embedder = Embedding(TIME_CHANNELS, dim)


class PooledEmbed(nn.Module):
    def __init__(self, dim_in, dim):
        super().__init__()
        self.pooled_embedder = Embedding(dim_in, dim)


class PatchEmbed(nn.Module):
    def __init__(self, dim_in, dim):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim)


class CaptionProjection(nn.Module):
    def __init__(self, dim_in, dim):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim, bias=False)


class FinalLayer(nn.Module):
    """adaLN split shift, scale; LayerNorm without affine; Linear(D -> p*p*C)."""

    def __init__(self, dim, out):
        super().__init__()
        self.adaLN_modulation = adaln(dim, 2)
        self.linear = nn.Linear(dim, out)

    def __call__(self, x, temb):
        shift, scale = modulation(self.adaLN_modulation, temb, 2)
        return self.linear(mx.fast.layer_norm(x, None, None, NORM_EPS) * (1 + scale) + shift)


@dataclass
class Patches:
    """What patchify makes of latents [B, C, h, w]: tokens [B, N, p*p*C] with features
    ordered (py, px, c), the patch grid (pH, pW), ids [B, N, 3] (0, row, col) and, for
    non-square latents, the 0/1 mask [B, max_seq] of real tokens (None when square)."""

    tokens: mx.array
    grid: tuple
    ids: np.ndarray
    mask: Optional[mx.array]


def patchify(latents: mx.array, patch: int, max_seq: int) -> Patches:
    b, c, h, w = latents.shape
    ph, pw = h // patch, w // patch
    x = latents.reshape(b, c, ph, patch, pw, patch).transpose(0, 2, 4, 3, 5, 1)
    x = x.reshape(b, ph * pw, patch * patch * c)
    ids = np.zeros((ph, pw, 3), np.float32)
    ids[..., 1] += np.arange(ph, dtype=np.float32)[:, None]
    ids[..., 2] += np.arange(pw, dtype=np.float32)[None, :]
    ids = ids.reshape(ph * pw, 3)
    mask = None
    if h != w:
        # The reference pads every non-square grid to max_seq tokens (ids and features 0).
        if ph * pw > max_seq:
            raise ValueError(f"{ph}x{pw} patches exceed the model's max_seq {max_seq}")
        x = mx.concatenate([x, mx.zeros((b, max_seq - ph * pw, x.shape[-1]), x.dtype)], axis=1)
        ids = np.concatenate([ids, np.zeros((max_seq - ph * pw, 3), np.float32)])
        m = np.zeros((b, max_seq), np.float32)
        m[:, :ph * pw] = 1
        mask = mx.array(m)
    return Patches(x, (ph, pw), np.broadcast_to(ids, (b, *ids.shape)), mask)


def unpatchify(tokens: mx.array, grid: tuple, patch: int) -> mx.array:
    b = tokens.shape[0]
    ph, pw = grid
    c = tokens.shape[-1] // (patch * patch)
    x = tokens[:, :ph * pw].reshape(b, ph, pw, patch, patch, c)
    return x.transpose(0, 5, 1, 3, 2, 4).reshape(b, c, ph * patch, pw * patch)


def default_widths(cfg: TransformerConfig) -> tuple:
    """(routed expert, shared expert, text FFN) hidden widths the reference derives; a
    checkpoint's own widths (``weights.expert_widths``) take precedence."""
    d = cfg.inner_dim
    return swiglu_hidden(4 * d), swiglu_hidden(2 * d), swiglu_hidden(4 * d)


class HiDreamImageTransformer(nn.Module):
    def __init__(self, cfg: TransformerConfig, widths: Optional[tuple] = None):
        super().__init__()
        self.cfg = cfg
        widths = widths or default_widths(cfg)
        d, p = cfg.inner_dim, cfg.patch_size
        self.t_embedder = TimestepEmbed(d)
        self.p_embedder = PooledEmbed(cfg.text_emb_dim, d)
        self.x_embedder = PatchEmbed(p * p * cfg.in_channels, d)
        self.double_stream_blocks = [Wrapped(DoubleBlock(cfg, widths)) for _ in range(cfg.num_layers)]
        self.single_stream_blocks = [Wrapped(SingleBlock(cfg, widths)) for _ in range(cfg.num_single_layers)]
        self.final_layer = FinalLayer(d, p * p * cfg.out_channels)
        t5_width, llama_width = cfg.caption_channels
        n = cfg.num_layers + cfg.num_single_layers
        self.caption_projection = [CaptionProjection(llama_width, d) for _ in range(n)]
        self.caption_projection.append(CaptionProjection(t5_width, d))
        self.debug: Optional[dict] = None

    def _dbg(self, name, value):
        if self.debug is not None:
            self.debug[name] = value

    def moe_layers(self):
        """(name, MoE) pairs in the order of the reference's ``dbg.moe.*`` keys."""
        out = [(f"double.{i}", b.block.ff_i) for i, b in enumerate(self.double_stream_blocks)]
        return out + [(f"single.{i}", b.block.ff_i) for i, b in enumerate(self.single_stream_blocks)]

    def __call__(self, latents, timesteps, t5, llama_stack, pooled, max_seq: Optional[int] = None) -> mx.array:
        """Raw model output [B, C, h, w] (the pipeline negates it). ``timesteps`` [B] are raw
        t in [0, 1000]; ``t5`` [B, T, t5_width]; ``llama_stack`` [L, B, T, llama_width];
        ``pooled`` [B, text_emb_dim]. ``max_seq`` replaces the config's padded length for a
        non-square input (the editing pipeline sets its own; padding changes the attention)."""
        cfg = self.cfg
        b = latents.shape[0]
        patches = patchify(latents, cfg.patch_size, cfg.max_seq if max_seq is None else max_seq)
        t_emb = self.t_embedder.timestep_embedder(timestep_features(mx.broadcast_to(timesteps, (b,))))
        p_emb = self.p_embedder.pooled_embedder(pooled)
        temb = t_emb + p_emb
        x = self.x_embedder.proj(patches.tokens)
        self._dbg("t_emb", t_emb), self._dbg("p_emb", p_emb), self._dbg("temb", temb), self._dbg("x_embedded", x)

        texts = [self.caption_projection[i].linear(llama_stack[k]) for i, k in enumerate(cfg.llama_layers)]
        t5_proj = self.caption_projection[-1].linear(t5)
        for i, t in enumerate(texts):
            self._dbg(f"caption_projection.{i}", t)
        self._dbg("caption_projection.t5", t5_proj)
        n_text = t5_proj.shape[1] + texts[-1].shape[1] + texts[0].shape[1]
        ids = np.concatenate([patches.ids, np.zeros((b, n_text, 3), np.float32)], axis=1)
        rope = rope_angles(ids, cfg.axes_dims_rope)
        self._dbg("rope", rope)

        persistent = mx.concatenate([t5_proj, texts[-1]], axis=1)
        n_persistent = persistent.shape[1]
        mask = patches.mask
        for i, blk in enumerate(self.double_stream_blocks):
            x, text = blk.block(x, mask, mx.concatenate([persistent, texts[i]], axis=1), temb, rope)
            self._dbg(f"double.{i}.image_out", x), self._dbg(f"double.{i}.text_out", text)
            persistent = text[:, :n_persistent]
        n_img = x.shape[1]
        x = mx.concatenate([x, persistent], axis=1)
        n_keep = x.shape[1]
        if mask is not None:
            # Text keys are never zeroed: ones for the persistent and the per-block tokens.
            n_ones = n_keep - n_img + texts[min(cfg.num_layers, len(texts) - 1)].shape[1]
            mask = mx.concatenate([mask, mx.ones((b, n_ones), mask.dtype)], axis=1)
        for j, blk in enumerate(self.single_stream_blocks):
            extra = texts[cfg.num_layers + j]
            x = blk.block(mx.concatenate([x, extra], axis=1), mask, temb, rope)
            self._dbg(f"single.{j}.out", x)
            x = x[:, :n_keep]
        out = self.final_layer(x[:, :n_img], temb)
        self._dbg("final_layer", out)
        return unpatchify(out, patches.grid, cfg.patch_size)
