"""Image files in and out: outputs that carry their recipe, references read as a viewer shows them.

Outputs are PNG, JPEG or WebP, chosen by the extension; each carries the same ``hidream-mlx``
JSON object: a PNG text chunk, or the EXIF ImageDescription tag for JPEG and WebP (which have no
text chunks). Inputs in any mode Pillow opens (16-bit and float greyscale, palette or grey with
transparency, CMYK, EXIF-rotated) become the 8-bit RGB picture an image viewer displays.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from hidream_mlx.files import atomic_output, parse_json

METADATA_KEY = "hidream-mlx"
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
EXIF_IMAGE_DESCRIPTION = 0x010E
EXIF_SOFTWARE = 0x0131
DEFAULT_JPEG_QUALITY = 95


def image_format(path: Path | str) -> str:
    """The Pillow format for an output path; any other extension is refused."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"{path}: unsupported image extension {suffix or '(none)'!r}; "
                         f"use one of {', '.join(FORMATS)}")
    return FORMATS[suffix]


def check_quality(quality: Optional[int]) -> None:
    if quality is not None and not 1 <= quality <= 100:
        raise ValueError(f"--quality must be between 1 and 100, got {quality}")


def save_image(image: np.ndarray, path: Path | str, metadata: Optional[dict] = None, overwrite: bool = False,
               quality: Optional[int] = None) -> Path:
    """Write uint8 HWC ``image`` atomically in the format its extension names, with metadata.

    ``quality`` applies to JPEG (default 95) and makes WebP lossy (WebP is lossless without it);
    PNG is always lossless.
    """
    fmt = image_format(path)
    check_quality(quality)
    pil = Image.fromarray(np.ascontiguousarray(image))
    text = json.dumps(metadata, sort_keys=True, ensure_ascii=True) if metadata else None
    software = f"hidream-mlx {(metadata or {}).get('tool_version', '')}".strip()
    options: dict = {}
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        if text is not None:
            info.add_text(METADATA_KEY, text)
            if "prompt" in metadata:
                info.add_text("prompt", str(metadata["prompt"]))
            info.add_text("Software", software)
        options["pnginfo"] = info
    else:
        if text is not None:
            exif = Image.Exif()
            exif[EXIF_IMAGE_DESCRIPTION] = f"{METADATA_KEY}:{text}"
            exif[EXIF_SOFTWARE] = software
            options["exif"] = exif.tobytes()
        if fmt == "JPEG":
            options["quality"] = quality or DEFAULT_JPEG_QUALITY
        elif quality is None:
            options["lossless"] = True
        else:
            options["quality"] = quality
    with atomic_output(path, overwrite) as tmp:
        pil.save(tmp, format=fmt, **options)
    return Path(path)


def read_metadata(path: Path | str) -> dict:
    """The ``hidream-mlx`` object stored in an image we wrote; a clear error otherwise."""
    _check_image_path(Path(path))
    try:
        with Image.open(path) as im:
            text = getattr(im, "text", {}).get(METADATA_KEY)
            if text is None:
                description = im.getexif().get(EXIF_IMAGE_DESCRIPTION)
                if isinstance(description, str) and description.startswith(METADATA_KEY + ":"):
                    text = description[len(METADATA_KEY) + 1:]
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path}: not a readable image ({type(e).__name__})") from None
    if text is None:
        raise ValueError(f"{path}: no hidream-mlx metadata in this image")
    return parse_json(text, str(path), "its hidream-mlx metadata")


def _to_uint8(values: np.ndarray, full_scale: float) -> np.ndarray:
    return np.clip(np.round(values.astype(np.float64) * (255.0 / full_scale)), 0, 255).astype(np.uint8)


def as_viewer_rgb(image: Image.Image) -> Image.Image:
    """The 8-bit RGB picture a viewer shows for ``image``: EXIF orientation applied, high bit
    depths scaled (not clipped), transparency composited over white."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        image = Image.fromarray(_to_uint8(np.asarray(image), 65535.0), "L")
    elif image.mode == "I":
        values = np.asarray(image)
        image = Image.fromarray(_to_uint8(values, 65535.0 if values.max(initial=0) > 255 else 255.0), "L")
    elif image.mode == "F":
        values = np.asarray(image)
        image = Image.fromarray(_to_uint8(values, 1.0 if values.max(initial=0) <= 1.0 else 255.0), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("LA", "La", "PA") or (image.mode == "L" and "transparency" in image.info):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "RGBa"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def _check_image_path(path: Path) -> None:
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, expected an image file")
    if not path.is_file():
        raise ValueError(f"{path}: image not found")


def open_rgb(path: Path | str) -> Image.Image:
    """Open an input image as :func:`as_viewer_rgb` describes; errors name the file."""
    path = Path(path)
    _check_image_path(path)
    try:
        with Image.open(path) as image:
            image.load()
            return as_viewer_rgb(image)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError) as e:
        raise ValueError(f"{path}: not a readable image ({type(e).__name__})") from None
