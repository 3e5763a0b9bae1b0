"""CLIP text encoder with projection (HiDream-I1's CLIP-L and CLIP-G), as transformers'
``CLIPTextModelWithProjection`` computes it.

Attribute names equal the checkpoint's (``text_model.encoder.layers.N.self_attn.q_proj`` ...),
so loading needs no renaming. The pipeline gives CLIP no padding mask: every position attends
causally to all earlier ones, padding included, and the pooled vector is read at the first
end-of-text position before ``text_projection`` (no bias).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from hidream_mlx.families.i1.encoder_common import (
    activation,
    encoder_tensors,
    load_encoder,
    read_json_config,
    require,
)

# A buffer older transformers versions saved with the weights; it is arange(max_positions).
_POSITION_IDS = "text_model.embeddings.position_ids"
# transformers' legacy marker: configs whose eos_token_id is 2 pool at the largest id instead.
_LEGACY_EOS_ID = 2


@dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_hidden_layers: int
    max_position_embeddings: int
    projection_dim: int
    hidden_act: str
    layer_norm_eps: float
    eos_token_id: int

    @classmethod
    def from_dict(cls, cfg: dict, where: str = "CLIP config") -> "CLIPTextConfig":
        if "text_config" in cfg and "hidden_size" not in cfg:
            cfg = {**cfg["text_config"], "projection_dim": cfg.get("projection_dim")}
        return cls(
            vocab_size=int(require(cfg, "vocab_size", where)),
            hidden_size=int(require(cfg, "hidden_size", where)),
            intermediate_size=int(require(cfg, "intermediate_size", where)),
            num_attention_heads=int(require(cfg, "num_attention_heads", where)),
            num_hidden_layers=int(require(cfg, "num_hidden_layers", where)),
            max_position_embeddings=int(require(cfg, "max_position_embeddings", where)),
            projection_dim=int(require(cfg, "projection_dim", where)),
            hidden_act=str(cfg.get("hidden_act", "quick_gelu")),
            layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-5)),
            eos_token_id=int(cfg.get("eos_token_id", _LEGACY_EOS_ID)),
        )


class CLIPAttention(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        d = cfg.hidden_size
        self.n_heads = cfg.num_attention_heads
        self.head_dim = d // cfg.num_attention_heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        b, t, _ = x.shape

        def heads(a):
            return a.reshape(b, t, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)

        out = mx.fast.scaled_dot_product_attention(
            heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)),
            scale=self.head_dim**-0.5, mask=mask)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(b, t, -1))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.act = activation(cfg.hidden_act)
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def __call__(self, x, mask):
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = [CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)]


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def __call__(self, input_ids: mx.array) -> mx.array:
        return self.token_embedding(input_ids) + self.position_embedding(mx.arange(input_ids.shape[1]))


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


@dataclass
class CLIPOutput:
    last_hidden_state: mx.array  # [B, T, hidden], after final_layer_norm
    text_embeds: mx.array  # [B, projection_dim]


class CLIPTextModelWithProjection(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.config = cfg
        self.text_model = CLIPTextTransformer(cfg)
        self.text_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)

    def pool_positions(self, input_ids: mx.array) -> mx.array:
        """Index of the first end-of-text token per row (first largest id for legacy configs)."""
        if self.config.eos_token_id == _LEGACY_EOS_ID:
            return mx.argmax(input_ids, axis=-1)
        return mx.argmax((input_ids == self.config.eos_token_id).astype(mx.int32), axis=-1)

    def __call__(self, input_ids: mx.array) -> CLIPOutput:
        t = input_ids.shape[1]
        if t > self.config.max_position_embeddings:
            raise ValueError(f"CLIP: {t} tokens exceed max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        x = self.text_model.embeddings(input_ids)
        mask = nn.MultiHeadAttention.create_additive_causal_mask(t).astype(x.dtype)
        for layer in self.text_model.encoder.layers:
            x = layer(x, mask)
        hidden = self.text_model.final_layer_norm(x)
        rows = mx.arange(input_ids.shape[0])
        pooled = hidden[rows, self.pool_positions(input_ids)]
        return CLIPOutput(hidden, self.text_projection(pooled))


def load_clip(folder: Path | str, dtype: mx.Dtype = mx.float32, lazy: bool = True
              ) -> CLIPTextModelWithProjection:
    """A ``text_encoder/`` or ``text_encoder_2/`` folder, loaded strictly."""
    folder = Path(folder)
    cfg = CLIPTextConfig.from_dict(read_json_config(folder, "CLIP text encoder"), f"{folder}/config.json")
    model = CLIPTextModelWithProjection(cfg)
    return load_encoder(model, folder, dtype, clip_tensors(folder), strip_model_prefix=False, lazy=lazy)


def clip_tensors(folder: Path | str) -> dict:
    """The tensors ``load_clip`` loads, by module path (headers only; memory sizes them too)."""
    return encoder_tensors(Path(folder), strip_model_prefix=False, drop=(_POSITION_IDS,))
