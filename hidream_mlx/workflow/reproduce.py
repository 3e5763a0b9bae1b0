"""Images that carry their recipe: what an output records, and the settings it gives back.

Every output's ``hidream-mlx`` object keeps the historical top-level keys (``prompt``, ``seed``,
``recipe`` as a name, ``steps``, ``guidance``, ``width``, ``height``, ...) and adds what a re-run
needs without any local path: references and LoRAs by file name and sha256, the model by its name
(a repo id, or a local folder's name) with its hub revision or a fingerprint of its config and
index, the dtype and ``-q`` bits. Every reader checks the object first (``workflow/metadata.py``).

``--from-image`` loads a recorded repo id as ``--model`` does (the cache, else the hub); a model
recorded by a folder's name needs ``--model`` (the image says which name and fingerprint), and so
does a model of another family than the image's. Images from before names were recorded hold a
path, which is used when it is still there.

``--from-image`` precedence: flags on the command line (and what a ``--preset`` given there
sets) > the image's settings > recipe defaults. Only settings the target recipe reads are
re-applied; with another recipe than the recorded one, the recorded recipe numbers are dropped.

A HiDream-I1 image (``"family": "i1"``) records its own settings: both seeds, the shift rule
(``mu_shift``: Full's official exp(mu) second shift, re-applied by leaving ``--shift`` out), the
Llama it was encoded with and the encoders' bits; O1-only options are never given back for it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

from hidream_mlx.files import sha256_file
from hidream_mlx.families import family_named
from hidream_mlx.family import RECIPE_NUMBERS, RequestError
from hidream_mlx.workflow.metadata import check_image_metadata, image_family, read_image_metadata

# What a --preset decides: the image's values for these give way to it.
PRESET_DECIDES = ("width", "height", "steps", "guidance")


def recorded_settings(meta: dict, where: str = "the image") -> dict:
    """Option values (named like the CLI's, underscores) that re-create the image in ``meta``."""
    return check_image_metadata(meta, where).recorded_settings(meta)


def merge_settings(recorded: dict, explicit: dict, target_recipe: Optional[str], family: str = "o1") -> dict:
    """``explicit`` (the command line's own values) over ``recorded`` (the image's).

    ``target_recipe``: the recipe that will run (the command line's, else the recorded one).
    A command-line --preset drops the recorded size and effort so the preset's win.
    ``family``: the image's; O1's rules on which recipe reads which option apply to O1 only.
    """
    merged = dict(recorded)
    if explicit.get("preset"):
        for key in PRESET_DECIDES:
            merged.pop(key, None)
        merged.pop("no_snap", None)
    if target_recipe and target_recipe != recorded.get("recipe"):
        for key in RECIPE_NUMBERS:
            merged.pop(key, None)
    owner = family_named(family)
    for name, users in owner.recipe_options.items():
        if target_recipe in owner.recipes and target_recipe not in users:
            merged.pop(name, None)
    if explicit.get("width") is not None or explicit.get("height") is not None:
        merged.pop("no_snap", None)
        merged.pop("width", None)
        merged.pop("height", None)
    merged.update(explicit)
    return merged


def find_references(meta: dict, image: Path, given: tuple, note: Callable[[str], None]) -> tuple[str, ...]:
    """The reference paths to re-run with: ``given`` (--ref), else the recorded names beside the image."""
    recorded = meta.get("reference_files") or [{"name": Path(p).name} for p in meta.get("references") or ()]
    if given or not recorded:
        for ref, entry in zip(given, recorded):
            if entry.get("sha256") and Path(ref).is_file() and sha256_file(ref) != entry["sha256"]:
                note(f"warning: {ref} differs from the recorded reference {entry['name']} (sha256)")
        return tuple(str(g) for g in given)
    found, missing = [], []
    for entry in recorded:
        candidate = image.parent / entry["name"]
        if candidate.is_file() and (not entry.get("sha256") or sha256_file(candidate) == entry["sha256"]):
            found.append(str(candidate))
        else:
            missing.append(entry["name"])
    if missing:
        raise RequestError(f"{image}: made with reference image(s) {', '.join(missing)}, not found beside it "
                           f"with the recorded content; give them again with --ref")
    note(f"references found beside the image: {', '.join(found)}")
    return tuple(found)


START_FILES = (("init_image", "--init-image", "init image"), ("mask", "--mask", "mask"))


def find_start_files(meta: dict, image: Path, given: dict, note: Callable[[str], None]) -> dict:
    """``{"init_image": path, "mask": path}`` to re-run an image made from a start image: each file
    given again on the command line (``given``, by option name) must have the recorded content; one
    not given is looked for beside the image by its recorded name. A missing or different file is
    refused naming it. Files the image does not record pass through as given (a new start image)."""
    found, notes = {}, []
    for key, flag, what in START_FILES:
        entry, path = meta.get(key), given.get(key)
        if not isinstance(entry, dict) or "name" not in entry:
            found[key] = path
            continue
        if path is not None:
            if Path(path).is_file() and entry.get("sha256") and sha256_file(path) != entry["sha256"]:
                raise RequestError(f"{flag} {path} differs from the {what} {entry['name']} that {image} was made "
                                   f"from (sha256); give that file, or leave out --from-image to start afresh")
            found[key] = path  # a path that is no file is refused, naming it, by the request builder
            continue
        candidate = image.parent / entry["name"]
        if not candidate.is_file() or (entry.get("sha256") and sha256_file(candidate) != entry["sha256"]):
            raise RequestError(f"{image}: made from the {what} {entry['name']}, not found beside it with the "
                               f"recorded content; give it again with {flag}")
        notes.append(f"{what} found beside the image: {candidate}")
        found[key] = str(candidate)
    for line in notes:  # only once every file is found: a refusal stays one line
        note(line)
    return found


def find_loras(meta: dict, image: Path) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """(paths, scales) of the recorded LoRAs, found beside the image by name and sha256."""
    found, missing = [], []
    for entry in meta.get("loras") or ():
        candidate = image.parent / entry["name"]
        if candidate.is_file() and (not entry.get("sha256") or sha256_file(candidate) == entry["sha256"]):
            found.append((str(candidate), float(entry.get("scale", 1.0))))
        else:
            missing.append(entry["name"])
    if missing:
        raise RequestError(f"{image}: made with LoRA(s) {', '.join(missing)}, not found beside it with the "
                           f"recorded content; give them again with --lora and --lora-scale")
    return tuple(p for p, _ in found), tuple(s for _, s in found)


def check_family(meta: dict, family_name: str, model: str, image: Path | str = "the image") -> None:
    """Refuse a model of another family than the image's: its settings mean nothing there."""
    family = image_family(meta, str(image))
    if family_name != family.name:
        raise RequestError(f"{image} was made by a {family.title} model ({recorded_identity(meta)}); {model} is a "
                           f"{family_named(family_name).title} model; give a {family.title} model with --model")


def check_model(meta: dict, source, note: Callable[[str], None], image: Path | str = "the image") -> None:
    """Refuse a model of another family than the image's; warn when the model that will run is not
    the one the image records."""
    check_family(meta, getattr(source, "family", image_family(meta).name), source.name, image)
    recorded = meta.get("model_fingerprint")
    if recorded and source.fingerprint != recorded:
        note(f"warning: model {source.name} (fingerprint {source.fingerprint}) differs from the one "
             f"that made the image ({meta.get('model_name', meta.get('model'))}, {recorded})")


def recorded_identity(meta: dict) -> str:
    """``NAME, fingerprint F`` of the model an image records, for messages."""
    name = meta.get("model_name") or meta.get("model") or "no name recorded"
    fingerprint = meta.get("model_fingerprint")
    return f"{name}, fingerprint {fingerprint}" if fingerprint else name


def is_recorded_path(value: str) -> bool:
    """A path an older image recorded (``/models/o1``, ``~/m``, ``../m``, ``a/b/c``): a repo id
    has one slash, a folder's name none."""
    return value.startswith(("/", "~", ".")) or value.count("/") > 1 or "\\" in value


def recorded_location(value: str, image: Path | str, flag: str, what: str, meta: dict) -> str:
    """What a recorded model (or Llama) gives ``flag``: an older image's path while it is still
    here, a repo id as it is (the cache, else the hub, as ``flag`` takes it); a folder's name, or
    a path that is gone, is refused in one line asking for ``flag``."""
    fingerprint = meta.get("model_fingerprint") if flag == "--model" else None
    identity = f"{value}, fingerprint {fingerprint}" if fingerprint else value
    if "/" in value or "\\" in value or value.startswith(("~", ".")):
        if Path(value).expanduser().exists():
            return value
        if is_recorded_path(value):
            raise RequestError(f"{image}: the recorded {what} {value} is not on this machine; give {flag} "
                               f"(recorded {identity})")
        return value
    raise RequestError(f"{image}: made with the local {what} {identity}; images record a folder by its name "
                       f"only, so give it with {flag} FOLDER")


def recorded_model(meta: dict, image: Path) -> str:
    """The ``--model`` an image re-runs with when none is given (:func:`recorded_location`)."""
    model = meta.get("model")
    if not model:
        raise RequestError(f"{image}: no model recorded; give --model")
    return recorded_location(model, image, "--model", "model", meta)


def start_lines(meta: dict) -> list[str]:
    """``info IMAGE``'s lines for an image made from a start image (and a mask)."""
    start, mask = meta.get("init_image"), meta.get("mask")
    if not isinstance(start, dict):
        return []
    lines = [f"  init image {start.get('name')} sha256 {str(start.get('sha256'))[:16]} | strength "
             f"{meta.get('strength')} ({meta.get('steps_run')} of {meta.get('steps')} steps ran)"]
    if isinstance(mask, dict):
        lines.append(f"  mask {mask.get('name')} sha256 {str(mask.get('sha256'))[:16]} | blur {meta.get('mask_blur')} px")
    return lines


def describe_image(path: Path | str, as_json: bool = False) -> str:
    """``hidream-mlx info IMAGE``: the recipe in readable lines, or the stored object as JSON."""
    meta, family = read_image_metadata(path)
    if as_json:
        return json.dumps(meta, indent=2, sort_keys=True)
    rec = meta.get("recipe_settings") or {}
    lines = [f"{path}: made by hidream-mlx {meta.get('tool_version', '?')}",
             f"  prompt: {meta.get('prompt')!r}"]
    if meta.get("negative_prompt") is not None:
        lines.append(f"  negative prompt: {meta['negative_prompt']!r}")
    lines += family.describe_image(meta)
    official = "" if meta.get("official_recipe", True) else " (modified)"
    numbers = ", ".join(f"{k} {rec.get(k, meta.get(k))}" for k in RECIPE_NUMBERS if k in rec or k in meta)
    lines.append(f"  recipe {meta.get('recipe')}{official}: {numbers}")
    model = meta.get("model_name") or meta.get("model")
    ident = meta.get("model_revision") or meta.get("model_fingerprint")
    lines.append(f"  model {model}{f' ({ident})' if ident else ''} | dtype {meta.get('dtype')} | "
                 f"quantization {meta.get('quantization') or 'none'}")
    for entry in meta.get("reference_files") or ():
        lines.append(f"  reference {entry['name']} sha256 {entry['sha256'][:16]}")
    lines += start_lines(meta)
    if meta.get("layout"):
        lines.append(f"  layout {meta['layout']}")
    for key in ("blend_seams", "seam_smoothing"):
        if meta.get(key):
            lines.append(f"  {key.replace('_', ' ')} {meta[key]}")
    return "\n".join(lines)
