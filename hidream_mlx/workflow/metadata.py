"""The one schema of an image's ``hidream-mlx`` object, checked once before anything reads a value.

``info IMAGE``, ``--from-image`` and the server (on what it is about to record) ask
:func:`check_image_metadata`: the object itself, then its family (an image of a family this
version does not know says so before any other complaint), then every key the image records
with the kind it must be, the keys all images share (:data:`SHARED_FIELDS`) and the family's own
(``Family.metadata_fields``), then the recorded numbers against the ranges the options have. A
problem is one line naming the key (``loras[0].scale must be a finite number, got "x"``). Keys this
version does not know are left alone, so an image of a newer version still reads.

No key records a local path: inputs are recorded by file name and sha256 (:data:`FILE_RECORD`),
the model by its name (a repo id or a folder's name) with its fingerprint. Images written before
that may hold a path under ``model`` and ``references``; those still read.
"""

from __future__ import annotations

from pathlib import Path

from hidream_mlx.families import family_named
from hidream_mlx.family import RANGES, RECIPE_NUMBERS, Family, RequestError, option_flag
from hidream_mlx.images import (FILE_NAME, FILE_RECORD, FLAG, NUMBER, SCALAR, SHA256, TEXT, WHOLE, ListOf, Record,
                                one_of, optional, read_metadata, shown)
from hidream_mlx.quant.recipes import SUPPORTED_BITS
from hidream_mlx.weights.lora_specs import MAX_LORA_SCALE
from hidream_mlx.weights.precision import PRECISIONS

LEGACY_FAMILY = "o1"  # images from before families were recorded are HiDream-O1's

LORA_RECORD = Record({"name": FILE_NAME, "sha256": SHA256, "scale": NUMBER, "modules": WHOLE, "layout": TEXT},
                     required=("name", "sha256"), what='an object with "name", "sha256" and "scale"',
                     plural='objects with "name", "sha256" and "scale"')
RECIPE_SETTINGS = Record({**{name: optional(NUMBER) for name in RECIPE_NUMBERS}, "steps": optional(WHOLE)},
                         rest=SCALAR, what="an object of recipe settings")

# The keys every family's images record (or may), with the kind each value must be.
SHARED_FIELDS: dict = {
    "prompt": TEXT, "negative_prompt": optional(TEXT), "seed": WHOLE, "family": TEXT,
    "width": WHOLE, "height": WHOLE, "recipe": TEXT, "official_recipe": FLAG, "steps": WHOLE, "guidance": NUMBER,
    "recipe_settings": RECIPE_SETTINGS,
    # The model: its name (a repo id or a folder's name; a path in older images) and identity.
    "model": TEXT, "model_name": TEXT, "model_fingerprint": TEXT, "model_revision": TEXT, "converted_from": TEXT,
    "dtype": one_of(*PRECISIONS), "quantization": optional(Record({})),
    "quantize_bits": optional(one_of(*SUPPORTED_BITS)), "tool_version": TEXT,
    # Inputs: by name and sha256 (``references`` is the older list of names, or paths).
    "references": ListOf(TEXT), "reference_files": ListOf(FILE_RECORD), "loras": ListOf(LORA_RECORD),
    "init_image": FILE_RECORD, "mask": FILE_RECORD, "strength": NUMBER, "mask_blur": WHOLE, "steps_run": WHOLE,
    "eval_variant": TEXT, "eval_id": TEXT,
}
REQUIRED = ("prompt", "seed")  # what every reader needs (a re-run needs both; info shows both)


def image_family(meta: dict, where: str = "the image") -> Family:
    """The family that made the image ``meta`` describes; one line when this version does not know it."""
    name = meta.get("family", LEGACY_FAMILY)
    if not isinstance(name, str):
        raise RequestError(f"{where}: hidream-mlx metadata: family must be text, got {shown(name)}")
    try:
        return family_named(name)
    except ValueError:
        raise RequestError(f"{where}: made by a model family this version does not know ({shown(name)}); an "
                           "update of hidream-mlx may know it") from None


def check_image_metadata(meta, where: str = "the image") -> Family:
    """Refuse (one line naming the key) a stored object any reader would trip on; its family."""
    if not isinstance(meta, dict):
        raise RequestError(f"{where}: its hidream-mlx metadata is {shown(meta)}, not the JSON object hidream-mlx "
                           "writes")
    family = image_family(meta, where)
    problem = Record({**SHARED_FIELDS, **family.metadata_fields}, required=REQUIRED).problem(meta, "")
    if problem is None:
        problem = out_of_range(meta)
    if problem:
        raise RequestError(f"{where}: hidream-mlx metadata: {problem}")
    return family


def out_of_range(meta: dict):
    """The first recorded number outside its option's range (a re-run would refuse it by flag name)."""
    settings = meta.get("recipe_settings") or {}
    for name, valid in RANGES.items():
        for at, value in ((name, meta.get(name)), (f"recipe_settings.{name}", settings.get(name))):
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not valid.contains(value):
                return f"{at} must be {valid.text()} (as {option_flag(name)}), got {value}"
    for i, lora in enumerate(meta.get("loras") or ()):
        if abs(lora.get("scale", 1.0)) > MAX_LORA_SCALE:
            return f"loras[{i}].scale must be >= {-MAX_LORA_SCALE:g} and <= {MAX_LORA_SCALE:g}, got {lora['scale']:g}"
    return None


def read_image_metadata(path: Path | str) -> tuple[dict, Family]:
    """The checked ``hidream-mlx`` object of an image we wrote, and the family that made it."""
    meta = read_metadata(path)
    return meta, check_image_metadata(meta, str(path))
