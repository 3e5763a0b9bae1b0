"""Random-weight models of the real architecture, for measuring speed and memory offline.

``tiny`` is the test scale, ``mid`` a scaled-down architecture that runs in seconds per step
on a CPU, ``real`` the 36-layer, 4096-wide HiDream-O1 decoder. ``layers`` keeps every other
dimension and changes the depth. Weights are random normal (scaled like an initialisation),
so outputs are meaningless but every matmul has its real shape.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from hidream_mlx.families.o1.config import BOI_TOKEN_ID, ModelConfig, TMS_TOKEN_ID
from hidream_mlx.families.o1.transformer import HiDreamO1

_REAL_TEXT = dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                  head_dim=128, intermediate_size=12288, mrope_section=[24, 20, 20])
TEXT_DIMS = {
    "tiny": dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, intermediate_size=128, mrope_section=[4, 2, 2]),
    "mid": dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
                head_dim=64, intermediate_size=3072, mrope_section=[12, 10, 10]),
    "real": _REAL_TEXT,
}
# Synthetic prompts need no tokenizer: ordinary token ids drawn from this range.
_ORDINARY_IDS = (1000, 150000)


def synthetic_config(dims: str, layers: Optional[int] = None) -> ModelConfig:
    if dims not in TEXT_DIMS:
        raise ValueError(f"unknown dims {dims!r}; choose one of {', '.join(TEXT_DIMS)}")
    text = dict(TEXT_DIMS[dims])
    if layers is not None:
        if layers <= 0:
            raise ValueError(f"--layers must be positive, got {layers}")
        text["num_hidden_layers"] = layers
    section = text.pop("mrope_section")
    text.update(vocab_size=151936, rms_norm_eps=1e-6, rope_theta=5_000_000.0,
                rope_scaling={"mrope_section": section, "mrope_interleaved": True})
    return ModelConfig.from_dict({"model_type": "qwen3_vl", "text_config": text,
                                  "hidream": {"variant": f"synthetic-{dims}"}})


def random_model(dims: str, layers: Optional[int] = None, dtype: mx.Dtype = mx.float32, seed: int = 0):
    """A HiDreamO1 with random weights; the embedding table stays small-valued and lazy-free."""
    mx.random.seed(seed)
    model = HiDreamO1(synthetic_config(dims, layers))
    params = []
    for name, p in tree_flatten(model.parameters()):
        if name.endswith("norm.weight") or "layernorm" in name:
            value = mx.ones(p.shape, dtype=dtype)
        else:
            fan_in = p.shape[-1] if p.ndim > 1 else 1
            value = (mx.random.normal(p.shape) * (fan_in**-0.5 if p.ndim > 1 else 0.02)).astype(dtype)
        params.append((name, value))
        mx.eval(value)
    model.update(tree_unflatten(params))
    return model


def synthetic_prompt_ids(length: int, seed: int = 0) -> np.ndarray:
    """Token ids shaped like an encoded prompt: ordinary ids, then boi and tms."""
    rng = np.random.default_rng(seed)
    body = rng.integers(*_ORDINARY_IDS, size=max(length - 2, 1), dtype=np.int64)
    return np.concatenate([body, np.array([BOI_TOKEN_ID, TMS_TOKEN_ID], dtype=np.int64)])
