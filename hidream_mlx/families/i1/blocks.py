"""Attention, RoPE and the double/single stream blocks of the HiDream-I1 transformer."""
from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from hidream_mlx.families.i1.moe import MoEFeedForward, SwiGLU

NORM_EPS = 1e-6
QK_NORM_EPS = 1e-5


def rope_angles(ids: np.ndarray, axes_dims) -> mx.array:
    """cos/sin tables [B, N, sum(axes)/2, 2] for 3-axis ids [B, N, 3]. Angles are
    computed in float64 (as the reference does) and rounded to float32 before cos/sin
    would lose that, so cos/sin are taken in float64 too."""
    parts = []
    for axis, dim in enumerate(axes_dims):
        omega = 1.0 / (10000.0 ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
        angle = ids[..., axis].astype(np.float64)[..., None] * omega
        parts.append(angle)
    angle = np.concatenate(parts, axis=-1)
    table = np.stack([np.cos(angle), np.sin(angle)], axis=-1).astype(np.float32)
    return mx.array(table)


def apply_rope(x: mx.array, table: mx.array) -> mx.array:
    """Rotate adjacent pairs ``(x[2j], x[2j+1])`` of x [B, N, H, d] in float32; when the
    table covers only half the head, the second half passes through."""
    dtype = x.dtype
    x = x.astype(mx.float32)
    rot = table.shape[-2] * 2
    head, rest = x[..., :rot], x[..., rot:]
    pairs = head.reshape(*head.shape[:-1], -1, 2)
    cos = table[:, :, None, :, 0]
    sin = table[:, :, None, :, 1]
    a, b = pairs[..., 0], pairs[..., 1]
    out = mx.stack([cos * a - sin * b, sin * a + cos * b], axis=-1).reshape(head.shape)
    if rest.shape[-1]:
        out = mx.concatenate([out, rest], axis=-1)
    return out.astype(dtype)


class Attention(nn.Module):
    """Joint attention; ``dual`` adds the text-stream projections (``*_t``)."""

    def __init__(self, dim: int, heads: int, head_dim: int, dual: bool):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.dual = dual
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.to_out = nn.Linear(inner, dim)
        self.q_rms_norm = nn.RMSNorm(inner, eps=QK_NORM_EPS)
        self.k_rms_norm = nn.RMSNorm(inner, eps=QK_NORM_EPS)
        if dual:
            self.to_q_t = nn.Linear(dim, inner)
            self.to_k_t = nn.Linear(dim, inner)
            self.to_v_t = nn.Linear(dim, inner)
            self.to_out_t = nn.Linear(inner, dim)
            self.q_rms_norm_t = nn.RMSNorm(inner, eps=QK_NORM_EPS)
            self.k_rms_norm_t = nn.RMSNorm(inner, eps=QK_NORM_EPS)

    def _heads(self, x):
        b, n, inner = x.shape
        return x.reshape(b, n, self.heads, inner // self.heads)

    def __call__(self, x, mask, text, rope):
        q = self._heads(self.q_rms_norm(self.to_q(x)))
        k = self._heads(self.k_rms_norm(self.to_k(x)))
        v = self._heads(self.to_v(x))
        if mask is not None:
            # The reference zeroes padded image keys (logit 0), it does not mask them out.
            k = k * mask[:, :, None, None].astype(k.dtype)
        n_img = x.shape[1]
        if self.dual:
            q = mx.concatenate([q, self._heads(self.q_rms_norm_t(self.to_q_t(text)))], axis=1)
            k = mx.concatenate([k, self._heads(self.k_rms_norm_t(self.to_k_t(text)))], axis=1)
            v = mx.concatenate([v, self._heads(self.to_v_t(text))], axis=1)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        scale = 1.0 / math.sqrt(q.shape[-1])
        out = mx.fast.scaled_dot_product_attention(
            q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), scale=scale)
        out = out.transpose(0, 2, 1, 3).reshape(x.shape[0], -1, q.shape[2] * q.shape[3])
        if not self.dual:
            return self.to_out(out)
        return self.to_out(out[:, :n_img]), self.to_out_t(out[:, n_img:])


def _modulate(x, shift, scale):
    return mx.fast.layer_norm(x, None, None, NORM_EPS) * (1 + scale) + shift


def adaln(dim: int, chunks: int) -> list:
    """``SiLU -> Linear`` as a list, so the Linear is ``adaLN_modulation.1`` like the checkpoint."""
    return [nn.SiLU(), nn.Linear(dim, chunks * dim)]


def modulation(layers: list, temb, chunks: int):
    return mx.split(layers[1](nn.silu(temb))[:, None], chunks, axis=-1)


def _moe(cfg, widths):
    return MoEFeedForward(cfg.inner_dim, cfg.num_routed_experts, cfg.num_activated_experts,
                          widths[0], widths[1])


class DoubleBlock(nn.Module):
    """Separate image/text streams, one joint attention; image FFN is the MoE."""

    def __init__(self, cfg, widths):
        super().__init__()
        dim = cfg.inner_dim
        self.adaLN_modulation = adaln(dim, 12)
        self.attn1 = Attention(dim, cfg.num_attention_heads, cfg.attention_head_dim, dual=True)
        self.ff_i = _moe(cfg, widths)
        self.ff_t = SwiGLU(dim, widths[2])

    def __call__(self, img, mask, text, temb, rope):
        (sh_ai, sc_ai, g_ai, sh_fi, sc_fi, g_fi,
         sh_at, sc_at, g_at, sh_ft, sc_ft, g_ft) = modulation(self.adaLN_modulation, temb, 12)
        a_i, a_t = self.attn1(_modulate(img, sh_ai, sc_ai), mask, _modulate(text, sh_at, sc_at), rope)
        img = g_ai * a_i + img
        text = g_at * a_t + text
        img = g_fi * self.ff_i(_modulate(img, sh_fi, sc_fi)) + img
        text = g_ft * self.ff_t(_modulate(text, sh_ft, sc_ft)) + text
        return img, text


class SingleBlock(nn.Module):
    """One stream over ``[image; text]``; the MoE routes text tokens too."""

    def __init__(self, cfg, widths):
        super().__init__()
        dim = cfg.inner_dim
        self.adaLN_modulation = adaln(dim, 6)
        self.attn1 = Attention(dim, cfg.num_attention_heads, cfg.attention_head_dim, dual=False)
        self.ff_i = _moe(cfg, widths)

    def __call__(self, x, mask, temb, rope):
        sh_a, sc_a, g_a, sh_f, sc_f, g_f = modulation(self.adaLN_modulation, temb, 6)
        x = g_a * self.attn1(_modulate(x, sh_a, sc_a), mask, None, rope) + x
        return g_f * self.ff_i(_modulate(x, sh_f, sc_f)) + x


class Wrapped(nn.Module):
    """The reference nests each block under ``.block``; kept so names match the checkpoint."""

    def __init__(self, block):
        super().__init__()
        self.block = block
