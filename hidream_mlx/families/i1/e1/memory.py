"""HiDream-E1 memory: what each phase of an edit needs, predicted from headers and configs alone.

The phases of ``E1Engine`` (each alone in memory, as I1's):

* encode: the four encoders one at a time over the request's distinct texts in one batch
  (E1.1: instruction and negative; E1-Full: its target description too);
* source: the VAE (it stays resident from here on) encoding the resized source;
* sample: the edit transformer (E1.1's own, or I1-Full's with E1-Full's partial tensors and
  its LoRA side paths) and one step's activations over the editing batch: 3 rows with CFG, each
  the noisy latent beside the source latent (twice the width), padded to the request's
  ``max_seq`` (E1.1 at 1024x1024: 3 x 8192 image tokens plus the text);
* decode: the VAE at the edited size.

The whole run's peak is the largest phase; :func:`check_fits_e1` refuses a run beyond the
machine before any weight loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from hidream_mlx.families.i1.e1.recipes import E1Recipe
from hidream_mlx.families.i1.e1.sizes import edit_max_seq
from hidream_mlx.families.i1.memory import (I1Memory, decode_activations, embedding_bytes, encode_activations,
                                            encode_phase, sampling_activations)
from hidream_mlx.families.i1.text_encoding import DEFAULT_MAX_SEQUENCE_LENGTH
from hidream_mlx.families.i1.weights import expert_widths
from hidream_mlx.memory import RUNTIME_BYTES, format_bytes, machine_memory, predict_load_peak_bytes, \
    uses_fused_attention


@dataclass(frozen=True)
class EditPhasePeaks:
    """Predicted peak bytes of each phase of one edit (runtime included)."""

    encode: int
    encode_by: str  # the encoder at the encode peak
    source: int  # the VAE encoding the source
    load: int  # the transformer's load, part of the sample phase
    sample: int  # max(load, sampling)
    decode: int
    image_tokens: int  # per row of the editing batch (padded to max_seq)
    batch: int  # rows of the editing batch

    @property
    def whole(self) -> int:
        return max(self.encode, self.source, self.sample, self.decode)

    @property
    def largest(self) -> str:
        phases = (("encode", self.encode), ("source", self.source), ("sample", self.sample), ("decode", self.decode))
        return max(phases, key=lambda p: p[1])[0]


def edit_memory(source) -> I1Memory:
    """The components an edit loads (``source``: an ``E1Source``): the base's encoders and VAE,
    the edit transformer's tensors."""
    return I1Memory.from_parts(source.path, source.llama.folder, source.transformer, source.vae, dict(source.index),
                               source.quantization)


def adapter_bytes(source, dtype_bytes: int) -> int:
    """E1-Full's LoRA side paths in the load dtype (its partial tensors are in the index)."""
    if source.e1_full is None:
        return 0
    return sum((layer.A.size + layer.B.size) * dtype_bytes for layer in source.e1_full.lora.values())


def edit_phase_peaks(source, recipe: E1Recipe, width: int, height: int, edited: tuple[int, int],
                     transformer_bits: Optional[int] = None, encoder_bits: Optional[int] = None,
                     dtype_bytes: int = 2, fused: Optional[bool] = None, texts: int = 2, images: int = 1,
                     extra_bytes: int = 0, memory: Optional[I1Memory] = None,
                     text_tokens: int = DEFAULT_MAX_SEQUENCE_LENGTH) -> EditPhasePeaks:
    """Each phase's predicted peak for an edit requested at ``width x height`` (the budget or the
    exact size) whose source was resized to ``edited`` (w, h); ``texts`` distinct prompts are
    encoded; ``extra_bytes`` (user LoRAs) add to the transformer."""
    fused = uses_fused_attention() if fused is None else fused
    memory = memory or edit_memory(source)
    batch = 3 if recipe.uses_cfg else 1
    encode, encode_by = encode_phase(memory, encoder_bits, texts, text_tokens, dtype_bytes)
    tcfg = memory.transformer_cfg
    llama_layers = memory.encoder_cfgs["llama"].num_hidden_layers
    embeddings = embedding_bytes(tcfg, llama_layers, texts, text_tokens, dtype_bytes)
    vae = memory.component_bytes("vae", None, dtype_bytes)
    w, h = edited
    source_peak = vae + encode_activations(memory.vae_cfg, w, h, dtype_bytes, fused)
    transformer = (memory.component_bytes("transformer", transformer_bits, dtype_bytes)
                   + adapter_bytes(source, dtype_bytes) + extra_bytes)
    load = predict_load_peak_bytes(transformer) + embeddings + vae
    max_seq = edit_max_seq(width, height, source.pixels_per_token)
    # both stages' text batches, concatenated from the embeddings (3 + 2 rows with CFG)
    rows = embedding_bytes(tcfg, llama_layers, batch + (2 if recipe.uses_cfg else 1), text_tokens, dtype_bytes)
    expert = max(expert_widths(memory.weights["transformer"].tensors, "transformer"))
    vae_scale = source.vae_scale
    sampling = transformer + embeddings + rows + vae + sampling_activations(
        tcfg, expert, 2 * w, h, vae_scale, batch, dtype_bytes, fused, text_tokens, max_seq)
    decode = vae + decode_activations(memory.vae_cfg, w, h, dtype_bytes, fused)
    if images > 1:
        decode += transformer
    ph, pw = h // vae_scale // tcfg.patch_size, 2 * w // vae_scale // tcfg.patch_size
    return EditPhasePeaks(encode + embeddings + RUNTIME_BYTES, encode_by, source_peak + embeddings + RUNTIME_BYTES,
                          load, max(load, sampling + RUNTIME_BYTES), decode + RUNTIME_BYTES,
                          ph * pw if ph == pw else max(max_seq, ph * pw), batch)


ADVICE = {"encode": "--encoder-bits 8 or 4 (quantizes T5 and Llama)",
          "source": "a smaller --width/--height",
          "sample": "a lower-bit transformer (-q 8 or -q 4) or a smaller --width/--height",
          "decode": "a smaller --width/--height"}


def check_fits_e1(peaks: EditPhasePeaks) -> None:
    """Refuse an edit the machine cannot hold (the MemoryError names the phase and the flags
    that shrink it), before any weight loads."""
    have = machine_memory()
    if peaks.whole > have:
        raise MemoryError(f"this edit needs about {format_bytes(peaks.whole)} (its {peaks.largest} phase) but this "
                          f"machine offers {format_bytes(have)}; try {ADVICE[peaks.largest]}, or --force")
