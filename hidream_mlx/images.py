"""Image files in and out: outputs that carry their recipe, references read as a viewer shows them.

Outputs are PNG, JPEG or WebP, chosen by the extension; each carries the same ``hidream-mlx``
JSON object: a PNG text chunk, or the EXIF ImageDescription tag for JPEG and WebP (which have no
text chunks). Inputs in any mode Pillow opens (16-bit and float greyscale, palette or grey with
transparency, CMYK, EXIF-rotated) become the 8-bit RGB picture an image viewer displays.
"""

from __future__ import annotations

import json
import math
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
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{path}: not a readable image ({type(e).__name__})") from None
    except ValueError as e:  # Pillow's bound on text chunks ("Decompressed Data Too Large")
        raise ValueError(f"{path}: its text chunks cannot be read ({e})") from None
    if text is None:
        raise ValueError(f"{path}: no hidream-mlx metadata in this image")
    meta = parse_json(text, str(path), "its hidream-mlx metadata")
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: its hidream-mlx metadata is {shown(meta)}, not the JSON object hidream-mlx writes")
    return meta


# --- what the stored object may hold ------------------------------------------------------------
# The kinds its values take, for one schema (``hidream_mlx.workflow.metadata``: the shared keys;
# each family's ``metadata_fields``: its own) that every reader applies before using a value.

def shown(value) -> str:
    """``value`` as JSON spells it (``null``, ``"5"``, ``[1, 2]``), cut to 40 characters."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


class Kind:
    """What one stored value must be: :meth:`problem` says why ``value`` (found at ``at``) is not."""

    what = ""
    plural = ""  # how a list of them is said, when "a list of <what>" would not read

    def problem(self, value, at: str) -> Optional[str]:
        raise NotImplementedError


class Scalar(Kind):
    def __init__(self, what: str, test, plural: str = ""):
        self.what, self.test, self.plural = what, test, plural

    def problem(self, value, at: str) -> Optional[str]:
        return None if self.test(value) else f"{at} must be {self.what}, got {shown(value)}"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


TEXT = Scalar("text", lambda v: isinstance(v, str))
WHOLE = Scalar("a whole number", lambda v: isinstance(v, int) and not isinstance(v, bool), "whole numbers")
NUMBER = Scalar("a finite number", _is_number)
FLAG = Scalar("true or false", lambda v: isinstance(v, bool))
SCALAR = Scalar("text, a number, true, false or null",
                lambda v: v is None or isinstance(v, (str, bool)) or _is_number(v))
# A file an image was made from, recorded by its own name: never a folder (nor a path out of one).
FILE_NAME = Scalar("a file name without a folder",
                   lambda v: isinstance(v, str) and v not in ("", ".", "..") and not set(v) & set("/\\\0"))
SHA256 = Scalar("a sha256 (64 hex digits)",
                lambda v: isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v))


def one_of(*values) -> Kind:
    """Exactly one of ``values`` (of the same JSON kind: ``true`` is not ``1``)."""
    return Scalar("one of " + ", ".join(shown(v) for v in values),
                  lambda v: any(type(v) is type(x) and v == x for x in values))


class Nullable(Kind):
    def __init__(self, kind: Kind):
        self.kind, self.what = kind, f"{kind.what} or null"

    def problem(self, value, at: str) -> Optional[str]:
        if value is None or self.kind.problem(value, at) is None:
            return None
        # A scalar's refusal says that null would do too; a record's names the key inside it.
        return Scalar.problem(self, value, at) if isinstance(self.kind, Scalar) else self.kind.problem(value, at)

    def test(self, value) -> bool:
        return False  # only asked (by Scalar.problem) once the value is known to be wrong


def optional(kind: Kind) -> Kind:
    """``kind`` or null."""
    return Nullable(kind)


class ListOf(Kind):
    def __init__(self, item: Kind):
        self.item, self.what = item, f"a list of {item.plural or item.what}"

    def problem(self, value, at: str) -> Optional[str]:
        if not isinstance(value, list):
            return f"{at} must be {self.what}, got {shown(value)}"
        return next((p for i, v in enumerate(value) if (p := self.item.problem(v, f"{at}[{i}]"))), None)


class Record(Kind):
    """A JSON object: ``fields`` checked where present (``required`` always), any other key
    taken as ``rest`` says (by default: anything, so a newer version's additions still read)."""

    def __init__(self, fields: dict, required: tuple = (), rest: Optional[Kind] = None, what: str = "a JSON object",
                 plural: str = "JSON objects"):
        self.fields, self.required, self.rest, self.what, self.plural = fields, required, rest, what, plural

    def problem(self, value, at: str) -> Optional[str]:
        if not isinstance(value, dict):
            return f"{at} must be {self.what}, got {shown(value)}"
        for key in self.required:
            if key not in value:
                return f"{at}.{key} is missing" if at else f"{key} is missing"
        for key, item in value.items():
            kind = self.fields.get(key, self.rest)
            problem = kind.problem(item, f"{at}.{key}" if at else str(key)) if kind is not None else None
            if problem:
                return problem
        return None


# An input file (reference, source image, init image, mask): its name and content, never its folder.
FILE_RECORD = Record({"name": FILE_NAME, "sha256": SHA256}, required=("name", "sha256"),
                     what='an object with "name" and "sha256"', plural='objects with "name" and "sha256"')


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


def _read_image(path: Path | str, convert) -> Image.Image:
    """``convert`` of the image in ``path``, read fully; every way reading fails is one line naming it."""
    path = Path(path)
    _check_image_path(path)
    try:
        with Image.open(path) as image:
            image.load()
            return convert(image)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError) as e:
        raise ValueError(f"{path}: not a readable image ({type(e).__name__})") from None


def open_rgb(path: Path | str) -> Image.Image:
    """Open an input image as :func:`as_viewer_rgb` describes; errors name the file."""
    return _read_image(path, as_viewer_rgb)


# --- starting from an image: the source, the mask and the final composite -----------------------

def read_rgb_size(path: Path | str) -> tuple[int, int]:
    """(width, height) of an input image as a viewer shows it (EXIF rotation applied); reading it
    fully is the readability check, so a damaged file fails here and not mid-run."""
    return open_rgb(path).size


def resized_rgb(path: Path | str, width: int, height: int) -> np.ndarray:
    """An input image as uint8 RGB HWC at ``width`` x ``height``: its own pixels when it has that
    size already, else resized with Lanczos (as diffusers' image processor resizes a source)."""
    image = open_rgb(path)
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    return np.asarray(image, dtype=np.uint8)


def mask_levels(image: Image.Image) -> Image.Image:
    """A mask picture as a grey image (mode L) whose level is how much to repaint: white repaints,
    black keeps, grey in between. A mask with transparency says it with its alpha instead, as the
    OpenAI edits API's masks do: fully transparent repaints, opaque keeps."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        alpha = np.asarray(image.convert("RGBA"))[..., 3]
        if alpha.min() < 255:
            return Image.fromarray(255 - alpha, "L")
    return as_viewer_rgb(image).convert("L")


def read_mask(path: Path | str, width: int, height: int) -> np.ndarray:
    """A mask file as float32 [height, width] in [0, 1] (:func:`mask_levels`: 1 repaints, 0 keeps),
    resized bilinearly to the render size, so a mask drawn at the source's size fits any render size."""
    levels = _read_image(path, mask_levels)
    if levels.size != (width, height):
        levels = levels.resize((width, height), Image.BILINEAR)
    return np.asarray(levels, dtype=np.float32) / np.float32(255.0)


def _max3x3(values: np.ndarray) -> np.ndarray:
    """The largest value in each pixel's 3x3 neighbourhood (outside the image counts as 0)."""
    padded = np.pad(values, 1)
    rows = np.maximum(np.maximum(padded[:-2], padded[1:-1]), padded[2:])
    return np.maximum(np.maximum(rows[:, :-2], rows[:, 1:-1]), rows[:, 2:])


def edge_blend(mask: np.ndarray, radius: int) -> np.ndarray:
    """The weight of the generated image in the final composite: the mask, widened by a linear
    ramp that falls from each mask value by ``1 / (radius + 1)`` per pixel of (chessboard) distance
    into the kept region. So the blend reaches at most ``radius`` pixels into the black, and beyond
    that the weight is exactly 0 (the source, unchanged); the repainted region keeps its weight."""
    weight = np.asarray(mask, dtype=np.float32)
    fall = np.float32(1.0 / (radius + 1))
    for _ in range(radius):  # each pass spreads the ramp one pixel further
        weight = np.maximum(weight, _max3x3(weight) - fall)
    return weight


def composite(generated: np.ndarray, source: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """uint8 HWC: ``weight`` [H, W] of ``generated`` over ``source``; where the weight is 0 the
    result is the source's own pixels, where it is 1 the generated ones."""
    src = source.astype(np.float32)
    mixed = src + weight[..., None] * (generated.astype(np.float32) - src)
    return np.clip(np.round(mixed), 0, 255).astype(np.uint8)
