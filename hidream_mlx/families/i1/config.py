"""Configs of the HiDream-I1 image components, read from diffusers ``config.json`` files.

Unknown keys are ignored (diffusers adds bookkeeping keys); a missing or mistyped key is an
error that names the key and the file.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

from hidream_mlx.weights.loading import ModelLoadError


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: cannot read config ({e})") from None


def _take(cls, raw: dict, where: Path, optional: dict):
    values = {}
    for f in fields(cls):
        if f.name in raw:
            values[f.name] = raw[f.name]
        elif f.name in optional:
            values[f.name] = optional[f.name]
        else:
            raise ModelLoadError(f"{where}: missing key {f.name!r}")
    return cls(**values)


@dataclass(frozen=True)
class TransformerConfig:
    """``HiDreamImageTransformer2DModel`` hyper-parameters."""

    patch_size: int
    in_channels: int
    out_channels: int
    num_layers: int
    num_single_layers: int
    attention_head_dim: int
    num_attention_heads: int
    caption_channels: list
    text_emb_dim: int
    num_routed_experts: int
    num_activated_experts: int
    axes_dims_rope: list
    max_resolution: list
    llama_layers: list

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def max_seq(self) -> int:
        """Token count of the padded (non-square) path."""
        return self.max_resolution[0] * self.max_resolution[1] // (self.patch_size ** 2)

    @classmethod
    def from_dict(cls, raw: dict, where: Path = Path("config.json")) -> "TransformerConfig":
        cfg = _take(cls, raw, where, {"out_channels": raw.get("in_channels")})
        n = cfg.num_layers + cfg.num_single_layers
        if len(cfg.llama_layers) != n:
            raise ModelLoadError(f"{where}: key 'llama_layers' has {len(cfg.llama_layers)} entries, expected {n}")
        if len(cfg.caption_channels) != 2:
            raise ModelLoadError(f"{where}: key 'caption_channels' must be [t5_width, llama_width]")
        if sum(cfg.axes_dims_rope) not in (cfg.attention_head_dim, cfg.attention_head_dim // 2):
            raise ModelLoadError(f"{where}: key 'axes_dims_rope' must sum to head_dim or head_dim/2")
        return cfg

    @classmethod
    def load(cls, folder: Path) -> "TransformerConfig":
        path = Path(folder) / "config.json"
        return cls.from_dict(read_json(path), path)


@dataclass(frozen=True)
class VAEConfig:
    """FLUX-style ``AutoencoderKL`` hyper-parameters."""

    in_channels: int
    out_channels: int
    latent_channels: int
    block_out_channels: list
    layers_per_block: int
    norm_num_groups: int
    scaling_factor: float
    shift_factor: float
    use_quant_conv: bool
    use_post_quant_conv: bool
    mid_block_add_attention: bool

    @classmethod
    def from_dict(cls, raw: dict, where: Path = Path("config.json")) -> "VAEConfig":
        cfg = _take(cls, raw, where, {"shift_factor": 0.0, "use_quant_conv": True, "use_post_quant_conv": True,
                                      "mid_block_add_attention": True})
        if cfg.shift_factor is None:
            cfg = VAEConfig(**{**cfg.__dict__, "shift_factor": 0.0})
        return cfg

    @classmethod
    def load(cls, folder: Path) -> "VAEConfig":
        path = Path(folder) / "config.json"
        return cls.from_dict(read_json(path), path)
