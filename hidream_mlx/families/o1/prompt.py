"""Prompt -> token ids, with the checkpoint's own tokenizer files.

The text part of a HiDream-O1 sequence is the Qwen chat template for one user turn (no
system prompt) followed by ``<|boi_token|><|tms_token|>``. Every token is autoregressive
except the tms token, which carries the timestep and is a generation token like the image
patches that follow it (docs/model.md). The template is ours, so :func:`check_chat_template`
proves at load that a checkpoint's own template renders the same conversation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import jinja2.sandbox
import numpy as np
from tokenizers import Tokenizer as _HFTokenizer

from hidream_mlx.files import read_json_file, read_text_file
from hidream_mlx.families.o1.config import TMS_TOKEN_ID

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
        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found (the model folder needs its tokenizer files)")
        text = read_text_file(path, "tokenizer file")
        try:
            self._tok = _HFTokenizer.from_str(text)
        except Exception as e:  # the tokenizers library raises a bare Exception for any bad file
            raise ValueError(f"{path}: not a readable tokenizer file ({e})") from None
        if self._tok.token_to_id("<|tms_token|>") != TMS_TOKEN_ID:
            raise ValueError(f"{path}: <|tms_token|> is not id {TMS_TOKEN_ID}; not a HiDream-O1 tokenizer")

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)


# The longest prompt HiDream-O1 takes, in its own tokens. The official pipeline sets no limit,
# but HiDream's prompt refiner (prompt_agent_v2.py, which writes the long prompts the model was
# tuned for) stops at max_tokens=2048; longer text only makes the prefix slower and larger.
MAX_PROMPT_TOKENS = 2048
_LOADED: dict[tuple, Tokenizer] = {}
_KEEP_LOADED = 4  # tokenizers kept by folder (a process serves one or two models)
SYNTHETIC_TEMPLATE_TOKENS = 14  # the chat template's share of a synthetic prompt (encode_synthetic)


def load_tokenizer(folder: Path | str) -> Tokenizer:
    """``Tokenizer(folder)``, read once per folder (again when its tokenizer.json changes):
    counting a request's tokens before loading and the engine share it."""
    path = Path(folder) / "tokenizer.json"
    try:
        st = path.stat()
    except OSError:
        return Tokenizer(folder)  # its own error names the missing file
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    if key not in _LOADED:
        while len(_LOADED) >= _KEEP_LOADED:
            del _LOADED[next(iter(_LOADED))]
        _LOADED[key] = Tokenizer(folder)
    return _LOADED[key]


def synthetic_prompt_tokens(prompt: str) -> int:
    """What a tokenizer-less (random-weight) model counts for a prompt: about 4 tokens per 3 words."""
    return len(prompt.split()) * 4 // 3


def prompt_tokens(model, text: str) -> tuple[int, int]:
    """(tokens of ``text`` alone, tokens of the whole text prefix it makes: chat template, the
    text, boi and tms) with ``model``'s own tokenizer: an Engine's, or a ModelSource's folder.
    A model with no tokenizer (random weights) counts as :func:`synthetic_prompt_tokens`."""
    tokenizer = getattr(model, "tokenizer", None)
    folder = getattr(model, "tokenizer_dir", None)
    if tokenizer is None and folder is not None:
        tokenizer = load_tokenizer(folder)
    if tokenizer is None:
        alone = synthetic_prompt_tokens(text)
        return alone, alone + SYNTHETIC_TEMPLATE_TOKENS
    return len(tokenizer.encode(text)), len(tokenizer.encode(chat_text(text)))


def encode_prompt(tokenizer: Tokenizer, prompt: str) -> np.ndarray:
    """Token ids [T] of the text part, ending with boi and tms; the cached prefix is ids[:-1]."""
    ids = tokenizer.encode(chat_text(prompt))
    if ids[-1] != TMS_TOKEN_ID:
        raise ValueError("tokenized prompt does not end with <|tms_token|>")
    return ids


PROBE_TEXT = "a red fox, 35 mm"


def probe_messages(image_placeholders: int) -> list[dict]:
    content = [{"type": "image"}] * image_placeholders + [{"type": "text", "text": PROBE_TEXT}]
    return [{"role": "user", "content": content}]


def read_chat_template(folder: Path) -> tuple[Optional[str], Optional[Path]]:
    """The checkpoint's template text and the file it came from (chat_template.jinja, else the
    ``chat_template`` entry of tokenizer_config.json), or (None, None)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return read_text_file(jinja, "chat template"), jinja
    config = folder / "tokenizer_config.json"
    if config.is_file():
        data = read_json_file(config, "tokenizer config")
        template = data.get("chat_template") if isinstance(data, dict) else None
        if isinstance(template, str):
            return template, config
    return None, None


def check_chat_template(folder: Path | str) -> None:
    """Refuse a checkpoint whose own chat template renders a probe conversation (text only, and
    with one and two images) differently from :func:`chat_text`: its prompts would be wrong.

    Rendered in jinja2's sandbox, so nothing in the file can run code.
    """
    template, source = read_chat_template(Path(folder))
    if template is None:
        return
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    try:
        compiled = env.from_string(template)
        for images in (0, 1, 2):
            theirs = compiled.render(messages=probe_messages(images), add_generation_prompt=True) + IMAGE_START
            ours = chat_text(PROBE_TEXT, images)
            if theirs != ours:
                raise ValueError(f"{source}: the checkpoint's chat template renders a different conversation than "
                                 f"hidream-mlx builds ({theirs!r} vs {ours!r}); this checkpoint needs a newer "
                                 "hidream-mlx")
    except jinja2.TemplateError as e:
        raise ValueError(f"{source}: cannot render the chat template ({e})") from None
