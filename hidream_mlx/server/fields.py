"""Request bodies -> checked requests of the served family, with the server's own bounds.

Fields are named as the CLI's options with underscores (``noise_scale`` is ``--noise-scale``)
plus the OpenAI images API's ``prompt``, ``n``, ``size``, ``response_format``, ``model`` and
``user``. Anything else is refused, and nothing in a body can name a file on the server:
references, init images and masks arrive as image bytes (``references``, ``init_image`` and
``mask`` as base64 in JSON; uploads on ``/v1/images/edits``) and are stored under the output
folder by content hash.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from PIL import Image, UnidentifiedImageError

from hidream_mlx.files import parse_json as parse_json_text
from hidream_mlx.requests import check_prompt, kind_error, negative_text
from hidream_mlx.images import as_viewer_rgb, mask_levels
from hidream_mlx.workflow.batch import make_request as build_one
from hidream_mlx.weights.lora import LoRAError
from hidream_mlx.weights.lora_specs import parse_lora_options
from hidream_mlx.weights.source import is_repo_id


class BadRequest(ValueError):
    """A body the server refuses (HTTP 400 with this message), before anything is queued."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_request"):
        super().__init__(message)
        self.status = status
        self.code = code


# The CLI's option names (underscores) that a body may carry, with the JSON types they take.
NUMBER = (int, float)
CLI_FIELDS: dict[str, tuple] = {
    "seed": (int,), "width": (int,), "height": (int,), "no_snap": (bool,), "recipe": (str,), "preset": (str,),
    "steps": (int,), "guidance": NUMBER, "shift": NUMBER, "noise_scale": NUMBER, "s_noise": NUMBER,
    "noise_clip": NUMBER, "noise": (str,), "blend_seams": (int,), "seam_smoothing": NUMBER,
    "seam_window": (str,), "seam_strength": NUMBER, "keep_aspect": (bool,), "layout": (str, list, dict),
    "negative_prompt": (str,), "lora": (str, list), "lora_scale": (int, float, list),
    "step_noise_seed": (int,), "strength": NUMBER, "mask_blur": (int,),
    "image_guidance": NUMBER, "refine_strength": NUMBER, "no_clip_cfg_norm": (bool,), "keep_source_size": (bool,),
}
OPENAI_FIELDS: dict[str, tuple] = {
    "prompt": (str,), "n": (int,), "size": (str,), "response_format": (str,), "model": (str,), "user": (str,),
    "references": (list,), "init_image": (str,), "mask": (str,),
}
# The pictures a run starts from (base64 in JSON, uploads on /v1/images/edits), as a message names them.
START_IMAGES = {"init_image": "init image", "mask": "mask"}
ALLOWED = {**CLI_FIELDS, **OPENAI_FIELDS}
SIZE = re.compile(r"^(\d{1,6})x(\d{1,6})$")
LORA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server (the CLI has no such caps: it is the user's own machine)."""

    max_side: int = 4096
    max_pixels: int = 4096 * 4096
    max_steps: int = 200
    max_n: int = 4
    max_references: int = 4
    max_body_bytes: int = 32 * 1024 * 1024


@dataclass
class Spec:
    """A parsed body: the requests to render (one per image) and how to answer."""

    requests: list  # checked requests of the served family
    response_format: str = "b64_json"
    loras: tuple = ()  # LoRASpec per LoRA, in order (they stack)
    settings: dict = field(default_factory=dict)


def parse_json(raw: bytes) -> dict:
    try:
        body = parse_json_text(raw, "", "the body")
    except ValueError as e:
        raise BadRequest(str(e)) from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def check_types(body: dict) -> None:
    unknown = sorted(set(body) - set(ALLOWED))
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(unknown)}; allowed: {', '.join(sorted(ALLOWED))}",
                         code="unknown_field")
    for name, value in body.items():
        wrong = None if value is None else kind_error(name, value, ALLOWED[name])
        if wrong:
            raise BadRequest(wrong)


def parse_size(size: str) -> tuple[int, int]:
    match = SIZE.match(size.strip())
    if not match:
        raise BadRequest(f"size must look like 1024x1024 (width x height in pixels), got {size!r}")
    return int(match.group(1)), int(match.group(2))


def decode_reference(data: bytes, limits: Limits, field: str = "a reference") -> Image.Image:
    """An uploaded reference decoded in memory (never opened from a path); errors name ``field``
    (``references[1]``, ``image upload 'x.png'``), never the decoder's in-memory object."""
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > limits.max_pixels:
            raise BadRequest(f"{field} is {image.width}x{image.height}, above the server's "
                             f"{limits.max_pixels} pixel limit")
        image.load()
    except UnidentifiedImageError:
        raise BadRequest(f"{field} is not a readable image (PNG, JPEG, WebP or another format Pillow "
                         "reads)") from None
    except (OSError, Image.DecompressionBombError, ValueError) as e:
        raise BadRequest(f"{field} is not a readable image ({type(e).__name__}: {e})") from None
    return image


def decode_base64(text: str, field: str = "a reference") -> bytes:
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{field} is neither base64 image data nor a data: URL "
                         "(server paths and remote URLs are not accepted)") from None


def keep_png(picture: Image.Image, folder: Path, prefix: str, identity: bytes) -> str:
    """Keep ``picture`` under ``folder`` as ``PREFIX-<hash of identity>.png`` (written once, atomically),
    so the saved image's metadata names a file that reproduces it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{prefix}-{hashlib.sha256(identity).hexdigest()[:16]}.png"
    if not path.exists():
        tmp = path.with_name(f".{path.name}.tmp")
        picture.save(tmp, format="PNG")
        tmp.replace(path)
    return str(path)


def store_reference(image: Image.Image, folder: Path) -> str:
    """Keep a decoded reference under the output folder, named by its pixels' hash."""
    rgb = image.convert("RGB")
    return keep_png(rgb, folder, "ref", rgb.tobytes() + repr(rgb.size).encode())


def store_start_image(key: str, image: Image.Image, folder: Path) -> str:
    """Keep an init image (as a viewer shows it) or a mask (as its repaint levels) under the output
    folder, named by content hash."""
    picture = mask_levels(image) if key == "mask" else as_viewer_rgb(image)
    return keep_png(picture, folder, "mask" if key == "mask" else "init",
                    picture.tobytes() + repr((picture.mode, picture.size)).encode())


def start_images(body: dict, uploads: dict, limits: Limits, folder: Path) -> dict:
    """``{"init_image": path, "mask": path}`` of what a body starts from: its uploads (decoded
    already) and its base64 fields, stored; one picture given both ways is refused."""
    pictures = dict(uploads)
    for key, what in START_IMAGES.items():
        if body.get(key) is None:
            continue
        if key in pictures:
            raise BadRequest(f"the {what} came both as an upload and as {key}; send it once")
        pictures[key] = decode_reference(decode_base64(body[key], key), limits, key)
    return {key: store_start_image(key, image, folder) for key, image in pictures.items()}


def lora_names(value, lora_dir: Optional[Path]) -> list[str]:
    """LoRA names checked against ``--lora-dir``: a bare file name there, never a path."""
    names = [value] if isinstance(value, str) else list(value)
    if lora_dir is None:
        raise BadRequest("this server has no LoRA folder (start it with serve --lora-dir DIR)")
    available = {p.stem: p for p in lora_dir.glob("*.safetensors")}
    for name in names:
        if not isinstance(name, str) or not LORA_NAME.match(name) or name not in available:
            raise BadRequest(f"unknown LoRA {name!r}; available: {', '.join(sorted(available)) or '(none)'}")
    return names


def lora_specs(names, scales, lora_dir: Optional[Path]) -> tuple:
    """``lora`` names (from ``--lora-dir``) paired in order with ``lora_scale`` values (default 1.0)."""
    if names is None:
        if scales is not None:
            raise BadRequest("lora_scale needs a lora")
        return ()

    chosen = lora_names(names, lora_dir)
    scales = [scales] if isinstance(scales, (int, float)) else list(scales or [])
    if any(isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) for x in scales):
        raise BadRequest("lora_scale must be a finite number or a list of them")
    try:
        return tuple(parse_lora_options([lora_dir / f"{name}.safetensors" for name in chosen], scales))
    except LoRAError as e:
        raise BadRequest(str(e).replace(str(lora_dir), "--lora-dir")) from None


def build_spec(engine, body: dict, limits: Limits, reference_dir: Path, lora_dir: Optional[Path] = None,
               uploads: Optional[list[Image.Image]] = None, start_uploads: Optional[dict] = None) -> Spec:
    """Every check of one body, then one :class:`Request` per image through the CLI's builder.

    ``uploads`` are reference images, ``start_uploads`` the init image and mask uploaded as files
    (``{"init_image": image, "mask": image}``); the body's base64 fields join them.

    This is the single place where a body becomes requests; it calls the CLI's own builder
    (``batch.make_request``: ``requests.build_request`` plus the negative prompt).
    """
    check_types(body)
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise BadRequest("prompt is required")
    try:  # the cheap checks first: nothing is decoded or tokenized for a prompt refused by its length
        check_prompt(prompt)
        negative_text(body.get("negative_prompt"))
    except ValueError as e:
        raise BadRequest(str(e)) from None
    fmt = body.get("response_format") or "b64_json"
    if fmt not in ("b64_json", "url"):
        raise BadRequest(f"response_format must be b64_json or url, got {fmt!r}")
    n = 1 if body.get("n") is None else body["n"]
    if not 1 <= n <= limits.max_n:
        raise BadRequest(f"n must be between 1 and {limits.max_n}, got {n}")
    if body.get("model") not in (None, *served_names(engine)):
        raise BadRequest(f"model {body['model']!r} is not served here; GET /v1/models lists {served_names(engine)}",
                         status=404, code="model_not_found")
    options = {k: v for k, v in body.items() if k in CLI_FIELDS and v is not None}
    loras = lora_specs(options.pop("lora", None), options.pop("lora_scale", None), lora_dir)
    if "size" in body and body["size"] is not None:
        if "width" in options or "height" in options:
            raise BadRequest("give either size or width/height, not both")
        options["width"], options["height"] = parse_size(body["size"])
    check_bounds(options, limits)
    if isinstance(options.get("layout"), (list, dict)):
        options["layout"] = json.dumps(options["layout"])
    elif "layout" in options:
        _check_layout_is_json(options["layout"])
    images = list(uploads or []) + [
        decode_reference(decode_base64(r, f"references[{i}]") if isinstance(r, str) else _not_text(), limits,
                         f"references[{i}]")
        for i, r in enumerate(body.get("references") or [])]
    if len(images) > limits.max_references:
        raise BadRequest(f"at most {limits.max_references} references per request, got {len(images)}")
    refs = [store_reference(image, reference_dir) for image in images]
    options.update(start_images(body, start_uploads or {}, limits, reference_dir))
    first = make_request(engine, prompt, options, refs)
    if first.width * first.height > limits.max_pixels:
        raise BadRequest(f"{first.width}x{first.height} is above the server's limit of {limits.max_pixels} pixels")
    requests = [first] + [make_request(engine, prompt, {**options, "seed": first.seed + i}, refs)
                          for i in range(1, n) if first.seed + i <= 2**32 - 1]
    if len(requests) < n:
        raise BadRequest(f"seed {first.seed} + n - 1 passes the largest seed; use a smaller seed")
    return Spec(requests, fmt, loras, {k: v for k, v in body.items() if k not in ("references", *START_IMAGES)})


def make_request(engine, prompt: str, options: dict, refs: list[str]) -> Request:
    try:
        return build_one(engine, {**options, "prompt": prompt, "refs": refs})
    except (ValueError, OSError) as e:
        raise BadRequest(str(e)) from None


def check_bounds(options: dict, limits: Limits) -> None:
    for side in ("width", "height"):
        if side in options and not 1 <= options[side] <= limits.max_side:
            raise BadRequest(f"{side} must be between 1 and {limits.max_side} on this server, got {options[side]}")
    if "steps" in options and not 1 <= options["steps"] <= limits.max_steps:
        raise BadRequest(f"steps must be between 1 and {limits.max_steps} on this server, got {options['steps']}")


def _check_layout_is_json(text: str) -> None:
    # The CLI reads --layout from a file when it names one; a request must never name a server path.
    try:
        parse_json_text(text, "", "layout")
    except ValueError:
        raise BadRequest("layout must be JSON boxes (a file name is not accepted here)") from None


def _not_text():
    raise BadRequest("references must be base64 strings or data: URLs")


def served_names(engine) -> list[str]:
    """Model ids a body may name, the first the one ``/v1/models`` lists: a repo id as such, a
    local folder by its last component only (never a path of the server's, relative or not)."""
    name = str(engine.describe()["model"]).rstrip("/")
    names = [name, Path(name).name] if is_repo_id(name) else [Path(name).name]
    return list(dict.fromkeys([*names, "hidream-mlx"]))
