"""HiDream-O1's memory: its weights per component from the checkpoint's headers, the working set
of a denoising step at a size, and the fit check that runs before anything loads.

The prediction is weights + working set + the runtime's own footprint. The working set was
calibrated by measurement on the CPU path (``hidream-mlx bench``, float32, real layer widths),
where attention falls back to materializing its score matrix; on Metal the fused kernel never
does, which is most of the difference between the two at large sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional

import mlx.nn as nn
from mlx.utils import tree_flatten

from hidream_mlx.memory import (RUNTIME_BYTES, ComponentSize, SettingOf, component_of, component_sizes,
                                parameter_bytes, refuse_beyond_machine, stored_sizes, uses_fused_attention)
from hidream_mlx.families.o1.config import PATCH_DIM, PATCH_SIZE, TextConfig
from hidream_mlx.families.o1.source import ModelSource
from hidream_mlx.families.o1.transformer import HiDreamO1
from hidream_mlx.quant.plans import is_decoder_linear
from hidream_mlx.quant.recipes import DEFAULT_GROUP_SIZE, LayerSetting
from hidream_mlx.weights.loading import SKIPPED_PREFIXES, is_vision, module_name

# Hidden-size vectors per generation token live at once inside one decoder layer (measured on
# CPU): ~12 in attention besides the scores (normed input, q/k/v, their rotate-half rope
# temporaries, the scaled q, the attention output and its transposed copy) and ~6 carried
# around it (the residual stream, its norm, the layer's output). The MLP's gate, up and gated
# product (3 intermediate-size vectors) peak below the attention at every size we measured.
ATTENTION_VECTORS = 12
RESIDUAL_VECTORS = 6


def flat_setting(bits: Optional[int], group_size: int = DEFAULT_GROUP_SIZE) -> SettingOf:
    """``-q BITS`` on O1: the decoder linears (``quant.quantization.is_decoder_linear``) whose input
    width the group size divides, as the flat plan quantizes them at load."""
    if not bits:
        return lambda name, shape: None
    setting = LayerSetting(bits, group_size)

    def setting_of(name: str, shape: tuple) -> Optional[LayerSetting]:
        if not name.endswith(".weight") or len(shape) != 2 or shape[1] % group_size:
            return None
        return setting if is_decoder_linear(name[: -len(".weight")]) else None

    return setting_of


def weight_sizes(shapes: Iterable[tuple[str, tuple[int, ...]]], dtype_bytes: int,
                 bits: Optional[int] = None) -> dict[str, ComponentSize]:
    """``component_sizes`` of O1 tensors, with ``-q bits`` quantizing the decoder linears."""
    return component_sizes(shapes, dtype_bytes, flat_setting(bits))


def checkpoint_sizes(source, dtype_bytes: int, bits: Optional[int] = None
                     ) -> tuple[dict[str, ComponentSize], dict[str, ComponentSize]]:
    """(loaded, skipped) component sizes of an O1 checkpoint (a ModelSource, or a folder), from
    its safetensors headers.

    Skipped are the tensors text-to-image never loads (``lm_head``, the vision tower), shown
    at their stored size. A folder quantized by our tools keeps its packed weights as stored.
    """
    source = ModelSource.resolve(source)
    config, index = source.config, source.index
    kept, skipped = {}, {}
    for ckpt_name, info in index.items():
        name = module_name(ckpt_name)
        if name.startswith(SKIPPED_PREFIXES) or is_vision(name):
            skipped.setdefault(component_of(name), ComponentSize()).add(math.prod(info.shape), info.nbytes)
        else:
            kept[ckpt_name] = info
    loaded = stored_sizes(kept, dtype_bytes, flat_setting(bits), component_of, config.quantization, module_name)
    return loaded, skipped


def skeleton_shapes(config) -> list[tuple[str, tuple[int, ...]]]:
    """Parameter shapes of an unevaluated model: MLX builds the graph but allocates nothing."""
    return [(name, tuple(a.shape)) for name, a in tree_flatten(HiDreamO1(config).parameters())]


@dataclass(frozen=True)
class WorkingSet:
    prefix_cache: int
    activations: int
    attention_scores: int
    latents: int

    @property
    def total(self) -> int:
        return self.prefix_cache + self.activations + self.attention_scores + self.latents


def working_set(cfg: TextConfig, width: int, height: int, text_tokens: int = 128, cfg_pass: bool = False,
                dtype_bytes: int = 2, fused_attention: Optional[bool] = None) -> WorkingSet:
    """Memory beyond the weights while one denoising step runs at a given size.

    Layers run one after another and MLX frees each temporary once consumed, so only the
    busiest moment of one layer counts: attention, with its scores (materialized once on CPU:
    the softmax reuses their buffer) and the temporaries of ATTENTION_VECTORS/RESIDUAL_VECTORS.
    With CFG both passes' layer temporaries count, batched or not: the two passes are
    independent branches of one step's graph, and MLX's ``eval`` interleaves them (measured:
    sequential CFG adds as much as a second pass, ~136 MiB on mid dims at 1024²).
    """
    fused = uses_fused_attention() if fused_attention is None else fused_attention
    n = (width // PATCH_SIZE) * (height // PATCH_SIZE) + 1
    prompts = 2 if cfg_pass else 1
    batch = 2 if cfg_pass else 1
    kv_width = 2 * cfg.num_key_value_heads * cfg.head_dim
    cache = prompts * cfg.num_hidden_layers * text_tokens * kv_width * dtype_bytes
    d = cfg.hidden_size
    # Rotary embedding runs in float32 whatever the weights: q and k get float32 copies.
    rope_extra = 2 * (cfg.num_attention_heads + cfg.num_key_value_heads) * cfg.head_dim * max(0, 4 - dtype_bytes)
    attention = ATTENTION_VECTORS * d * dtype_bytes + rope_extra
    mlp = 3 * cfg.intermediate_size * dtype_bytes
    per_token = max(attention, mlp) + RESIDUAL_VECTORS * d * dtype_bytes
    scores = 0 if fused else cfg.num_attention_heads * n * (n + text_tokens) * dtype_bytes
    # z, the prediction, v and the next z in float32 (plus the first pass's v with CFG).
    latents = (4 + prompts - 1) * n * PATCH_DIM * 4
    return WorkingSet(cache, batch * n * per_token, batch * scores, latents)


def predict_peak_bytes(weight_bytes: int, cfg: TextConfig, width: int, height: int, cfg_pass: bool,
                       text_tokens: int = 128, dtype_bytes: int = 2, fused_attention: Optional[bool] = None) -> int:
    ws = working_set(cfg, width, height, text_tokens, cfg_pass, dtype_bytes, fused_attention)
    return weight_bytes + ws.total + RUNTIME_BYTES


def activation_bytes(model: nn.Module) -> int:
    """Bytes per activation element: the dtype of the unquantized norms."""
    return model.language_model.norm.weight.dtype.size


def predicted_peak(model: nn.Module, width: int, height: int, cfg_pass: bool) -> int:
    return predict_peak_bytes(parameter_bytes(model), model.config.text, width, height, cfg_pass,
                              dtype_bytes=activation_bytes(model))


def check_fits_folder(source, dtype_bytes: int, bits: Optional[int], width: int, height: int,
                      cfg_pass: bool, extra_bytes: int = 0) -> None:
    """Refuse a run the machine cannot hold, from the checkpoint's headers alone (a ModelSource
    or a folder), before anything is loaded; ``extra_bytes``: what LoRAs add (see lora_memory)."""
    source = ModelSource.resolve(source)
    loaded, _ = checkpoint_sizes(source, dtype_bytes, bits)
    weights = sum(size.nbytes for size in loaded.values()) + extra_bytes
    refuse_beyond_machine(predict_peak_bytes(weights, source.config.text, width, height, cfg_pass,
                                              dtype_bytes=dtype_bytes))
