"""Llama-3.1 decoder as HiDream-I1's fourth text encoder: the hidden state after every layer.

Our own small decoder (GQA attention, SwiGLU MLP, RMS norms, rotate-half RoPE with the llama3
frequency scaling); no language-model head. Module paths are the checkpoint's with ``model.``
stripped, so a transformers folder and an mlx-lm folder (already quantized: ``.scales`` and
``.biases`` beside each packed weight, a ``quantization`` block in config.json) both load by
name. What the pipeline uses is ``hidden_states[1:]`` of transformers: the residual stream after
each layer, except that the last entry is after the final norm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from hidream_mlx.families.i1.encoder_common import (
    activation,
    apply_stored_quantization,
    encoder_tensors,
    load_encoder,
    read_json_config,
    require,
)
from hidream_mlx.weights.loading import ModelLoadError
from hidream_mlx.rope import apply_rotate_half


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Optional[dict] = None
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    quantization: Optional[dict] = field(default=None, compare=False)

    @classmethod
    def from_dict(cls, cfg: dict, where: str = "Llama config") -> "LlamaConfig":
        hidden = int(require(cfg, "hidden_size", where))
        heads = int(require(cfg, "num_attention_heads", where))
        # transformers 5 writes rope_parameters (theta inside); 4.x rope_theta + rope_scaling.
        rope = cfg.get("rope_parameters") or {}
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = dict(rope or cfg.get("rope_scaling") or {}) or None
        if scaling is not None:
            scaling.pop("rope_theta", None)
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            if kind == "default":
                scaling = None
            elif kind != "llama3":
                raise ModelLoadError(f"{where}: rope type {kind!r} is not supported (default or llama3)")
        return cls(
            vocab_size=int(require(cfg, "vocab_size", where)),
            hidden_size=hidden,
            intermediate_size=int(require(cfg, "intermediate_size", where)),
            num_hidden_layers=int(require(cfg, "num_hidden_layers", where)),
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=scaling,
            hidden_act=str(cfg.get("hidden_act", "silu")),
            attention_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            quantization=cfg.get("quantization"),
        )


def inverse_frequencies(cfg: LlamaConfig) -> np.ndarray:
    """RoPE inverse frequencies (float32), with llama3's long-context rescaling if configured:
    long wavelengths divided by ``factor``, short ones kept, a linear blend between."""
    dim = cfg.head_dim
    inv = (1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))))
    inv = inv.astype(np.float32)
    s = cfg.rope_scaling
    if not s:
        return inv
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old = float(s["original_max_position_embeddings"])
    wavelen = (2 * math.pi / inv).astype(np.float32)
    scaled = np.where(wavelen > old / low, inv / factor, inv).astype(np.float32)
    smooth = ((old / wavelen - low) / (high - low)).astype(np.float32)
    blended = ((1 - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    return np.where(medium, blended, scaled).astype(np.float32)


def rope_tables(cfg: LlamaConfig, length: int) -> tuple[mx.array, mx.array]:
    """cos and sin [T, head_dim] (each frequency twice, rotate-half layout), float32."""
    freqs = np.arange(length, dtype=np.float32)[:, None] * inverse_frequencies(cfg)[None, :]
    angles = np.concatenate([freqs, freqs], axis=-1)
    return mx.array(np.cos(angles)), mx.array(np.sin(angles))


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=bias)

    def __call__(self, x, cos, sin, mask):
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(b, t, self.n_kv, self.head_dim).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(b, t, self.n_kv, self.head_dim).transpose(0, 2, 1, 3)
        q, k = apply_rotate_half(q, cos, sin), apply_rotate_half(k, cos, sin)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(b, t, -1))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.act = activation(cfg.hidden_act)
        d, f, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(d, f, bias=bias)
        self.up_proj = nn.Linear(d, f, bias=bias)
        self.down_proj = nn.Linear(f, d, bias=bias)

    def __call__(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.self_attn = LlamaAttention(cfg)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def __call__(self, x, cos, sin, mask):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


def attention_mask(padding_mask: mx.array) -> mx.array:
    """[B, 1, T, T] boolean: causal and only real (mask 1) keys. With right padding every row
    keeps at least its first key, so no row is empty."""
    t = padding_mask.shape[1]
    causal = mx.arange(t)[None, :] <= mx.arange(t)[:, None]
    return causal[None, None] & padding_mask.astype(mx.bool_)[:, None, None, :]


class LlamaModel(nn.Module):
    """``model.*`` of ``LlamaForCausalLM`` (``lm_head`` is never built)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [LlamaDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)]
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def hidden_states(self, input_ids: mx.array, padding_mask: mx.array) -> mx.array:
        """[L, B, T, hidden]: entry i is the output of layer i; the last one after ``norm``."""
        x = self.embed_tokens(input_ids)
        cos, sin = rope_tables(self.config, input_ids.shape[1])
        mask = attention_mask(padding_mask)
        outputs = []
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
            outputs.append(x)
        outputs[-1] = self.norm(x)
        return mx.stack(outputs, axis=0)


def load_llama(folder: Path | str, dtype: mx.Dtype = mx.float32, lazy: bool = True) -> LlamaModel:
    """A ``text_encoder_4/`` folder: transformers ``LlamaForCausalLM``, or an mlx-lm folder
    quantized beforehand (its config.json ``quantization`` block and ``.scales`` tensors)."""
    folder = Path(folder)
    cfg = LlamaConfig.from_dict(read_json_config(folder, "Llama"), f"{folder}/config.json")
    model = LlamaModel(cfg)
    tensors = llama_tensors(folder)
    if cfg.quantization:
        apply_stored_quantization(model, cfg.quantization, tensors, str(folder))
    return load_encoder(model, folder, dtype, tensors, strip_model_prefix=True, lazy=lazy)


def llama_tensors(folder: Path | str) -> dict:
    """The tensors ``load_llama`` loads, by module path (``model.`` stripped, no ``lm_head``)."""
    return encoder_tensors(Path(folder), strip_model_prefix=True)
