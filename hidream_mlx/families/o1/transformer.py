"""The HiDream-O1 transformer: a Qwen3-VL text decoder plus HiDream's pixel heads.

Attribute names mirror the checkpoint (``model.`` stripped), so loading is a prefix strip.

Two ways through the same layers:
* ``forward``: the whole sequence at once with the 4D mask (text causal, generation tokens
  see everything). Used to check intermediates and as the naive baseline.
* ``encode_prefix`` + ``denoise``: the text prefix never attends to the timestep or the
  image, so its keys and values are identical at every denoising step. ``encode_prefix``
  computes them once per prompt; ``denoise`` runs only the generation tokens (tms + patches)
  against them. This is exact, and it is the path generation and replay use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from hidream_mlx.families.o1.config import PATCH_DIM, TIMESTEP_FREQ_DIM, ModelConfig, TextConfig
from hidream_mlx.rope import apply_rotate_half
from hidream_mlx.families.o1.positions import rope_tables


@dataclass
class LayerKV:
    keys: mx.array  # [B, kv_heads, T, head_dim], roped
    values: mx.array


@dataclass
class PrefixCache:
    """Per-layer keys/values of the text prefix; valid for every step of one prompt."""

    layers: list[LayerKV]

    @property
    def length(self) -> int:
        return self.layers[0].keys.shape[2] if self.layers else 0

    @property
    def nbytes(self) -> int:
        return sum(kv.keys.nbytes + kv.values.nbytes for kv in self.layers)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=cfg.rms_norm_eps)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=cfg.rms_norm_eps)

    def project(self, x: mx.array, cos: mx.array, sin: mx.array):
        b, length, _ = x.shape
        q = self.q_proj(x).reshape(b, length, self.n_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, length, self.n_kv, self.head_dim)
        v = self.v_proj(x).reshape(b, length, self.n_kv, self.head_dim)
        q = apply_rotate_half(self.q_norm(q).transpose(0, 2, 1, 3), cos, sin)
        k = apply_rotate_half(self.k_norm(k).transpose(0, 2, 1, 3), cos, sin)
        return q, k, v.transpose(0, 2, 1, 3)

    def __call__(self, x, cos, sin, mask=None, prefix: Optional[LayerKV] = None):
        """Attention for ``x``; with ``prefix`` its cached keys/values are prepended.

        Returns the output and this call's own (keys, values).
        """
        q, k, v = self.project(x, cos, sin)
        own = LayerKV(k, v)
        if prefix is not None:
            k = mx.concatenate([prefix.keys, k], axis=2)
            v = mx.concatenate([prefix.values, v], axis=2)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        b, _, length, _ = out.shape
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(b, length, -1)), own


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def __call__(self, x):
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def __call__(self, x, cos, sin, mask=None, prefix=None):
        attn, own = self.self_attn(self.input_layernorm(x), cos, sin, mask, prefix)
        h = x + attn
        return h + self.mlp(self.post_attention_layernorm(h)), own


class LanguageModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)]
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)


class TimestepEmbedder(nn.Module):
    """Sinusoid of t*1000 (cos first, then sin) -> Linear -> SiLU -> Linear."""

    def __init__(self, hidden: int, freq_dim: int = TIMESTEP_FREQ_DIM):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = [nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden)]

    def sinusoid(self, t: mx.array) -> mx.array:
        half = self.freq_dim // 2
        freqs = mx.exp(-math.log(10000.0) * mx.arange(half, dtype=mx.float32) / half)
        args = (t.astype(mx.float32) * 1000.0)[:, None] * freqs[None]
        return mx.concatenate([mx.cos(args), mx.sin(args)], axis=-1)

    def __call__(self, t: mx.array) -> mx.array:
        x = self.sinusoid(t).astype(self.mlp[0].weight.dtype)
        for layer in self.mlp:
            x = layer(x)
        return x


class PatchEmbedder(nn.Module):
    def __init__(self, hidden: int, patch_dim: int = PATCH_DIM):
        super().__init__()
        self.proj1 = nn.Linear(patch_dim, hidden // 4, bias=False)
        self.proj2 = nn.Linear(hidden // 4, hidden, bias=True)

    def __call__(self, x):
        return self.proj2(self.proj1(x))


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, patch_dim: int = PATCH_DIM):
        super().__init__()
        self.linear = nn.Linear(hidden, patch_dim)

    def __call__(self, x):
        return self.linear(x)


def stack_prefix_caches(first: PrefixCache, second: PrefixCache) -> tuple[PrefixCache, mx.array]:
    """Two prompts' caches as one batch of 2, the shorter right-padded with zero keys/values.

    Keys are roped before caching, so padding moves no position; the returned key mask
    [2, T_max] (True = a real key) tells ``denoise`` to ignore the padding.
    """
    length = max(first.length, second.length)

    def padded(a: mx.array) -> mx.array:
        missing = length - a.shape[2]
        if missing == 0:
            return a
        pad = mx.zeros((*a.shape[:2], missing, a.shape[3]), dtype=a.dtype)
        return mx.concatenate([a, pad], axis=2)

    layers = [LayerKV(mx.concatenate([padded(a.keys), padded(b.keys)], axis=0),
                      mx.concatenate([padded(a.values), padded(b.values)], axis=0))
              for a, b in zip(first.layers, second.layers)]
    columns = mx.arange(length)[None, :]
    key_mask = columns < mx.array([[first.length], [second.length]])
    return PrefixCache(layers), key_mask


def generation_mask(text_len: int, total_len: int) -> mx.array:
    """[L, L] boolean: autoregressive rows causal, generation rows (index >= text_len) full."""
    rows = mx.arange(total_len)[:, None]
    cols = mx.arange(total_len)[None, :]
    return (cols <= rows) | (rows >= text_len)


class HiDreamO1(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        d = config.text.hidden_size
        self.language_model = LanguageModel(config.text)
        self.x_embedder = PatchEmbedder(d)
        self.t_embedder1 = TimestepEmbedder(d)
        self.final_layer2 = FinalLayer(d)

    @property
    def dtype(self):
        return self.language_model.norm.weight.dtype

    def rope(self, positions) -> tuple[mx.array, mx.array]:
        positions = np.asarray(positions)
        if positions.ndim == 3:  # one row of positions per batch item -> tables [B, 1, L, head_dim]
            tables = [rope_tables(self.config.text, p) for p in positions]
            return tuple(mx.stack([t[i] for t in tables])[:, None] for i in range(2))
        return rope_tables(self.config.text, positions)

    def embed_generation(self, timestep: mx.array, patches: mx.array) -> mx.array:
        """[B, 1 + N, D]: the timestep embedding (in place of the tms token) then the patches."""
        b = patches.shape[0]
        t = mx.broadcast_to(mx.array(timestep, dtype=mx.float32).reshape(-1), (b,))
        t_emb = self.t_embedder1(t)[:, None, :]
        x_emb = self.x_embedder(patches.astype(self.dtype))
        return mx.concatenate([t_emb.astype(x_emb.dtype), x_emb], axis=1)

    def embed_text(self, input_ids: mx.array, image_embeds: Optional[mx.array] = None,
                   image_mask: Optional[mx.array] = None) -> mx.array:
        h = self.language_model.embed_tokens(input_ids)
        if image_embeds is not None:
            h = _scatter_rows(h, image_mask, image_embeds.astype(h.dtype))
        return h

    def encode_prefix(
        self,
        input_ids: mx.array,
        positions,
        image_embeds: Optional[mx.array] = None,
        image_mask: Optional[mx.array] = None,
        deepstack: Sequence[mx.array] = (),
    ) -> PrefixCache:
        """Keys/values of the autoregressive prefix [B, T] (everything before the tms token).

        For editing, ``image_embeds`` replace the embeddings where ``image_mask`` [B, T] is true,
        and ``deepstack[i]`` is added there after decoder layer i.
        """
        h = self.embed_text(input_ids, image_embeds, image_mask)
        cos, sin = self.rope(positions)
        cache = []
        for i, layer in enumerate(self.language_model.layers):
            h, own = layer(h, cos, sin, mask="causal")
            cache.append(own)
            if i < len(deepstack):
                h = _scatter_add_rows(h, image_mask, deepstack[i].astype(h.dtype))
        return PrefixCache(cache)

    def denoise(self, cache: PrefixCache, timestep, patches: mx.array, positions,
                num_target: Optional[int] = None, key_mask: Optional[mx.array] = None,
                rope: Optional[tuple[mx.array, mx.array]] = None) -> mx.array:
        """x0 prediction [B, num_target, 3072] in float32 for noisy patches [B, N, 3072].

        ``positions`` [3, 1 + N] (or [B, 3, 1 + N], one row per batch item) are those of the
        tms token and the patches. Patches past ``num_target`` (editing references) take part
        but are not returned. ``key_mask`` [B, cache.length] (boolean) marks the cached keys
        each batch item may see: batched caches of unequal prompts are padded (see
        :func:`stack_prefix_caches`), and the padding must stay invisible. ``rope`` are the
        tables of ``positions`` when the caller already has them (they do not change between steps).
        """
        h = self.embed_generation(timestep, patches)
        cos, sin = rope if rope is not None else self.rope(positions)
        mask = None
        if key_mask is not None:
            own = mx.ones((key_mask.shape[0], h.shape[1]), dtype=mx.bool_)
            mask = mx.concatenate([key_mask.astype(mx.bool_), own], axis=1)[:, None, None, :]
        for layer, kv in zip(self.language_model.layers, cache.layers):
            h, _ = layer(h, cos, sin, mask=mask, prefix=kv)
        return self._predict(h[:, 1:], num_target)

    def forward(self, input_ids: mx.array, positions, timestep, patches: mx.array,
                num_target: Optional[int] = None, return_hidden: bool = False):
        """The whole sequence in one pass with the 4D mask (the reference's own formulation)."""
        text = self.embed_text(input_ids[:, :-1])
        h = mx.concatenate([text, self.embed_generation(timestep, patches)], axis=1)
        length = h.shape[1]
        mask = generation_mask(input_ids.shape[1] - 1, length)
        cos, sin = self.rope(positions)
        hidden = []
        for layer in self.language_model.layers:
            h, _ = layer(h, cos, sin, mask=mask)
            hidden.append(h)
        out = self._predict(h[:, input_ids.shape[1]:], num_target)
        return (out, hidden) if return_hidden else out

    def _predict(self, h: mx.array, num_target: Optional[int]) -> mx.array:
        if num_target is not None:
            h = h[:, :num_target]
        return self.final_layer2(self.language_model.norm(h)).astype(mx.float32)


def _mask_rows(mask) -> mx.array:
    """Flat row indices where ``mask`` [B, T] is true (host-side: masks come from the prompt)."""
    return mx.array(np.nonzero(np.asarray(mask).reshape(-1))[0])


def _scatter_rows(h: mx.array, mask, rows: mx.array) -> mx.array:
    """Replace the rows of h where ``mask`` is true with ``rows``, in order."""
    flat = h.reshape(-1, h.shape[-1])
    flat[_mask_rows(mask)] = rows.reshape(-1, h.shape[-1])
    return flat.reshape(h.shape)


def _scatter_add_rows(h: mx.array, mask, rows: mx.array) -> mx.array:
    idx = _mask_rows(mask)
    flat = h.reshape(-1, h.shape[-1])
    flat[idx] = flat[idx] + rows.reshape(-1, h.shape[-1])
    return flat.reshape(h.shape)
