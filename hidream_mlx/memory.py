"""Memory: what the weights take, what a request will need, and what this machine can give.

All sizes are bytes; printed sizes use GiB/MiB (powers of two) and say so.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import psutil
from mlx.utils import tree_flatten

from .config import PATCH_SIZE, TextConfig

GiB = 1 << 30


def format_bytes(n: float) -> str:
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / (1 << 20):.1f} MiB"


def parameter_bytes(module: nn.Module) -> int:
    return sum(a.nbytes for _, a in tree_flatten(module.parameters()))


def component_bytes(module: nn.Module) -> dict[str, int]:
    """Bytes per top-level component (language model, pixel heads, vision tower if loaded)."""
    out: dict[str, int] = {}
    for name, a in tree_flatten(module.parameters()):
        parts = name.split(".")
        key = ".".join(parts[:2]) if parts[0] == "language_model" else parts[0]
        if parts[0] == "language_model" and parts[1] == "layers":
            key = "language_model.layers"
        out[key] = out.get(key, 0) + a.nbytes
    return out


def uses_fused_attention() -> bool:
    """Metal's attention kernel never materializes the score matrix; the CPU fallback does."""
    return mx.metal.is_available()


@dataclass(frozen=True)
class WorkingSet:
    prefix_cache: int
    activations: int
    attention_scores: int

    @property
    def total(self) -> int:
        return self.prefix_cache + self.activations + self.attention_scores


def working_set(cfg: TextConfig, width: int, height: int, text_tokens: int = 128, cfg_pass: bool = False,
                dtype_bytes: int = 2, fused_attention: bool | None = None) -> WorkingSet:
    """Memory beyond the weights for one denoising step at a given size.

    One layer's activations are live at a time (MLX frees each as the next layer consumes it);
    the largest are the MLP's three intermediate tensors and the float32 rotary copies of q/k.
    """
    fused = uses_fused_attention() if fused_attention is None else fused_attention
    n = (width // PATCH_SIZE) * (height // PATCH_SIZE) + 1
    prompts = 2 if cfg_pass else 1
    kv_width = 2 * cfg.num_key_value_heads * cfg.head_dim
    cache = prompts * cfg.num_hidden_layers * text_tokens * kv_width * dtype_bytes
    q_width = cfg.num_attention_heads * cfg.head_dim
    per_token = (
        4 * cfg.hidden_size * dtype_bytes  # residual, normed input, attention out, mlp out
        + 3 * cfg.intermediate_size * dtype_bytes  # gate, up, gated product
        + (q_width + kv_width) * (dtype_bytes + 4)  # q, k, v and their float32 rotary copies
        + 2 * 3072 * 4  # the latent and its prediction in float32
    )
    scores = 0 if fused else cfg.num_attention_heads * n * (n + text_tokens) * 4 * 2
    return WorkingSet(cache, n * per_token, scores)


def machine_memory() -> int:
    """What MLX may use here: Metal's recommended working set on a Mac, else physical RAM."""
    if mx.metal.is_available():
        info = mx.metal.device_info()
        return int(info.get("max_recommended_working_set_size", psutil.virtual_memory().total))
    return int(psutil.virtual_memory().total)


def predicted_peak(model: nn.Module, width: int, height: int, cfg_pass: bool) -> int:
    cfg = model.config.text
    dtype_bytes = model.language_model.norm.weight.dtype.size
    return parameter_bytes(model) + working_set(cfg, width, height, cfg_pass=cfg_pass, dtype_bytes=dtype_bytes).total


def check_fits(model: nn.Module, width: int, height: int, cfg_pass: bool) -> None:
    """Refuse, with a suggestion, a request the machine cannot hold."""
    need, have = predicted_peak(model, width, height, cfg_pass), machine_memory()
    if need > have:
        raise MemoryError(
            f"this run needs about {format_bytes(need)} but this machine offers {format_bytes(have)}; "
            f"try a lower-bit model (-q 6 or -q 4), a smaller size (--preset quick), or --force"
        )
