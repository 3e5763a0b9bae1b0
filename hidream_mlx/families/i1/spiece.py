"""A T5 tokenizer from ``spiece.model`` alone, for folders without ``tokenizer.json``.

``spiece.model`` is a SentencePiece ``ModelProto`` (protobuf). Only three of its fields matter
for a unigram T5 tokenizer: the pieces (text, score, type), the unknown id and the normalizer's
precompiled character map; they are read here with a tiny wire-format reader, so neither
``sentencepiece`` nor ``protobuf`` is needed. The tokenizer is then assembled the way
transformers converts a slow T5 tokenizer: unigram model, the precompiled normalizer,
whitespace split + ``▁`` metaspace, ``</s>`` appended, ``extra_ids`` sentinels after the pieces
(highest number first).
"""

from __future__ import annotations

import struct
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram

from hidream_mlx.weights.loading import ModelLoadError

# Field numbers in sentencepiece_model.proto.
_PIECES, _TRAINER, _NORMALIZER = 1, 2, 3
_PIECE_TEXT, _PIECE_SCORE, _PIECE_TYPE = 1, 2, 3
_TRAINER_UNK_ID, _TRAINER_BYTE_FALLBACK, _TRAINER_EOS_ID = 40, 35, 42
_NORMALIZER_CHARSMAP = 2
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes):
    """(field number, wire type, value) of one message; length-delimited values as bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated message")
        yield number, wire, value


def read_spiece(path: Path) -> dict:
    """Pieces [(text, score, type)], unk/eos ids, byte fallback and the charsmap of a model."""
    pieces, unk_id, eos_id, byte_fallback, charsmap = [], 0, 2, False, b""
    try:
        for number, _, value in _fields(Path(path).read_bytes()):
            if number == _PIECES:
                text, score, kind = "", 0.0, _NORMAL
                for n, _, v in _fields(value):
                    if n == _PIECE_TEXT:
                        text = v.decode("utf-8")
                    elif n == _PIECE_SCORE:
                        score = struct.unpack("<f", v)[0]
                    elif n == _PIECE_TYPE:
                        kind = v
                pieces.append((text, score, kind))
            elif number == _TRAINER:
                for n, _, v in _fields(value):
                    if n == _TRAINER_UNK_ID:
                        unk_id = v
                    elif n == _TRAINER_EOS_ID:
                        eos_id = v
                    elif n == _TRAINER_BYTE_FALLBACK:
                        byte_fallback = bool(v)
            elif number == _NORMALIZER:
                for n, _, v in _fields(value):
                    if n == _NORMALIZER_CHARSMAP:
                        charsmap = v
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: not a readable SentencePiece model ({e})") from None
    if not pieces:
        raise ModelLoadError(f"{path}: a SentencePiece model with no pieces")
    return {"pieces": pieces, "unk_id": unk_id, "eos_id": eos_id, "byte_fallback": byte_fallback,
            "charsmap": charsmap}


def t5_tokenizer_from_spiece(path: Path, extra_ids: int = 100) -> Tokenizer:
    model = read_spiece(path)
    pieces = model["pieces"]
    vocab = [(text, score) for text, score, _ in pieces]
    vocab += [(f"<extra_id_{i}>", 0.0) for i in range(extra_ids - 1, -1, -1)]
    tok = Tokenizer(Unigram(vocab, model["unk_id"], model["byte_fallback"]))
    if model["charsmap"]:
        tok.normalizer = normalizers.Precompiled(model["charsmap"])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    specials = [text for text, _, kind in pieces if kind in (_UNKNOWN, _CONTROL)]
    specials += [text for text, _ in vocab[len(pieces):]]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    eos = pieces[model["eos_id"]][0]
    tok.post_processor = processors.TemplateProcessing(single=f"$A {eos}", pair=f"$A {eos} $B {eos}",
                                                       special_tokens=[(eos, model["eos_id"])])
    return tok
