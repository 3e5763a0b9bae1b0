"""The four I1 tokenizers, run through the ``tokenizers`` package exactly as the pipeline calls
them: ``padding="max_length"``, truncation, special tokens added.

Per encoder (read from each ``tokenizer_N/`` folder, never assumed):
* CLIP-L / CLIP-G: ``<|startoftext|>`` text ``<|endoftext|>``, padded with the folder's pad
  token (CLIP-L: ``<|endoftext|>``, CLIP-G: ``!``) to ``min(max_sequence_length, 218)``.
* T5: text ``</s>``, padded with ``<pad>`` to ``min(max_sequence_length, model_max_length)``.
* Llama: ``<|begin_of_text|>`` text, padded with the eos token (the pipeline sets pad = eos).
``tokenizer.json`` is used when present; otherwise CLIP is assembled from ``vocab.json`` +
``merges.txt`` and T5 from ``spiece.model``, the way transformers converts the slow tokenizers
(both checked to give the same ids).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from hidream_mlx.families.i1.spiece import t5_tokenizer_from_spiece
from hidream_mlx.weights.loading import ModelLoadError

CLIP_MAX_LENGTH = 218  # the pipeline's cap for both CLIP tokenizers
KINDS = ("clip", "t5", "llama")
_CLIP_SPLIT = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]"
               r"|[^\s\p{L}\p{N}]+")


@dataclass
class Tokenized:
    input_ids: np.ndarray  # [B, T] int64
    attention_mask: np.ndarray  # [B, T] int64, 1 = a real token
    truncated: list[bool]  # per text: tokens were cut at max_length (the pipeline warns)


def _token_text(value) -> str | None:
    # tokenizer_config.json stores special tokens as strings or as serialized AddedToken dicts.
    if isinstance(value, dict):
        return value.get("content")
    return value


def _clip_from_vocab(folder: Path, config: dict) -> Tokenizer:
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    if not (vocab_path.is_file() and merges_path.is_file()):
        raise ModelLoadError(f"{folder}: no tokenizer.json, nor vocab.json + merges.txt")
    vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    merges = [tuple(line.split()) for line in merges_path.read_text(encoding="utf-8").splitlines()
              if line.strip() and not line.startswith("#version")]
    bos = _token_text(config.get("bos_token")) or "<|startoftext|>"
    eos = _token_text(config.get("eos_token")) or "<|endoftext|>"
    unk = _token_text(config.get("unk_token")) or eos
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk, continuing_subword_prefix="",
                        end_of_word_suffix="</w>", fuse_unk=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    specials = [t for t in (_token_text(config.get("pad_token")), bos, eos) if t and t in vocab]
    tok.add_special_tokens(specials)
    tok.post_processor = processors.RobertaProcessing((eos, vocab[eos]), (bos, vocab[bos]),
                                                      trim_offsets=False, add_prefix_space=False)
    return tok


class PromptTokenizer:
    """One encoder's tokenizer with the pipeline's padding and truncation fixed."""

    def __init__(self, tokenizer: Tokenizer, max_length: int, pad_token: str, where: str):
        pad_id = tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise ModelLoadError(f"{where}: pad token {pad_token!r} is not in the vocabulary")
        self.max_length, self.pad_token, self.pad_id = max_length, pad_token, pad_id
        tokenizer.enable_truncation(max_length=max_length)
        tokenizer.enable_padding(length=max_length, pad_id=pad_id, pad_token=pad_token, direction="right")
        self.tokenizer = tokenizer

    def __call__(self, texts: Sequence[str]) -> Tokenized:
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=True)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        return Tokenized(ids, mask, [bool(e.overflowing) for e in encodings])


def load_tokenizer(folder: Path | str, kind: str, max_sequence_length: int = 128) -> PromptTokenizer:
    """``kind`` is ``clip``, ``t5`` or ``llama``; see the module docstring for what each pads with."""
    if kind not in KINDS:
        raise ValueError(f"tokenizer kind {kind!r}: choose one of {', '.join(KINDS)}")
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: no such tokenizer folder")
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    if (folder / "tokenizer.json").is_file():
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    elif kind == "clip":
        tok = _clip_from_vocab(folder, config)
    elif kind == "t5" and (folder / "spiece.model").is_file():
        tok = t5_tokenizer_from_spiece(folder / "spiece.model", int(config.get("extra_ids", 100)))
    else:
        raise ModelLoadError(f"{folder}: no tokenizer.json (needed for the {kind} tokenizer)")
    if kind == "clip":
        max_length = min(max_sequence_length, CLIP_MAX_LENGTH)
        pad = _token_text(config.get("pad_token")) or _token_text(config.get("eos_token")) or "<|endoftext|>"
    else:
        model_max = config.get("model_max_length")
        max_length = min(max_sequence_length, int(model_max)) if isinstance(model_max, (int, float)) \
            else max_sequence_length
        if kind == "t5":
            pad = _token_text(config.get("pad_token")) or "<pad>"
        else:
            pad = _token_text(config.get("eos_token"))
            if not pad:
                raise ModelLoadError(f"{folder}: tokenizer_config.json names no eos_token (the Llama pad)")
    return PromptTokenizer(tok, max_length, pad, str(folder))
