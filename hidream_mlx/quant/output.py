"""Where a conversion may write, and how it lands there without touching anything of the user's.

Nothing of the user's is ever deleted: the output may not be, contain or lie inside the
source, and ``overwrite`` replaces only a folder a previous conversion wrote (it says so and it
holds nothing else), after the new one is complete. A conversion is built in a sibling
``.NAME.XXXX.partial`` folder carrying a marker file and renamed into place at the end;
temporary folders left by a killed run are removed by the next run on the same target.

Two layouts are ours: an O1 folder (config.json with our ``quantization`` and
``hidream.quantize_recipe`` entries, only the files the O1 converter writes) and an I1 pipeline
folder (``model_index.json`` at the top; ``transformer/config.json`` carries the same entries
plus ``hidream.files``, every file the conversion wrote, and nothing else is in the folder).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

from hidream_mlx.files import check_name_length

PARTIAL_MARKER = ".hidream-quantize-partial"  # inside a temporary folder: safe to delete
REPORT_FILE = "quantization_report.md"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "added_tokens.json",
                   "special_tokens_map.json", "chat_template.jinja", "chat_template.json",
                   "preprocessor_config.json", "video_preprocessor_config.json")
PIPELINE_INDEX = "model_index.json"


def within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _our_config(path: Path) -> dict | None:
    """A config.json our converter wrote (quantization and hidream.quantize_recipe), else None."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (isinstance(config, dict) and isinstance(config.get("quantization"), dict)
            and isinstance(config.get("hidream"), dict) and "quantize_recipe" in config["hidream"]):
        return config
    return None


def _is_o1_output(folder: Path) -> bool:
    if _our_config(folder / "config.json") is None:
        return False
    ours = {"config.json", "model.safetensors.index.json", REPORT_FILE, PARTIAL_MARKER, *TOKENIZER_FILES}
    for entry in folder.iterdir():
        if entry.is_symlink() or not entry.is_file():
            return False
        if entry.name not in ours and not (entry.name.startswith("model-") and entry.name.endswith(".safetensors")):
            return False
    return True


def _is_i1_output(folder: Path) -> bool:
    config = _our_config(folder / "transformer" / "config.json")
    files = config["hidream"].get("files") if config else None
    if not isinstance(files, list):
        return False
    ours = {*files, PARTIAL_MARKER, REPORT_FILE}
    for root, dirs, names in os.walk(folder):
        base = Path(root)
        if any((base / d).is_symlink() for d in dirs):
            return False
        for name in names:
            entry = base / name
            if entry.is_symlink() or not entry.is_file() or entry.relative_to(folder).as_posix() not in ours:
                return False
    return True


def is_conversion_output(folder: Path) -> bool:
    """True for a folder ``hidream-mlx quantize`` wrote and nobody added to (either family)."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    if (folder / PIPELINE_INDEX).is_file():
        return _is_i1_output(folder)
    return _is_o1_output(folder)


def check_output(output: Path, source: Path, overwrite: bool) -> None:
    """Refuse an output that would touch the source (a folder or a single file) or replace
    anything but a previous conversion."""
    out, src = output.resolve(), source.resolve()
    if within(out, src) or within(src, out):
        raise ValueError(f"{output}: the output may not be, contain or lie inside the source model ({src})")
    # The conversion is built under a temporary name first (make_temp): refused now, not after the work.
    check_name_length(output, output.parent, temp_name(output, "0" * 8, "partial"),
                      "the temporary name .NAME.XXXXXXXX.partial")
    if not (output.exists() or output.is_symlink()):
        return
    if not overwrite:
        raise FileExistsError(f"{output}: already exists (use --overwrite to replace a folder that "
                              f"hidream-mlx quantize wrote)")
    if not is_conversion_output(output):
        raise FileExistsError(f"{output}: --overwrite replaces only a folder written by hidream-mlx quantize; "
                              f"this one is not (or holds other files), so nothing was touched")


def temp_name(output: Path, token: str, kind: str) -> str:
    return f".{output.name}.{token}.{kind}"


def make_temp(output: Path, kind: str) -> Path:
    """A sibling ``.NAME.XXXX.partial`` folder with the marker inside, created with the umask's
    ordinary permissions (mkdtemp's 0700 would become the output's mode after the rename)."""
    tmp = output.parent / temp_name(output, secrets.token_hex(4), kind)
    os.mkdir(tmp)
    (tmp / PARTIAL_MARKER).write_text("a hidream-mlx quantize run in progress or killed\n")
    return tmp


def clean_leftovers(output: Path) -> list[Path]:
    """Remove temporary folders a killed run on ``output`` left behind (recognised by the marker)."""
    removed = []
    for entry in output.parent.glob(f".{output.name}.*.partial"):
        if entry.is_dir() and not entry.is_symlink() and ((entry / PARTIAL_MARKER).is_file()
                                                          or is_conversion_output(entry)):
            shutil.rmtree(entry)
            removed.append(entry)
    return removed


def move_into_place(tmp: Path, output: Path, overwrite: bool) -> None:
    if not (output.exists() or output.is_symlink()):
        tmp.rename(output)
        (output / PARTIAL_MARKER).unlink()
        return
    if not overwrite or not is_conversion_output(output):
        raise FileExistsError(f"{output}: appeared while converting; not replaced")
    # The old folder moves aside (marked, so a kill here leaves nothing unrecognised) and is
    # removed only once the new one is in place.
    old = output.parent / f".{output.name}.{secrets.token_hex(4)}.partial"
    output.rename(old)
    try:
        (old / PARTIAL_MARKER).write_text("the folder being replaced\n")
        tmp.rename(output)
    except BaseException:
        (old / PARTIAL_MARKER).unlink(missing_ok=True)
        old.rename(output)
        raise
    (output / PARTIAL_MARKER).unlink()
    shutil.rmtree(old)
