"""What an edited image records about its request: enough to run the edit again.

The historical top-level keys every output has (``prompt``, ``seed``, ``width``, ``height``,
``recipe``, ``steps``, ``guidance``, ...) plus the editing settings, the size that was edited
and the source: its file name and sha256 (never a local path) under ``reference_files`` as O1
references are recorded, and its size. ``width``/``height`` are the request's (the budget for E1.1, the exact size for
E1-Full); ``edited_size`` is what the rule made of the source.
"""

from __future__ import annotations

from pathlib import Path

from hidream_mlx.families.i1.edit_recipes import FAMILY, E1Recipe, effective_negative, target_prompt
from hidream_mlx.families.i1.edit_sizes import ResizePlan, edit_max_seq
from hidream_mlx.files import sha256_file


def source_record(path: Path | str) -> dict:
    """The source image as an output records it: the ``reference_files`` entry O1 references have."""
    path = Path(path)
    return {"name": path.name, "sha256": sha256_file(path)}


def request_metadata(request, plan: ResizePlan, source) -> dict:
    """``Request.metadata`` for an edit (``source``: the :class:`~.edit_source.E1Source` that ran)."""
    rec: E1Recipe = request.recipe
    negative = effective_negative(rec, request.negative_prompt)
    meta = {
        "family": FAMILY,
        "prompt": request.prompt,
        "seed": request.seed,
        "noise": request.noise,
        "width": request.width,
        "height": request.height,
        "edited_size": list(plan.size),
        "recipe": rec.name,
        "official_recipe": rec.official and negative == rec.negative_prompt,
        "steps": rec.steps,
        "guidance": rec.guidance,
        "image_guidance": rec.image_guidance,
        "refine_strength": rec.refine_strength,
        "clip_cfg_norm": rec.clip_cfg_norm,
        "negative_prompt": negative,
        "max_seq": edit_max_seq(request.width, request.height, source.pixels_per_token),
        "recipe_settings": rec.settings(),
        "reference_files": [source_record(request.references[0])],
        "source_size": list(plan.source),
    }
    target = target_prompt(request.prompt)
    if target != request.prompt:
        meta["target_prompt"] = target
    return meta


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
