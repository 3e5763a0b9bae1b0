"""The T5 encoder (HiDream-I1's T5-XXL ``text_encoder_3``), as transformers' ``T5EncoderModel``
computes it.

Attribute names equal the checkpoint's (``encoder.block.N.layer.0.SelfAttention.q`` ...). T5
differs from the textbook transformer in ways that all matter for parity: no 1/sqrt(d) score
scale, no biases, RMS layer norms without mean subtraction, and a learned relative position
bias (bucketed by log distance) owned by block 0 and added in every block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from hidream_mlx.families.i1.encoder_common import (
    activation,
    encoder_tensors,
    load_encoder,
    read_json_config,
    require,
)

# Saved by some exports as a second copy of the tied token table.
_EMBED_ALIAS = {"encoder.embed_tokens.weight": "shared.weight"}


@dataclass(frozen=True)
class T5Config:
    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_heads: int
    num_layers: int
    relative_attention_num_buckets: int
    relative_attention_max_distance: int
    layer_norm_epsilon: float
    dense_act_fn: str
    is_gated_act: bool

    @classmethod
    def from_dict(cls, cfg: dict, where: str = "T5 config") -> "T5Config":
        proj = str(cfg.get("feed_forward_proj", "relu"))
        gated = proj.startswith("gated-")
        act = str(cfg.get("dense_act_fn", proj.split("-")[-1]))
        # transformers maps the legacy name "gated-gelu" to the tanh gelu.
        if proj == "gated-gelu":
            act = "gelu_new"
        return cls(
            vocab_size=int(require(cfg, "vocab_size", where)),
            d_model=int(require(cfg, "d_model", where)),
            d_kv=int(require(cfg, "d_kv", where)),
            d_ff=int(require(cfg, "d_ff", where)),
            num_heads=int(require(cfg, "num_heads", where)),
            num_layers=int(require(cfg, "num_layers", where)),
            relative_attention_num_buckets=int(cfg.get("relative_attention_num_buckets", 32)),
            relative_attention_max_distance=int(cfg.get("relative_attention_max_distance", 128)),
            layer_norm_epsilon=float(cfg.get("layer_norm_epsilon", 1e-6)),
            dense_act_fn=act,
            is_gated_act=bool(cfg.get("is_gated_act", gated)),
        )


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """[T, T] bucket of (key - query) for a bidirectional encoder, as T5 buckets it.

    Half the buckets per direction; within each, the first half are exact distances and the
    rest grow logarithmically up to ``max_distance``. float32 like the reference, because the
    log bucket edges are truncated to integers.
    """
    pos = np.arange(length, dtype=np.int64)
    rel = pos[None, :] - pos[:, None]
    half = num_buckets // 2
    buckets = (rel > 0).astype(np.int64) * half
    n = np.abs(rel)
    max_exact = half // 2
    with np.errstate(divide="ignore"):
        scaled = (np.log(n.astype(np.float32) / np.float32(max_exact))
                  / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact))
    large = max_exact + np.where(n < max_exact, 0, scaled).astype(np.int64)
    large = np.minimum(large, half - 1)
    return buckets + np.where(n < max_exact, n, large)


class T5LayerNorm(nn.Module):
    """Scale-only RMS norm (no mean subtraction, no bias)."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x):
        return mx.fast.rms_norm(x, self.weight, self.eps)


class T5Attention(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_bias: bool):
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv
        self.n_heads, self.d_kv = cfg.num_heads, cfg.d_kv
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if has_relative_bias:
            self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)

    def position_bias(self, length: int, cfg: T5Config) -> mx.array:
        buckets = relative_position_buckets(length, cfg.relative_attention_num_buckets,
                                            cfg.relative_attention_max_distance)
        values = self.relative_attention_bias(mx.array(buckets))  # [T, T, H]
        return values.transpose(2, 0, 1)[None].astype(mx.float32)  # [1, H, T, T]

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        b, t, _ = x.shape

        def heads(a):
            return a.reshape(b, t, self.n_heads, self.d_kv).transpose(0, 2, 1, 3)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        # Scores and softmax in float32 as the reference does; no 1/sqrt(d) scale in T5.
        scores = (q.astype(mx.float32) @ k.astype(mx.float32).transpose(0, 1, 3, 2)) + bias
        weights = mx.softmax(scores, axis=-1).astype(v.dtype)
        out = (weights @ v).transpose(0, 2, 1, 3).reshape(b, t, -1)
        return self.o(out)


class T5LayerSelfAttention(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(cfg, has_relative_bias)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def __call__(self, x, bias):
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5DenseGatedActDense(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.act = activation(cfg.dense_act_fn)
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def __call__(self, x):
        return self.wo(self.act(self.wi_0(x)) * self.wi_1(x))


class T5DenseActDense(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.act = activation(cfg.dense_act_fn)
        self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def __call__(self, x):
        return self.wo(self.act(self.wi(x)))


class T5LayerFF(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(cfg) if cfg.is_gated_act else T5DenseActDense(cfg)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def __call__(self, x):
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_bias: bool):
        super().__init__()
        self.layer = [T5LayerSelfAttention(cfg, has_relative_bias), T5LayerFF(cfg)]

    def __call__(self, x, bias):
        return self.layer[1](self.layer[0](x, bias))


class T5Stack(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.block = [T5Block(cfg, has_relative_bias=i == 0) for i in range(cfg.num_layers)]
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)


class T5EncoderModel(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.config = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = T5Stack(cfg)

    def __call__(self, input_ids: mx.array, attention_mask: mx.array) -> mx.array:
        """``last_hidden_state`` [B, T, d_model]; masked keys get no weight, masked rows still
        come out (the pipeline passes all T positions on)."""
        t = input_ids.shape[1]
        x = self.shared(input_ids)
        first = self.encoder.block[0].layer[0].SelfAttention
        key_mask = mx.where(attention_mask.astype(mx.bool_), 0.0, -mx.inf)[:, None, None, :]
        bias = first.position_bias(t, self.config) + key_mask.astype(mx.float32)
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)


def load_t5(folder: Path | str, dtype: mx.Dtype = mx.float32, lazy: bool = True) -> T5EncoderModel:
    """A ``text_encoder_3/`` folder (``T5EncoderModel``), loaded strictly."""
    folder = Path(folder)
    cfg = T5Config.from_dict(read_json_config(folder, "T5 encoder"), f"{folder}/config.json")
    model = T5EncoderModel(cfg)
    return load_encoder(model, folder, dtype, t5_tensors(folder), strip_model_prefix=False, lazy=lazy)


def t5_tensors(folder: Path | str) -> dict:
    """The tensors ``load_t5`` loads, by module path (headers only; memory sizes them too)."""
    return encoder_tensors(Path(folder), strip_model_prefix=False, aliases=_EMBED_ALIAS)
