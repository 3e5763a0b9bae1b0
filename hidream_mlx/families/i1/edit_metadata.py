"""What an edited image records beyond its request's own ``metadata()``: enough to run it again.

The engine adds what only the run knows: the size the rule made of the source (``edited_size``),
the transformer's ``max_seq``, and the source: its file name and sha256 (never a local path)
under ``reference_files``, as O1 references are recorded, with its size. ``width``/``height``
stay the request's (E1.1's budget, E1-Full's exact size).
"""

from __future__ import annotations

from pathlib import Path

from hidream_mlx.families.i1.edit_sizes import ResizePlan, edit_max_seq
from hidream_mlx.files import sha256_file


def source_record(path: Path | str) -> dict:
    """The source image as an output records it: the ``reference_files`` entry O1 references have."""
    path = Path(path)
    return {"name": path.name, "sha256": sha256_file(path)}


def run_metadata(request, plan: ResizePlan, source) -> dict:
    """The run's part of an edited image's metadata (``source``: the ``E1Source`` that ran)."""
    return {"edited_size": list(plan.size),
            "max_seq": edit_max_seq(request.width, request.height, source.pixels_per_token),
            "reference_files": [source_record(request.source)], "source_size": list(plan.source)}


def recorded_edit_settings(meta: dict) -> dict:
    """Option values (underscored CLI names) that re-create the edit ``meta`` records; the source
    comes back through ``reference_files`` (name and sha256) like an O1 reference."""
    recipe = dict(meta.get("recipe_settings") or {})
    settings = {"prompt": meta["prompt"], "seed": meta["seed"], "recipe": meta.get("recipe"),
                "width": meta.get("width"), "height": meta.get("height"), "noise": meta.get("noise"),
                "negative_prompt": meta.get("negative_prompt"), "dtype": meta.get("dtype"),
                "base": meta.get("base"), "llama": meta.get("llama"),
                "encoder_bits": str(meta["encoder_bits"]) if meta.get("encoder_bits") else None}
    for key in ("steps", "guidance", "image_guidance", "refine_strength", "clip_cfg_norm", "keep_source_size"):
        settings[key] = recipe.get(key, meta.get(key))
    bits = meta.get("quantize_bits")
    settings["quantize_bits"] = str(bits) if bits else None
    return {k: v for k, v in settings.items() if v is not None}
