"""Random-weight HiDream-I1 transformers at scaled-down dims, for measuring speed offline.

Both dims keep the released transformer's shape: 4 routed experts of which 2 are active plus a
shared expert, widths derived as the reference derives them (``swiglu_hidden``), one double
block per two single blocks, 2x2 patches of 16 latent channels, RoPE split 2:1:1. ``tiny`` is
test scale; ``mid`` is 512 wide with 1 double and 2 single blocks (the release: 2560 wide,
16 + 32 blocks), where one step at the I1 pipeline's 1024x1024 area takes seconds on a CPU.
Weights are random normal scaled like an initialisation, so outputs are meaningless but every
matmul has its real shape, and the gate spreads tokens over all experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from hidream_mlx.families.i1.config import TransformerConfig
from hidream_mlx.families.i1.moe import SwiGLU
from hidream_mlx.families.i1.sampling import Conditioning
from hidream_mlx.families.i1.transformer import HiDreamImageTransformer, default_widths

VAE_SCALE = 8  # the FLUX VAE's downsampling, as in the released pipeline
_SHAPE = dict(patch_size=2, in_channels=16, out_channels=16, num_routed_experts=4, num_activated_experts=2,
              max_resolution=[128, 128])
I1_DIMS = {
    "tiny": dict(num_attention_heads=2, attention_head_dim=32, num_layers=1, num_single_layers=2,
                 caption_channels=[64, 64], text_emb_dim=64, text_tokens=16),
    "mid": dict(num_attention_heads=8, attention_head_dim=64, num_layers=1, num_single_layers=2,
                caption_channels=[512, 512], text_emb_dim=512, text_tokens=128),
}


def synthetic_config(dims: str) -> TransformerConfig:
    if dims not in I1_DIMS:
        raise ValueError(f"unknown HiDream-I1 dims {dims!r}; choose one of {', '.join(I1_DIMS)}")
    raw = {k: v for k, v in I1_DIMS[dims].items() if k != "text_tokens"}
    head = raw["attention_head_dim"]
    blocks = raw["num_layers"] + raw["num_single_layers"]
    return TransformerConfig(**_SHAPE, **raw, axes_dims_rope=[head // 2, head // 4, head // 4],
                             llama_layers=list(range(blocks)))


def text_tokens(dims: str) -> int:
    """Length of each synthetic text sequence (T5 and Llama alike; the release pads to 128)."""
    return I1_DIMS[dims]["text_tokens"]


def _randomize(module, dtype: mx.Dtype) -> None:
    params = []
    for name, p in tree_flatten(module.parameters()):
        if "norm" in name:
            value = mx.ones(p.shape, dtype=dtype)
        else:
            fan_in = p.shape[-1] if p.ndim > 1 else 1
            value = (mx.random.normal(p.shape) * (fan_in ** -0.5 if p.ndim > 1 else 0.02)).astype(dtype)
        mx.eval(value)
        params.append((name, value))
    module.update(tree_unflatten(params))


def random_transformer(dims: str, dtype: mx.Dtype = mx.float32, seed: int = 0) -> HiDreamImageTransformer:
    mx.random.seed(seed)
    model = HiDreamImageTransformer(synthetic_config(dims))
    _randomize(model, dtype)
    return model


@dataclass(frozen=True)
class SyntheticRequest:
    """Random transformer inputs for one square image: latents [1, C, h, w] and the text
    conditioning for ``batch`` rows (2 with CFG)."""

    latents: mx.array
    cond: Conditioning
    image_tokens: int
    text_tokens: int  # per row, the routed text tokens of a single block: T5 + 2 Llama sequences

    @property
    def batch(self) -> int:
        return self.cond.pooled.shape[0]

    @property
    def sequence(self) -> int:
        """Tokens one single-stream block routes per row."""
        return self.image_tokens + self.text_tokens


def synthetic_request(cfg: TransformerConfig, dims: str, size: int, batch: int, seed: int = 1) -> SyntheticRequest:
    if size % (VAE_SCALE * cfg.patch_size):
        raise ValueError(f"--size {size}: HiDream-I1 renders multiples of {VAE_SCALE * cfg.patch_size}")
    rng = np.random.default_rng(seed)
    t = text_tokens(dims)
    t5_width, llama_width = cfg.caption_channels

    def normal(*shape):
        return mx.array(rng.normal(size=shape).astype(np.float32))

    side = size // VAE_SCALE
    cond = Conditioning(normal(batch, t, t5_width), normal(len(cfg.llama_layers), batch, t, llama_width),
                        normal(batch, cfg.text_emb_dim))
    patches = (side // cfg.patch_size) ** 2
    return SyntheticRequest(normal(1, cfg.in_channels, side, side), cond, patches, 3 * t)


def dense_twin(model: HiDreamImageTransformer, dtype: mx.Dtype = mx.float32, seed: int = 2) -> SwiGLU:
    """A dense SwiGLU as wide as an MoE layer's active part: ``top_k`` routed experts plus the
    shared expert (what a token multiplies through), random weights."""
    routed, shared, _ = default_widths(model.cfg)
    mx.random.seed(seed)
    dense = SwiGLU(model.cfg.inner_dim, model.cfg.num_activated_experts * routed + shared)
    _randomize(dense, dtype)
    return dense
