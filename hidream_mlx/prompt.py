"""Prompt -> token ids and token types, with the checkpoint's own tokenizer files.

The text part of a HiDream-O1 sequence is the Qwen chat template for one user turn (no
system prompt) followed by ``<|boi_token|><|tms_token|>``. Every token is autoregressive
(type 0) except the tms token, which carries the timestep and is a generation token (type 1)
like the image patches that follow it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hidream_mlx.models.o1.config import TMS_TOKEN_ID

IMAGE_START = "<|boi_token|><|tms_token|>"
UNCOND_PROMPT = " "
VISION_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


def chat_text(prompt: str, image_placeholders: int = 0) -> str:
    """The exact string the official pipeline tokenizes for one user turn."""
    content = VISION_PLACEHOLDER * image_placeholders + prompt
    return f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n{IMAGE_START}"


class Tokenizer:
    """A thin wrapper over ``tokenizer.json`` (loaded with the `tokenizers` library, no code run)."""

    def __init__(self, model_dir: Path | str):
        from tokenizers import Tokenizer as _HFTokenizer

        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found (the model folder needs its tokenizer files)")
        self._tok = _HFTokenizer.from_file(str(path))
        if self._tok.token_to_id("<|tms_token|>") != TMS_TOKEN_ID:
            raise ValueError(f"{path}: <|tms_token|> is not id {TMS_TOKEN_ID}; not a HiDream-O1 tokenizer")

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)


def encode_prompt(tokenizer: Tokenizer, prompt: str) -> np.ndarray:
    """Token ids [T] of the text part, ending with boi and tms; the cached prefix is ids[:-1]."""
    ids = tokenizer.encode(chat_text(prompt))
    if ids[-1] != TMS_TOKEN_ID:
        raise ValueError("tokenized prompt does not end with <|tms_token|>")
    return ids


def token_types(text_len: int, num_image_tokens: int) -> np.ndarray:
    """[text_len + num_image_tokens] of 0 (autoregressive text) and 1 (generation)."""
    types = np.ones(text_len + num_image_tokens, dtype=np.int64)
    types[: text_len - 1] = 0
    return types
