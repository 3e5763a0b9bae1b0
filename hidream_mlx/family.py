"""Which model family a ``--model`` argument holds: HiDream-O1 (one transformer folder) or
HiDream-I1 (a diffusers pipeline folder with four text encoders, a transformer and a VAE).

A folder is I1 when its ``model_index.json`` names ``HiDreamImagePipeline`` (the diffusers
class; our quantized I1 folders keep that file). A repo id is I1 when its name says
``HiDream-I1``. Everything else is O1, whose own checks then say what is missing.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

O1 = "o1"
I1 = "i1"
I1_PIPELINE_CLASSES = ("HiDreamImagePipeline",)
I1_REPOS = {"full": "HiDream-ai/HiDream-I1-Full", "dev": "HiDream-ai/HiDream-I1-Dev",
            "fast": "HiDream-ai/HiDream-I1-Fast"}
# The official inference.py loads Llama from this gated repository (the I1 repos do not ship it).
LLAMA_REPO = "meta-llama/Meta-Llama-3.1-8B-Instruct"
I1_VARIANTS = ("full", "dev", "fast")


class FamilyError(ValueError):
    """A folder whose family cannot be read (a broken model_index.json)."""


def pipeline_class(folder: Path) -> str | None:
    """``_class_name`` of a folder's ``model_index.json``, or None when there is none."""
    index = Path(folder) / "model_index.json"
    if not index.is_file():
        return None
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FamilyError(f"{index}: not a readable model_index.json ({e})") from None
    if not isinstance(data, dict):
        raise FamilyError(f"{index}: not a JSON object")
    name = data.get("_class_name")
    return name if isinstance(name, str) else None


def family_of(arg) -> str:
    """``I1`` or ``O1`` for a folder, a file or a repo id (see the module docstring)."""
    text = str(arg)
    path = Path(text).expanduser()
    if path.is_dir():
        return I1 if pipeline_class(path) in I1_PIPELINE_CLASSES else O1
    if path.exists():
        return O1
    return I1 if re.search(r"hidream[-_]?i1", text, re.IGNORECASE) else O1


def i1_variant(name: str) -> str:
    """``full``, ``dev`` or ``fast`` from a model's name words (default ``full``), as the
    official ``inference.py`` names its three configurations."""
    words = [w for w in re.split(r"[-_. /]+", str(name).rstrip("/").rsplit("/", 1)[-1].lower()) if w]
    for variant in ("fast", "dev"):
        if variant in words:
            return variant
    return "full"
