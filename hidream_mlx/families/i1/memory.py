"""HiDream-I1 memory: what each component weighs and what each phase of a run needs.

A run has three phases (``engine``), each alone in memory:

* encode: CLIP-L, CLIP-G, T5-XXL and Llama-3.1-8B load one at a time and are freed after use,
  so the phase peak is the largest encoder with its activations (and a load-time quantization's
  transient float layer);
* sample: the transformer, loaded tensor by tensor (its load peak counts too), then one
  denoising step's activations at the size, CFG (guidance > 1, Full) doubling the batch;
* decode: the VAE and the decoder's activations at the size.

The whole run's peak is the largest phase. Sizes come from safetensors headers and configs
alone; nothing is loaded. Precision: ``transformer_bits`` quantizes the transformer's layers
(``quant.plans.I1_LAYERS``, the flat plan of ``-q``), ``encoder_bits`` every T5 and Llama linear
(``encoder_common.quantize_linears``, ``--encoder-bits``); CLIP and the VAE stay in the load
dtype. Layers whose input width the group size does not divide stay in floats and are listed.

The activation terms count the temporaries alive at each block's busiest moment, read from the
code (``blocks``, ``moe``, ``vae``, the encoders), as ``memory.working_set`` does for O1; they
are computed, not calibrated, and small next to the weights except in the VAE at large sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlx.nn as nn

from hidream_mlx.memory import (RUNTIME_BYTES, ComponentSize, predict_load_peak_bytes, refuse_beyond_machine,
                                stored_sizes, uses_fused_attention)
from hidream_mlx.families.i1.clip import CLIPTextConfig, clip_tensors
from hidream_mlx.families.i1.config import TransformerConfig, VAEConfig
from hidream_mlx.families.i1.encoder_common import read_json_config
from hidream_mlx.families.i1.llama import LlamaConfig, LlamaModel, llama_tensors
from hidream_mlx.families.i1.source import I1Source
from hidream_mlx.families.i1.t5 import T5Config, T5EncoderModel, t5_tensors
from hidream_mlx.families.i1.text_encoding import COMPONENTS, DEFAULT_MAX_SEQUENCE_LENGTH
from hidream_mlx.families.i1.weights import component_index, expert_widths
from hidream_mlx.weights.loading import TensorInfo
from hidream_mlx.quant.plans import I1_LAYERS, flat_plan, index_matrices
from hidream_mlx.quant.recipes import DEFAULT_GROUP_SIZE, LayerSetting

ENCODERS = tuple(COMPONENTS)  # clip_l, clip_g, t5, llama: the order they run in
QUANTIZABLE_ENCODERS = ("t5", "llama")
LEVELS: tuple[tuple[str, Optional[int]], ...] = (("bf16", None), ("Q8", 8), ("Q4", 4))
F32 = 4

# Transformer block, per token of the joint sequence: hidden-width vectors in the load dtype at
# the attention's busiest moment (modulated input, q/k/v before and after their RMSNorm, the
# text stream's concatenated copies, the attention output and its reshaped copy, the residual),
# float32 ones for RoPE (q and k upcast, their rotated pairs), and the MoE's: input, weighted sum
# and shared-expert output at hidden width, and per routed slot (``num_activated_experts`` per
# token, computed together) the gathered input row, the expert's output row and the row picked
# back, plus w1 and w3 outputs, silu and their product at expert width.
ATTENTION_VECTORS = 14
ROPE_F32_VECTORS = 6
MOE_HIDDEN_VECTORS = 3
MOE_SLOT_HIDDEN_VECTORS = 3
MOE_SLOT_EXPERT_VECTORS = 4
# Encoder layer, per token: hidden-width vectors (input, norm, q/k/v, attention output,
# residual) and feed-forward-width vectors (gate/up outputs and their product).
ENCODER_HIDDEN_VECTORS = 8
ENCODER_FF_VECTORS = 3
# Winograd F(6x6, 3x3) tiles: 8x8 transformed values per 6x6 outputs, for input and output.
WINOGRAD_EXPANSION = 64 / 36


@dataclass(frozen=True)
class Weights:
    """One component's tensors as its loader loads them (module path -> TensorInfo)."""

    name: str
    tensors: dict[str, TensorInfo]
    stored_quantization: Optional[dict] = None  # a folder quantized beforehand keeps its packing
    linears: Optional[frozenset] = None  # paths a load-time quantization takes (None: the I1 scheme)

    def matrices(self) -> dict[str, int]:
        return index_matrices(self.tensors)

    def plan(self, bits: Optional[int], group_size: int = DEFAULT_GROUP_SIZE
             ) -> tuple[dict[str, Optional[LayerSetting]], list[str]]:
        """(module path -> setting, the layers kept in floats because ``group_size`` does not
        divide their input width) for quantizing at load with ``bits`` (None: nothing)."""
        if not bits or self.stored_quantization:
            return {}, []
        matrices = self.matrices()
        if self.linears is None:
            plan = flat_plan(matrices, bits, group_size, I1_LAYERS)
            return plan.layers, list(plan.indivisible)
        setting = LayerSetting(bits, group_size)
        layers = {p: (None if w % group_size else setting) for p, w in matrices.items() if p in self.linears}
        return layers, sorted(p for p, s in layers.items() if s is None)

    def size(self, bits: Optional[int], dtype_bytes: int, group_size: int = DEFAULT_GROUP_SIZE) -> ComponentSize:
        layers, _ = self.plan(bits, group_size)

        def setting_of(name, shape):
            return layers.get(name[: -len(".weight")]) if name.endswith(".weight") else None

        sizes = stored_sizes(self.tensors, dtype_bytes, setting_of, lambda name: self.name, self.stored_quantization)
        return sizes.get(self.name, ComponentSize())

    def load_transient(self, bits: Optional[int], dtype_bytes: int, group_size: int = DEFAULT_GROUP_SIZE) -> int:
        """Bytes beyond the loaded weights while loading: quantizing at load holds one float
        layer (read, cast, quantized) at a time; a cast from a wider stored dtype holds the
        stored tensor while its copy is made."""
        layers, _ = self.plan(bits, group_size)
        largest = 0
        for name, info in self.tensors.items():
            if info.dtype not in _FLOAT_BYTES:
                continue  # packed or integer tensors load as stored
            wider = _FLOAT_BYTES[info.dtype] != dtype_bytes
            copy = math.prod(info.shape) * dtype_bytes if wider else 0
            if name.endswith(".weight") and layers.get(name[: -len(".weight")]) is not None:
                largest = max(largest, info.nbytes + copy)
            elif _FLOAT_BYTES[info.dtype] > dtype_bytes:
                largest = max(largest, info.nbytes)
        return largest


_FLOAT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


def linear_paths(module: nn.Module) -> frozenset:
    """Module paths of every ``nn.Linear`` of an unevaluated skeleton (nothing is allocated)."""
    return frozenset(path for path, m in module.named_modules() if isinstance(m, nn.Linear))


@dataclass(frozen=True)
class I1Memory:
    """Every component of one I1 pipeline, sized from its headers."""

    transformer_cfg: TransformerConfig
    vae_cfg: VAEConfig
    encoder_cfgs: dict
    weights: dict[str, Weights]  # clip_l, clip_g, t5, llama, transformer, vae

    @classmethod
    def from_source(cls, source) -> "I1Memory":
        """From an ``I1Source`` (or a pipeline folder: its own Llama)."""
        source = I1Source.resolve(source, allow_download=False)
        return cls.from_parts(Path(source.path), source.llama.folder, source.transformer, source.vae,
                              dict(source.index), source.quantization)

    @classmethod
    def from_parts(cls, path: Path, llama_folder: Optional[Path], transformer_cfg: TransformerConfig,
                   vae_cfg: VAEConfig, transformer_index: dict, quantization: Optional[dict]) -> "I1Memory":
        """The encoders and VAE of the pipeline folder ``path`` (Llama from ``llama_folder``, else
        its own) with a transformer given by its config, tensors and stored quantization."""
        llama_dir = llama_folder or path / COMPONENTS["llama"][0]
        folders = {name: path / COMPONENTS[name][0] for name in ENCODERS}
        folders["llama"] = llama_dir
        cfgs = {
            "clip_l": CLIPTextConfig.from_dict(read_json_config(folders["clip_l"], "CLIP"), str(folders["clip_l"])),
            "clip_g": CLIPTextConfig.from_dict(read_json_config(folders["clip_g"], "CLIP"), str(folders["clip_g"])),
            "t5": T5Config.from_dict(read_json_config(folders["t5"], "T5"), str(folders["t5"])),
            "llama": LlamaConfig.from_dict(read_json_config(llama_dir, "Llama"), str(llama_dir)),
        }
        weights = {
            "clip_l": Weights("clip_l", clip_tensors(folders["clip_l"])),
            "clip_g": Weights("clip_g", clip_tensors(folders["clip_g"])),
            "t5": Weights("t5", t5_tensors(folders["t5"]), linears=linear_paths(T5EncoderModel(cfgs["t5"]))),
            "llama": Weights("llama", llama_tensors(llama_dir), cfgs["llama"].quantization,
                             linear_paths(LlamaModel(cfgs["llama"]))),
            "transformer": Weights("transformer", transformer_index, quantization),
            "vae": Weights("vae", component_index(path / "vae")),
        }
        return cls(transformer_cfg, vae_cfg, cfgs, weights)

    def component_bytes(self, name: str, bits: Optional[int], dtype_bytes: int) -> int:
        bits = bits if name in QUANTIZABLE_ENCODERS + ("transformer",) else None
        return self.weights[name].size(bits, dtype_bytes).nbytes

    def kept_in_floats(self, transformer_bits: Optional[int], encoder_bits: Optional[int]) -> dict[str, list[str]]:
        """Layers each quantized component keeps in floats because of the group size."""
        out = {}
        for name, bits in (("transformer", transformer_bits), ("t5", encoder_bits), ("llama", encoder_bits)):
            kept = self.weights[name].plan(bits)[1]
            if kept:
                out[name] = kept
        return out


# ---------------------------------------------------------------------------------------------
# Activations.


def encoder_activations(name: str, cfg, batch: int, tokens: int, dtype_bytes: int) -> int:
    """One encoder's busiest layer for ``batch`` texts of ``tokens``, plus what it returns."""
    if name in ("clip_l", "clip_g"):
        hidden, ff, heads, out = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.hidden_size
    elif name == "t5":
        hidden, ff, heads, out = cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.d_model
    else:
        hidden, ff, heads = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
        # every layer's hidden state is kept, then stacked into a second copy
        out = 2 * cfg.num_hidden_layers * hidden
    layer = (ENCODER_HIDDEN_VECTORS * hidden + ENCODER_FF_VECTORS * ff) * dtype_bytes
    scores = heads * tokens * F32  # per query token: one row of float32 scores per head
    return batch * tokens * (layer + scores + out * dtype_bytes)


def sequence_tokens(cfg: TransformerConfig, width: int, height: int, vae_scale: int, text_tokens: int,
                    max_seq: Optional[int] = None) -> int:
    """Tokens of the joint attention: image patches (non-square: padded to ``max_seq``, the
    config's unless given) and T5 + the persistent Llama + one per-block Llama sequence."""
    ph, pw = height // vae_scale // cfg.patch_size, width // vae_scale // cfg.patch_size
    image = ph * pw if ph == pw else max(cfg.max_seq if max_seq is None else max_seq, ph * pw)
    return image + 3 * text_tokens


def sampling_activations(cfg: TransformerConfig, expert_width: int, width: int, height: int, vae_scale: int,
                         batch: int, dtype_bytes: int, fused: bool, text_tokens: int,
                         max_seq: Optional[int] = None) -> int:
    """One denoising step beyond the weights: the busier of one block's attention and MoE."""
    s = sequence_tokens(cfg, width, height, vae_scale, text_tokens, max_seq)
    d = cfg.inner_dim
    attention = s * d * (ATTENTION_VECTORS * dtype_bytes + ROPE_F32_VECTORS * F32)
    scores = 0 if fused else cfg.num_attention_heads * s * s * dtype_bytes
    k = cfg.num_activated_experts
    moe = s * ((MOE_HIDDEN_VECTORS + k * MOE_SLOT_HIDDEN_VECTORS) * d + k * MOE_SLOT_EXPERT_VECTORS * expert_width) \
        * dtype_bytes
    latents = 4 * cfg.in_channels * (height // vae_scale) * (width // vae_scale) * F32
    return batch * (max(attention + scores, moe) + latents)


def embedding_bytes(cfg: TransformerConfig, llama_layers: int, batch: int, tokens: int, dtype_bytes: int) -> int:
    """The prompt embeddings the transformer reads: pooled CLIP, T5 sequence, Llama stack."""
    t5_width, llama_width = cfg.caption_channels
    return batch * (cfg.text_emb_dim + tokens * t5_width + llama_layers * tokens * llama_width) * dtype_bytes


def conv_scratch(c_in: int, c_out: int, pixels: int, kernel: int, dtype_bytes: int, fused: bool) -> int:
    """Buffers a convolution allocates beyond its input and output. CPU (measured): a float32
    im2col of kernel^2 * c_in values per pixel, a padded float32 input and, for narrower dtypes,
    a float32 copy of the input. Metal: Winograd tiles for large 3x3 convolutions."""
    if not fused:
        copies = kernel * kernel + 1 + (1 if dtype_bytes != F32 else 0)
        return copies * c_in * pixels * F32
    if kernel == 3 and c_in % 32 == 0 and c_out % 32 == 0 and c_in + c_out >= 256:
        return int(WINOGRAD_EXPANSION * (c_in + c_out) * pixels * dtype_bytes)
    return 0


def _conv(c_in: int, c_out: int, pixels: int, dt: int, fused: bool, held: int = 0, kernel: int = 3) -> int:
    """A convolution's input, output and scratch, plus what its block still ``held``."""
    return held + (c_in + c_out) * pixels * dt + conv_scratch(c_in, c_out, pixels, kernel, dt, fused)


def _resnet(c_in: int, c_out: int, pixels: int, dt: int, fused: bool) -> int:
    """A VAE resnet block's busiest convolution, its input kept for the residual sum."""
    x = c_in * pixels * dt
    shortcut = _conv(c_in, c_out, pixels, dt, fused, held=x + c_out * pixels * dt, kernel=1) if c_in != c_out else 0
    return max(_conv(c_in, c_out, pixels, dt, fused, held=x), _conv(c_out, c_out, pixels, dt, fused, held=x), shortcut)


def _mid(c: int, pixels: int, dt: int, fused: bool, attention: bool) -> int:
    peak = _resnet(c, c, pixels, dt, fused)
    if attention:
        peak = max(peak, 6 * c * pixels * dt + (0 if fused else pixels * pixels * dt))
    return peak


def decode_activations(vcfg: VAEConfig, width: int, height: int, dtype_bytes: int, fused: bool) -> int:
    """The decoder's busiest moment at the size: a convolution with its input, output, scratch
    and whatever its block still holds (the residual input, or the upsampled copy)."""
    scale = 2 ** (len(vcfg.block_out_channels) - 1)
    pixels = (height // scale) * (width // scale)
    rev = list(reversed(vcfg.block_out_channels))
    dt = dtype_bytes
    peak = max(_conv(vcfg.latent_channels, rev[0], pixels, dt, fused),
               _mid(rev[0], pixels, dt, fused, vcfg.mid_block_add_attention))
    c = rev[0]
    for i, c_out in enumerate(rev):
        for j in range(vcfg.layers_per_block + 1):
            peak = max(peak, _resnet(c if j == 0 else c_out, c_out, pixels, dt, fused))
        c = c_out
        if i < len(rev) - 1:
            peak = max(peak, _conv(c, c, 4 * pixels, dt, fused, held=c * pixels * dt))
            pixels *= 4
    image = vcfg.out_channels * pixels * (dt + 3 * F32)  # decoded, then scaled, clipped, rounded
    return max(peak, _conv(rev[-1], vcfg.out_channels, pixels, dt, fused) + image)


def encode_activations(vcfg: VAEConfig, width: int, height: int, dtype_bytes: int, fused: bool) -> int:
    """The encoder's busiest moment for a ``width x height`` image (the decoder's path run the
    other way: full-resolution convolutions first, then a stride-2 one per block), plus the
    float32 image it starts from."""
    pixels, dt = width * height, dtype_bytes
    chans = list(vcfg.block_out_channels)
    peak = _conv(vcfg.in_channels, chans[0], pixels, dt, fused) + vcfg.in_channels * pixels * F32
    c = chans[0]
    for i, c_out in enumerate(chans):
        for j in range(vcfg.layers_per_block):
            peak = max(peak, _resnet(c if j == 0 else c_out, c_out, pixels, dt, fused))
        c = c_out
        if i < len(chans) - 1:
            peak = max(peak, _conv(c, c, pixels // 4, dt, fused, held=c * pixels * dt))
            pixels //= 4
    peak = max(peak, _mid(c, pixels, dt, fused, vcfg.mid_block_add_attention))
    return max(peak, _conv(c, 2 * vcfg.latent_channels, pixels, dt, fused))


# ---------------------------------------------------------------------------------------------
# Phases.


@dataclass(frozen=True)
class PhasePeaks:
    """Predicted peak bytes of each phase (runtime included) and of the whole run."""

    encode: int
    encode_by: str  # the encoder at the encode peak
    load: int  # the transformer's load, part of the sample phase
    sample: int  # max(load, sampling)
    decode: int

    @property
    def whole(self) -> int:
        return max(self.encode, self.sample, self.decode)

    @property
    def largest(self) -> str:
        return max((("encode", self.encode), ("sample", self.sample), ("decode", self.decode)), key=lambda p: p[1])[0]


def encode_phase(memory: I1Memory, encoder_bits: Optional[int], texts: int, text_tokens: int,
                 dtype_bytes: int) -> tuple[int, str]:
    """(the encode phase's peak, the encoder that makes it): one encoder resident at a time, with its
    load's transient and its activations over ``texts`` prompts."""
    encode, encode_by = 0, ENCODERS[0]
    for name in ENCODERS:
        bits = encoder_bits if name in QUANTIZABLE_ENCODERS else None
        weights = memory.weights[name]
        need = (weights.size(bits, dtype_bytes).nbytes + weights.load_transient(bits, dtype_bytes)
                + encoder_activations(name, memory.encoder_cfgs[name], texts, text_tokens, dtype_bytes))
        if need > encode:
            encode, encode_by = need, name
    return encode, encode_by


def phase_peaks(memory: I1Memory, transformer_bits: Optional[int], encoder_bits: Optional[int], width: int,
                height: int, cfg_pass: bool, dtype_bytes: int = 2, fused: Optional[bool] = None,
                images: int = 1, text_tokens: int = DEFAULT_MAX_SEQUENCE_LENGTH, extra_bytes: int = 0) -> PhasePeaks:
    """Each phase's predicted peak for one request (``images`` > 1: the engine keeps the
    transformer while decoding all but the last image, so decode counts it too). ``extra_bytes``
    (LoRAs) add to the transformer."""
    fused = uses_fused_attention() if fused is None else fused
    batch = 2 if cfg_pass else 1
    vae_scale = 2 ** (len(memory.vae_cfg.block_out_channels) - 1)
    encode, encode_by = encode_phase(memory, encoder_bits, batch, text_tokens, dtype_bytes)
    tcfg = memory.transformer_cfg
    embeddings = embedding_bytes(tcfg, memory.encoder_cfgs["llama"].num_hidden_layers, batch, text_tokens,
                                 dtype_bytes)
    transformer = memory.component_bytes("transformer", transformer_bits, dtype_bytes) + extra_bytes
    load = predict_load_peak_bytes(transformer) + embeddings
    expert = max(expert_widths(memory.weights["transformer"].tensors, "transformer"))
    sampling = transformer + embeddings + sampling_activations(tcfg, expert, width, height, vae_scale, batch,
                                                               dtype_bytes, fused, text_tokens)
    vae = memory.component_bytes("vae", None, dtype_bytes)
    decode = vae + decode_activations(memory.vae_cfg, width, height, dtype_bytes, fused)
    if images > 1:
        decode += transformer
    return PhasePeaks(encode + embeddings + RUNTIME_BYTES, encode_by, load, max(load, sampling + RUNTIME_BYTES),
                      decode + RUNTIME_BYTES)


def check_fits_i1(source, dtype_bytes: int, bits: Optional[int], encoder_bits: Optional[int], width: int,
                  height: int, cfg_pass: bool, images: int = 1, extra_bytes: int = 0) -> None:
    """Refuse a HiDream-I1 run the machine cannot hold, before any weight loads.

    ``source``: an ``I1Source`` (or a pipeline folder); ``bits``: the transformer's ``-q``;
    ``encoder_bits``: T5 and Llama's ``--encoder-bits``; ``width`` x ``height``: the size that
    renders (after the I1 size rule); ``cfg_pass``: guidance > 1 (batch 2); ``images``: how
    many the run makes (more than one: the engine decodes all but the last with the transformer
    resident); ``extra_bytes``: LoRAs. The need is the largest phase's predicted peak
    (``phase_peaks``, from headers alone); the MemoryError names that phase
    and the flags that shrink it.
    """
    peaks = phase_peaks(I1Memory.from_source(source), bits, encoder_bits, width, height, cfg_pass, dtype_bytes,
                        images=images, extra_bytes=extra_bytes)
    advice = {"encode": "--encoder-bits 8 or 4 (quantizes T5 and Llama)",
              "sample": "a lower-bit transformer (-q 8 or -q 4) or a smaller size",
              "decode": "a smaller size"}[peaks.largest]
    refuse_beyond_machine(peaks.whole, f"try {advice}, or --force", f" (its {peaks.largest} phase)")
