"""Prompt -> HiDream-I1 conditioning, as the diffusers pipeline's ``encode_prompt`` builds it.

Three arrays reach the transformer (``PromptEmbedding``):
* ``pooled_embeds`` [B, dl + dg]: CLIP-L and CLIP-G projected pooled outputs, concatenated;
* ``t5_embeds`` [B, T, d_t5]: T5 ``last_hidden_state`` (padding masked inside T5 only);
* ``llama_hidden_states`` [L, B, T, d_llama]: one entry per Llama layer, the last after the
  final norm. Padded positions of T5 and Llama are kept; the transformer sees all T of each.
With CFG the batch is ``[negative, positive]`` (Llama: along axis 1), the negative prompt going
to all four encoders.

``TextEncoders.encode`` runs one encoder at a time over every text and frees it before the next
loads (unless ``keep_loaded``), so at most one encoder is resident; ``prompt_embedding`` with a
``PromptCache`` encodes each distinct text once, so generating many seeds of one prompt pays
for the encoders once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn

from hidream_mlx.families.i1.clip import load_clip
from hidream_mlx.families.i1.encoder_common import check_quant_args, quantize_linears
from hidream_mlx.families.i1.llama import load_llama
from hidream_mlx.families.i1.t5 import load_t5
from hidream_mlx.families.i1.tokenization import PromptTokenizer, Tokenized, load_tokenizer
from hidream_mlx.weights.loading import ModelLoadError
from hidream_mlx.quant.recipes import DEFAULT_GROUP_SIZE
from hidream_mlx.family import uses_cfg

DEFAULT_MAX_SEQUENCE_LENGTH = 128
# pipeline component -> (encoder folder, tokenizer folder, tokenizer kind)
COMPONENTS = {
    "clip_l": ("text_encoder", "tokenizer", "clip"),
    "clip_g": ("text_encoder_2", "tokenizer_2", "clip"),
    "t5": ("text_encoder_3", "tokenizer_3", "t5"),
    "llama": ("text_encoder_4", "tokenizer_4", "llama"),
}


@dataclass
class PromptEmbedding:
    """The transformer's three text inputs for a batch of prompts."""

    pooled_embeds: mx.array  # [B, dl + dg]
    t5_embeds: mx.array  # [B, T, d_t5]
    llama_hidden_states: mx.array  # [L, B, T, d_llama]

    @property
    def batch_size(self) -> int:
        return self.pooled_embeds.shape[0]

    @property
    def nbytes(self) -> int:
        return self.pooled_embeds.nbytes + self.t5_embeds.nbytes + self.llama_hidden_states.nbytes

    @classmethod
    def concatenate(cls, parts: Sequence["PromptEmbedding"]) -> "PromptEmbedding":
        """Batch several embeddings in order (CFG: ``[negative, positive]``)."""
        return cls(mx.concatenate([p.pooled_embeds for p in parts], axis=0),
                   mx.concatenate([p.t5_embeds for p in parts], axis=0),
                   mx.concatenate([p.llama_hidden_states for p in parts], axis=1))

    def row(self, i: int) -> "PromptEmbedding":
        return PromptEmbedding(self.pooled_embeds[i:i + 1], self.t5_embeds[i:i + 1],
                               self.llama_hidden_states[:, i:i + 1])


@dataclass
class TextEncoders:
    """The four encoders of a HiDream-I1 pipeline folder, loaded on demand.

    ``llama_dir`` replaces ``text_encoder_4/`` + ``tokenizer_4/`` (the official release ships
    Llama separately; an mlx-lm quantized folder works too). ``quantize_bits`` quantizes the
    T5 and Llama linears on load (4 or 8, ``group_size`` 32/64/128); layers whose input width
    the group size does not divide stay in floats (listed in ``kept_in_float``).
    """

    pipeline_dir: Path
    dtype: mx.Dtype = mx.float32
    llama_dir: Optional[Path] = None
    quantize_bits: Optional[int] = None
    group_size: int = DEFAULT_GROUP_SIZE
    max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH
    keep_loaded: bool = False
    kept_in_float: dict[str, list[str]] = field(default_factory=dict)
    _models: dict[str, nn.Module] = field(default_factory=dict, repr=False)
    _tokenizers: dict[str, PromptTokenizer] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.pipeline_dir = Path(self.pipeline_dir)
        if self.llama_dir is not None:
            self.llama_dir = Path(self.llama_dir)
        if self.quantize_bits is not None:
            check_quant_args(self.quantize_bits, self.group_size)
        for name in COMPONENTS:
            for folder in self.folders(name):
                if not folder.is_dir():
                    hint = ("; the official release ships Llama separately: give its folder as llama_dir"
                            if name == "llama" else "")
                    raise ModelLoadError(f"{folder}: missing (a HiDream-I1 pipeline folder has "
                                         f"{', '.join(d for c in COMPONENTS.values() for d in c[:2])}){hint}")

    def folders(self, name: str) -> tuple[Path, Path]:
        encoder, tokenizer, _ = COMPONENTS[name]
        if name == "llama" and self.llama_dir is not None:
            return self.llama_dir, self.llama_dir
        return self.pipeline_dir / encoder, self.pipeline_dir / tokenizer

    def tokenizer(self, name: str) -> PromptTokenizer:
        if name not in self._tokenizers:
            self._tokenizers[name] = load_tokenizer(self.folders(name)[1], COMPONENTS[name][2],
                                                    self.max_sequence_length)
        return self._tokenizers[name]

    def tokenize(self, name: str, texts: Sequence[str]) -> Tokenized:
        return self.tokenizer(name)(texts)

    def model(self, name: str) -> nn.Module:
        if name not in self._models:
            folder = self.folders(name)[0]
            loader = {"clip_l": load_clip, "clip_g": load_clip, "t5": load_t5, "llama": load_llama}[name]
            model = loader(folder, self.dtype)
            already = name == "llama" and model.config.quantization
            if self.quantize_bits is not None and name in ("t5", "llama") and not already:
                self.kept_in_float[name] = quantize_linears(model, self.quantize_bits, self.group_size)
            mx.eval(model.parameters())
            self._models[name] = model
        return self._models[name]

    def free(self, name: Optional[str] = None) -> None:
        """Drop one encoder (or all); its weights go once nothing else holds them."""
        for key in [name] if name else list(self._models):
            self._models.pop(key, None)

    def run(self, name: str, texts: Sequence[str]) -> dict[str, mx.array]:
        """One encoder's raw outputs for ``texts`` (evaluated), keyed like the fixtures."""
        tokens = self.tokenize(name, texts)
        ids, mask = mx.array(tokens.input_ids), mx.array(tokens.attention_mask)
        model = self.model(name)
        if name in ("clip_l", "clip_g"):
            out = model(ids)  # the pipeline gives CLIP no padding mask
            result = {"text_embeds": out.text_embeds, "last_hidden_state": out.last_hidden_state}
        elif name == "t5":
            result = {"last_hidden_state": model(ids, mask)}
        else:
            result = {"hidden_states": model.hidden_states(ids, mask)}
        mx.eval(result)
        return result

    def encode(self, texts: Sequence[str]) -> PromptEmbedding:
        """Batch conditioning for ``texts``, one encoder resident at a time."""
        texts = list(texts)
        if not texts:
            raise ValueError("encode: no texts")
        outputs = {}
        for name in COMPONENTS:
            outputs[name] = self.run(name, texts)
            if not self.keep_loaded:
                self.free(name)
        pooled = mx.concatenate([outputs["clip_l"]["text_embeds"], outputs["clip_g"]["text_embeds"]], axis=-1)
        return PromptEmbedding(pooled, outputs["t5"]["last_hidden_state"], outputs["llama"]["hidden_states"])


class PromptCache:
    """Encoded texts by text: each distinct prompt goes through the encoders once.

    Keyed by text only: use one cache per ``TextEncoders`` (dtype and quantization change the
    arrays)."""

    def __init__(self):
        self._store: dict[str, PromptEmbedding] = {}

    def __contains__(self, text: str) -> bool:
        return text in self._store

    def __len__(self) -> int:
        return len(self._store)

    def keep_only(self, texts: Sequence[str]) -> None:
        """Forget every text not in ``texts`` (a long prompt file encodes in groups)."""
        wanted = set(texts)
        for text in [t for t in self._store if t not in wanted]:
            del self._store[text]

    def lookup(self, encoders: TextEncoders, texts: Sequence[str]) -> list[PromptEmbedding]:
        missing = list(dict.fromkeys(t for t in texts if t not in self._store))
        if missing:
            batch = encoders.encode(missing)
            for i, text in enumerate(missing):
                self._store[text] = batch.row(i)
        return [self._store[t] for t in texts]


def prompt_texts(prompt: str, negative_prompt: Optional[str], guidance_scale: float) -> list[str]:
    """The texts one prompt encodes, in batch order: ``[negative, positive]`` when
    ``guidance_scale > 1`` (CFG; ``negative_prompt`` None means ``""``), else ``[positive]``."""
    return [negative_prompt or "", prompt] if uses_cfg(guidance_scale) else [prompt]


def prompt_embedding(encoders: TextEncoders, prompt: str, negative_prompt: Optional[str] = None,
                     guidance_scale: float = 0.0, cache: Optional[PromptCache] = None) -> PromptEmbedding:
    """What the transformer gets for one prompt (the batch of :func:`prompt_texts`)."""
    texts = prompt_texts(prompt, negative_prompt, guidance_scale)
    if cache is None:
        cache = PromptCache()
    return PromptEmbedding.concatenate(cache.lookup(encoders, texts))
