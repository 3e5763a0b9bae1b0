"""Memory: what the weights take, what a request will need, and what this machine can give.

All sizes are bytes; printed sizes use GiB/MiB (powers of two) and say so. The size rule
(``component_sizes``), the machine and the fit checks serve both families; HiDream-I1's phases
are modelled in ``models.i1.memory`` (``check_fits_i1`` uses it).

The prediction is weights + working set + the runtime's own footprint. The working set was
calibrated by measurement on the CPU path (``hidream-mlx bench``, float32, real layer widths),
where attention falls back to materializing its score matrix; on Metal the fused kernel never
does, which is most of the difference between the two at large sizes.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

import mlx.core as mx
import mlx.nn as nn
import psutil
from mlx.utils import tree_flatten

from hidream_mlx.weights.loading import LOAD_CACHE_BYTES, SKIPPED_PREFIXES, is_vision, module_name
from hidream_mlx.families.o1.config import PATCH_DIM, PATCH_SIZE, TextConfig
from hidream_mlx.families.o1.transformer import HiDreamO1
from hidream_mlx.weights.source import ModelSource
from hidream_mlx.quant.plans import is_decoder_linear
from hidream_mlx.quant.recipes import DEFAULT_GROUP_SIZE, LayerSetting

GiB = 1 << 30
MiB = 1 << 20
# Python, MLX and numpy themselves, measured as RSS before any array exists (~40 MiB on Linux),
# plus MLX's buffer-cache slack that RSS shows beyond its own active-memory peak.
RUNTIME_BYTES = 64 * MiB
# Hidden-size vectors per generation token live at once inside one decoder layer (measured on
# CPU): ~12 in attention besides the scores (normed input, q/k/v, their rotate-half rope
# temporaries, the scaled q, the attention output and its transposed copy) and ~6 carried
# around it (the residual stream, its norm, the layer's output). The MLP's gate, up and gated
# product (3 intermediate-size vectors) peak below the attention at every size we measured.
ATTENTION_VECTORS = 12
RESIDUAL_VECTORS = 6


def format_bytes(n: float) -> str:
    if abs(n) >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / MiB:.1f} MiB"


def parameter_bytes(module: nn.Module) -> int:
    return sum(a.nbytes for _, a in tree_flatten(module.parameters()))


def parameter_count(module: nn.Module) -> int:
    return sum(a.size for _, a in tree_flatten(module.parameters()))


def component_of(name: str) -> str:
    """Reporting group of a parameter (module path, ``model.`` already stripped)."""
    parts = name.split(".")
    if parts[0] == "language_model" and len(parts) > 1:
        return "language_model." + parts[1]
    return parts[0]


# ---------------------------------------------------------------------------------------------
# Weights from shapes alone (safetensors headers or a lazy skeleton): nothing is loaded.


@dataclass
class ComponentSize:
    parameters: int = 0
    nbytes: int = 0

    def add(self, parameters: int, nbytes: int) -> None:
        self.parameters += parameters
        self.nbytes += nbytes

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.parameters if self.parameters else 0.0


def quantized_bytes(count: int, bits: int, scale_bytes: int = 2, group_size: int = DEFAULT_GROUP_SIZE) -> int:
    """``count`` weights at ``bits`` each, plus one scale and one bias per group."""
    return count * bits // 8 + (count // group_size) * 2 * scale_bytes


# (tensor name, shape) -> the quantization of that tensor, or None when it stays float.
SettingOf = Callable[[str, tuple], Optional[LayerSetting]]


def component_sizes(shapes: Iterable[tuple[str, tuple[int, ...]]], dtype_bytes: int,
                    setting_of: SettingOf = lambda name, shape: None,
                    group_of: Callable[[str], str] = None) -> dict[str, ComponentSize]:
    """Parameters and bytes per reporting group of float tensors loaded at ``dtype_bytes``.

    The one size rule of both families: a tensor ``setting_of`` quantizes takes
    ``quantized_bytes`` (scales and biases in the load dtype), every other one its elements
    times ``dtype_bytes``. ``group_of`` names the group (default: ``component_of``).
    """
    group_of = group_of or component_of
    out: dict[str, ComponentSize] = {}
    for name, shape in shapes:
        count = math.prod(shape)
        setting = setting_of(name, tuple(shape))
        size = (quantized_bytes(count, setting.bits, dtype_bytes, setting.group_size) if setting is not None
                else count * dtype_bytes)
        out.setdefault(group_of(name), ComponentSize()).add(count, size)
    return out


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


def plan_weight_sizes(shapes: Iterable[tuple[str, tuple[int, ...]]], layers: dict, dtype_bytes: int = 2
                      ) -> dict[str, ComponentSize]:
    """``component_sizes`` under a quantization plan (module path -> setting with ``bits`` and
    ``group_size``, or None): any width, per-layer overrides and a quantized embed_tokens."""
    def setting_of(name, shape):
        return layers.get(name[: -len(".weight")]) if name.endswith(".weight") else None

    return component_sizes(shapes, dtype_bytes, setting_of)


def weight_sizes(shapes: Iterable[tuple[str, tuple[int, ...]]], dtype_bytes: int,
                 bits: Optional[int] = None) -> dict[str, ComponentSize]:
    """``component_sizes`` of O1 tensors, with ``-q bits`` quantizing the decoder linears."""
    return component_sizes(shapes, dtype_bytes, flat_setting(bits))


def stored_sizes(index: dict, dtype_bytes: int, setting_of: SettingOf, group_of: Callable[[str], str],
                 quantization: Optional[dict] = None, rename: Callable[[str], str] = lambda n: n
                 ) -> dict[str, ComponentSize]:
    """Component sizes of a header index (checkpoint name -> TensorInfo) as it loads.

    Float tensors follow ``component_sizes``. A folder quantized beforehand (``quantization``:
    its config's block) keeps its packed weights as stored, counted as the elements they
    pack; its scales and biases load in the load dtype.
    """
    group = int((quantization or {}).get("group_size", DEFAULT_GROUP_SIZE))
    out: dict[str, ComponentSize] = {}
    floats = []
    for ckpt_name, info in index.items():
        name = rename(ckpt_name)
        count = math.prod(info.shape)
        if quantization and info.dtype in ("U32", "I32", "U8"):
            scales = index.get(ckpt_name[: -len("weight")] + "scales")
            params = math.prod(scales.shape) * group if scales is not None else count
            out.setdefault(group_of(name), ComponentSize()).add(params, info.nbytes)
        elif quantization and name.endswith((".scales", ".biases")):
            out.setdefault(group_of(name), ComponentSize()).add(0, count * dtype_bytes)
        else:
            floats.append((name, info.shape))
    for key, size in component_sizes(floats, dtype_bytes, setting_of, group_of).items():
        out.setdefault(key, ComponentSize()).add(size.parameters, size.nbytes)
    return out


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


# ---------------------------------------------------------------------------------------------
# The working set of a denoising step.


def uses_fused_attention() -> bool:
    """Metal's attention kernel never materializes the score matrix; the CPU fallback does."""
    return mx.metal.is_available()


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
    # The prefix pass (once per prompt, before sampling) runs the text tokens causally: with a long
    # prompt and a small image its temporaries and T x T scores are the larger moment.
    prefix_scores = 0 if fused else cfg.num_attention_heads * text_tokens * text_tokens * dtype_bytes
    # z, the prediction, v and the next z in float32 (plus the first pass's v with CFG).
    latents = (4 + prompts - 1) * n * PATCH_DIM * 4
    return WorkingSet(cache, max(batch * n, text_tokens) * per_token, max(batch * scores, prefix_scores), latents)


def predict_peak_bytes(weight_bytes: int, cfg: TextConfig, width: int, height: int, cfg_pass: bool,
                       text_tokens: int = 128, dtype_bytes: int = 2, fused_attention: Optional[bool] = None) -> int:
    ws = working_set(cfg, width, height, text_tokens, cfg_pass, dtype_bytes, fused_attention)
    return weight_bytes + ws.total + RUNTIME_BYTES


def predict_load_peak_bytes(weight_bytes: int) -> int:
    """Peak RSS of loading: the loader streams tensor by tensor (``models.loading.stream_into``), so
    beyond the weights only the runtime and MLX's capped buffer cache (``LOAD_CACHE_BYTES``)."""
    return weight_bytes + RUNTIME_BYTES + LOAD_CACHE_BYTES


def activation_bytes(model: nn.Module) -> int:
    """Bytes per activation element: the dtype of the unquantized norms."""
    return model.language_model.norm.weight.dtype.size


def predicted_peak(model: nn.Module, width: int, height: int, cfg_pass: bool) -> int:
    return predict_peak_bytes(parameter_bytes(model), model.config.text, width, height, cfg_pass,
                              dtype_bytes=activation_bytes(model))


# ---------------------------------------------------------------------------------------------
# This machine.


def metal_device_info() -> Optional[dict]:
    """Metal's device description, or None where Metal is not available (Linux, CPU-only)."""
    if not mx.metal.is_available():
        return None
    info = getattr(mx, "device_info", None) or mx.metal.device_info
    return dict(info())


def machine_memory() -> int:
    """What MLX may use here: Metal's recommended working set on a Mac, else physical RAM."""
    info = metal_device_info()
    if info is not None and "max_recommended_working_set_size" in info:
        return int(info["max_recommended_working_set_size"])
    return int(psutil.virtual_memory().total)


def check_fits_folder(source, dtype_bytes: int, bits: Optional[int], width: int, height: int,
                      cfg_pass: bool, extra_bytes: int = 0, text_tokens: int = 0) -> None:
    """Refuse a run the machine cannot hold, from the checkpoint's headers alone (a ModelSource
    or a folder), before anything is loaded; ``extra_bytes``: what LoRAs add (see lora_memory);
    ``text_tokens``: the longest text prefix (``Request.text_tokens``; 0: a typical 128)."""
    source = ModelSource.resolve(source)
    loaded, _ = checkpoint_sizes(source, dtype_bytes, bits)
    weights = sum(size.nbytes for size in loaded.values()) + extra_bytes
    _refuse_beyond_machine(predict_peak_bytes(weights, source.config.text, width, height, cfg_pass,
                                              text_tokens=text_tokens or 128, dtype_bytes=dtype_bytes))


def check_fits_i1(source, dtype_bytes: int, bits: Optional[int], encoder_bits: Optional[int], width: int,
                  height: int, cfg_pass: bool, images: int = 1, extra_bytes: int = 0) -> None:
    """Refuse a HiDream-I1 run the machine cannot hold, before any weight loads.

    ``source``: an ``I1Source`` (or a pipeline folder); ``bits``: the transformer's ``-q``;
    ``encoder_bits``: T5 and Llama's ``--encoder-bits``; ``width`` x ``height``: the size that
    renders (after the I1 size rule); ``cfg_pass``: guidance > 1 (batch 2); ``images``: how
    many the run makes (more than one: the engine decodes all but the last with the transformer
    resident); ``extra_bytes``: LoRAs. The need is the largest phase's predicted peak
    (``models.i1.memory.phase_peaks``, from headers alone); the MemoryError names that phase
    and the flags that shrink it.
    """
    from hidream_mlx.families.i1.memory import I1Memory, phase_peaks  # lazy: models.i1.memory builds on this module

    peaks = phase_peaks(I1Memory.from_source(source), bits, encoder_bits, width, height, cfg_pass, dtype_bytes,
                        images=images, extra_bytes=extra_bytes)
    advice = {"encode": "--encoder-bits 8 or 4 (quantizes T5 and Llama)",
              "sample": "a lower-bit transformer (-q 8 or -q 4) or a smaller size",
              "decode": "a smaller size"}[peaks.largest]
    _refuse_beyond_machine(peaks.whole, f"try {advice}, or --force", f" (its {peaks.largest} phase)")


def _refuse_beyond_machine(need: int, advice: str = "try a lower-bit model (-q 6 or -q 4), a smaller size "
                                                   "(--preset quick), or --force", what: str = "") -> None:
    have = machine_memory()
    if need > have:
        raise MemoryError(f"this run needs about {format_bytes(need)}{what} but this machine offers "
                          f"{format_bytes(have)}; {advice}")


@contextlib.contextmanager
def wired_limit(model: nn.Module) -> Iterator[None]:
    """Keep the model's memory wired on Metal for the duration (as mlx-lm's generate does).

    Raises the wired limit to the device's recommended working set, warns when the weights
    alone exceed it (the system will page and generation crawls), and restores the old limit
    after synchronizing. Does nothing without Metal.
    """
    info = metal_device_info()
    if info is None:
        yield
        return
    recommended = int(info["max_recommended_working_set_size"])
    weights = parameter_bytes(model)
    if weights > 0.9 * recommended:
        warnings.warn(
            f"the model takes {format_bytes(weights)}, close to or above the {format_bytes(recommended)} "
            "Metal recommends for this machine; generation may be very slow. Try -q 6 or -q 4.",
            stacklevel=3,
        )
    previous = mx.set_wired_limit(recommended)
    try:
        yield
    finally:
        mx.synchronize()
        mx.set_wired_limit(previous)
