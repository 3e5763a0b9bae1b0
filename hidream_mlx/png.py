"""Writing PNGs that carry everything needed to reproduce them, and reading it back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from hidream_mlx.files import atomic_output

METADATA_KEY = "hidream-mlx"


def save_png(image: np.ndarray, path: Path | str, metadata: dict | None = None, overwrite: bool = False) -> Path:
    """Write uint8 HWC ``image`` atomically; ``metadata`` goes into a JSON text chunk."""
    info = PngImagePlugin.PngInfo()
    if metadata:
        info.add_text(METADATA_KEY, json.dumps(metadata, sort_keys=True))
        if "prompt" in metadata:
            info.add_text("prompt", str(metadata["prompt"]))
        info.add_text("Software", f"hidream-mlx {metadata.get('tool_version', '')}".strip())
    with atomic_output(path, overwrite) as tmp:
        Image.fromarray(np.ascontiguousarray(image)).save(tmp, format="PNG", pnginfo=info)
    return Path(path)


def read_metadata(path: Path | str) -> dict:
    with Image.open(path) as im:
        text = im.text.get(METADATA_KEY) if hasattr(im, "text") else None
    if text is None:
        raise ValueError(f"{path}: no hidream-mlx metadata in this PNG")
    return json.loads(text)
