"""Model configuration: the stock ``qwen3_vl`` config.json of a HiDream-O1 checkpoint.

Unknown keys are ignored (checkpoints carry many training-only settings); a missing or
nonsensical value that the model needs is rejected with a message naming the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hidream_mlx.files import read_json_file

# HiDream hard-codes these ids in its model code; they are not in config.json.
TMS_TOKEN_ID = 151673
BOI_TOKEN_ID = 151669
# Target patch (r, c) sits at MRoPE position (FIX_POINT, FIX_POINT + r, FIX_POINT + c).
FIX_POINT = 4096
PATCH_SIZE = 32
PATCH_DIM = 3 * PATCH_SIZE * PATCH_SIZE
TIMESTEP_FREQ_DIM = 256


class ConfigError(ValueError):
    """A config.json that cannot describe a HiDream-O1 model."""


def _positive_int(section: str, data: dict, key: str, default: Any = None) -> int:
    value = data.get(key, default)
    if value is None:
        raise ConfigError(f"config.json: {section}.{key} is missing")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"config.json: {section}.{key} must be a positive integer, got {value!r}")
    return value


def _positive_float(section: str, data: dict, key: str, default: Any = None) -> float:
    value = data.get(key, default)
    if value is None:
        raise ConfigError(f"config.json: {section}.{key} is missing")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"config.json: {section}.{key} must be a positive number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class TextConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 5_000_000.0
    mrope_section: tuple[int, int, int] = (24, 20, 20)

    @classmethod
    def from_dict(cls, data: dict) -> "TextConfig":
        s = "text_config"
        heads = _positive_int(s, data, "num_attention_heads")
        hidden = _positive_int(s, data, "hidden_size")
        kv_heads = _positive_int(s, data, "num_key_value_heads", heads)
        head_dim = _positive_int(s, data, "head_dim", hidden // heads if hidden % heads == 0 else None)
        if heads % kv_heads:
            raise ConfigError(
                f"config.json: {s}.num_attention_heads ({heads}) must be a multiple of "
                f"num_key_value_heads ({kv_heads})"
            )
        if head_dim % 2:
            raise ConfigError(f"config.json: {s}.head_dim must be even, got {head_dim}")
        rope = data.get("rope_scaling") or data.get("rope_parameters") or {}
        section = rope.get("mrope_section")
        if section is None:
            raise ConfigError(f"config.json: {s}.rope_scaling.mrope_section is missing")
        if len(section) != 3 or any(not isinstance(v, int) or v < 0 for v in section):
            raise ConfigError(
                f"config.json: {s}.rope_scaling.mrope_section must be three non-negative integers, "
                f"got {section!r}"
            )
        if sum(section) != head_dim // 2:
            raise ConfigError(
                f"config.json: {s}.rope_scaling.mrope_section {list(section)} must sum to "
                f"head_dim/2 = {head_dim // 2}"
            )
        if rope.get("mrope_interleaved") is False:
            raise ConfigError(f"config.json: {s}: only interleaved MRoPE (Qwen3-VL) is supported")
        theta = data.get("rope_theta", rope.get("rope_theta", 5_000_000.0))
        return cls(
            hidden_size=hidden,
            num_hidden_layers=_positive_int(s, data, "num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            intermediate_size=_positive_int(s, data, "intermediate_size"),
            vocab_size=_positive_int(s, data, "vocab_size"),
            rms_norm_eps=_positive_float(s, data, "rms_norm_eps", 1e-6),
            rope_theta=_positive_float(s, {"rope_theta": theta}, "rope_theta"),
            mrope_section=tuple(section),
        )


@dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    out_hidden_size: int
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: tuple[int, ...] = ()
    hidden_act: str = "gelu_pytorch_tanh"

    @classmethod
    def from_dict(cls, data: dict) -> "VisionConfig":
        s = "vision_config"
        hidden = _positive_int(s, data, "hidden_size")
        heads = _positive_int(s, data, "num_heads")
        if hidden % heads:
            raise ConfigError(f"config.json: {s}.hidden_size ({hidden}) must be a multiple of num_heads ({heads})")
        depth = _positive_int(s, data, "depth")
        deepstack = tuple(data.get("deepstack_visual_indexes", ()))
        if any(not isinstance(i, int) or not 0 <= i < depth for i in deepstack):
            raise ConfigError(f"config.json: {s}.deepstack_visual_indexes must lie in [0, {depth}), got {list(deepstack)}")
        return cls(
            depth=depth,
            hidden_size=hidden,
            num_heads=heads,
            intermediate_size=_positive_int(s, data, "intermediate_size"),
            out_hidden_size=_positive_int(s, data, "out_hidden_size"),
            patch_size=_positive_int(s, data, "patch_size", 16),
            temporal_patch_size=_positive_int(s, data, "temporal_patch_size", 2),
            spatial_merge_size=_positive_int(s, data, "spatial_merge_size", 2),
            in_channels=_positive_int(s, data, "in_channels", 3),
            num_position_embeddings=_positive_int(s, data, "num_position_embeddings", 2304),
            deepstack_visual_indexes=deepstack,
            hidden_act=str(data.get("hidden_act", "gelu_pytorch_tanh")),
        )


@dataclass(frozen=True)
class ModelConfig:
    text: TextConfig
    vision: Optional[VisionConfig]
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tms_token_id: int = TMS_TOKEN_ID
    # Blocks our own tools add to config.json (quantization, hidream); kept verbatim.
    quantization: Optional[dict] = None
    hidream: Optional[dict] = None
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        if not isinstance(data, dict):
            raise ConfigError("config.json must hold a JSON object")
        model_type = data.get("model_type")
        if model_type not in (None, "qwen3_vl"):
            raise ConfigError(f"config.json: model_type is {model_type!r}, expected 'qwen3_vl' (a HiDream-O1 checkpoint)")
        if "text_config" not in data:
            raise ConfigError("config.json: text_config is missing (not a Qwen3-VL / HiDream-O1 config)")
        text = TextConfig.from_dict(data["text_config"])
        vision = VisionConfig.from_dict(data["vision_config"]) if data.get("vision_config") else None
        if vision is not None and vision.out_hidden_size != text.hidden_size:
            raise ConfigError(
                f"config.json: vision_config.out_hidden_size ({vision.out_hidden_size}) must equal "
                f"text_config.hidden_size ({text.hidden_size})"
            )
        ids = {
            k: _positive_int("config", data, k, d)
            for k, d in (
                ("image_token_id", 151655),
                ("video_token_id", 151656),
                ("vision_start_token_id", 151652),
                ("vision_end_token_id", 151653),
            )
        }
        if text.vocab_size <= TMS_TOKEN_ID:
            raise ConfigError(
                f"config.json: text_config.vocab_size ({text.vocab_size}) must exceed the tms token id {TMS_TOKEN_ID}"
            )
        return cls(
            text=text,
            vision=vision,
            quantization=data.get("quantization"),
            hidream=data.get("hidream"),
            raw=data,
            **ids,
        )

    @classmethod
    def from_file(cls, path: Path | str) -> "ModelConfig":
        path = Path(path)
        try:
            data = read_json_file(path, "model config")
        except FileNotFoundError:
            raise ConfigError(f"{path}: not found (a model folder needs config.json)") from None
        except (OSError, ValueError) as e:
            raise ConfigError(str(e)) from None
        return cls.from_dict(data)

    def to_dict(self) -> dict:
        """The original config.json content, with our own blocks where set."""
        out = dict(self.raw)
        for key in ("quantization", "hidream"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)
