"""What a prompt (and a negative prompt) may be, checked the same way by the CLI, prompt files,
batteries and the server, before any weights load.

* Text, not empty, without Qwen special-token strings (:data:`SPECIAL_TOKEN`).
* At most :data:`MAX_PROMPT_CHARS` characters, checked first and without tokenizing, so a
  megabyte of text is refused at the cost of ``len``.
* Then in the model's own tokens, with the family's rule:
  - HiDream-O1 reads the whole prompt into its prefix (the official pipeline sets no limit), so
    a prompt beyond :data:`~hidream_mlx.families.o1.prompt.MAX_PROMPT_TOKENS` is refused, and
    the prompt's real length goes into the memory fit check (``Request.text_tokens``).
  - HiDream-I1's four encoders truncate at 128 tokens, as the official pipeline does (which
    warns and drops the rest): a longer prompt runs at the same cost and a note says which
    encoders cut it.
* A negative prompt that is empty or only whitespace means "no negative prompt": the
  recipe's own unconditional prompt (``" "`` for O1, ``""`` for I1), and the same image.
"""

from __future__ import annotations

import re
from typing import Callable, Optional

from hidream_mlx.families.i1.text_encoding import DEFAULT_MAX_SEQUENCE_LENGTH, truncating_encoders
from hidream_mlx.families.o1.prompt import MAX_PROMPT_TOKENS, prompt_tokens

# Far above any prompt that fits MAX_PROMPT_TOKENS (about 4 characters per token in English,
# fewer in other scripts); only a bound on the work of counting tokens.
MAX_PROMPT_CHARS = 16_000

# Qwen special tokens look like <|name|>; inside a prompt the tokenizer would turn them into
# structure (end the user turn, open an image), which the official pipeline never intends.
SPECIAL_TOKEN = re.compile(r"<\|[^<>|\s]*\|>")


def limits_help() -> str:
    """The prompt limits in one sentence, for --help texts (generate, eval, serve)."""
    return (f"at most {MAX_PROMPT_CHARS:,} characters; HiDream-O1 at most {MAX_PROMPT_TOKENS:,} of its tokens, "
            f"HiDream-I1's encoders read the first {DEFAULT_MAX_SEQUENCE_LENGTH} (the rest dropped, with a note)")


class RequestError(ValueError):
    """An option value that cannot run (a prompt here, any option in ``requests``, which
    re-exports it); the message names the option as the CLI spells it."""


def check_text(text, flag: str = "--prompt") -> str:
    """``text`` if it is a non-empty string of at most MAX_PROMPT_CHARS with no special tokens."""
    if not isinstance(text, str):
        raise RequestError(f"{flag} must be text, got {type(text).__name__}")
    if not text.strip():
        raise RequestError(f"{flag} is empty")
    if len(text) > MAX_PROMPT_CHARS:
        raise RequestError(f"{flag} is {len(text):,} characters; at most {MAX_PROMPT_CHARS:,} are accepted; "
                           "shorten it")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON's "\ud800": a lone surrogate, which no tokenizer or file takes
        raise RequestError(f"{flag} is not valid text: a lone surrogate {text[e.start]!r} at character "
                           f"{e.start + 1}") from None
    found = SPECIAL_TOKEN.search(text)
    if found:
        raise RequestError(f"{flag} contains the special-token string {found.group(0)!r}, which would change "
                           "the conversation the model sees; remove it")
    return text


def negative_text(negative) -> Optional[str]:
    """The negative prompt to encode: None (the recipe's unconditional prompt) when it is empty
    or only whitespace, else the checked text."""
    if isinstance(negative, str) and not negative.strip():
        return None
    return None if negative is None else check_text(negative, "--negative-prompt")


def o1_text_tokens(model, prompt: str, negative: Optional[str]) -> int:
    """Refuse a prompt or negative prompt longer than HiDream-O1 takes; the longest text prefix
    (chat template included) a run caches, for the memory fit check."""
    longest = 0
    for flag, text in (("--prompt", prompt), ("--negative-prompt", negative)):
        if text is None:
            continue
        alone, prefix = prompt_tokens(model, text)
        if alone > MAX_PROMPT_TOKENS:
            raise RequestError(f"{flag} is {alone:,} tokens; HiDream-O1 takes at most {MAX_PROMPT_TOKENS:,} "
                               "(the longest prompt HiDream's own prompt refiner writes); shorten it")
        longest = max(longest, prefix)
    return longest


def note_i1_truncation(model, prompt: str, negative: Optional[str], note: Callable[[str], None]) -> None:
    """Say when HiDream-I1's encoders will read only the first part of a text."""
    for flag, text in (("--prompt", prompt), ("--negative-prompt", negative)):
        if text is None:
            continue
        cut = truncating_encoders(model, text)
        if cut:
            note(f"note: {flag} is longer than the {DEFAULT_MAX_SEQUENCE_LENGTH} tokens HiDream-I1's text encoders "
                 f"read ({', '.join(cut)} cut it); the rest is dropped, as in the official pipeline")
