"""What an edited image records, and the settings and lines it gives back (``--from-image``,
``info IMAGE``).

The request records itself (:meth:`~.requests.E1Request.metadata`: the instruction, the
recipe, the budget or exact size, the source by file name and sha256 under ``reference_files``
as O1 references are recorded). The run adds what only it knows (:func:`run_metadata`: the edited
size, the transformer's ``max_seq``) and the engine the model (:func:`model_metadata`). No local
path is recorded: the E1 model as the shared ``model`` key plus its name and fingerprint, the base
and a separate Llama by name (a repo id as such, a folder by its own name) with the base's
fingerprint; a re-run finds a local base again through ``--base``.
"""

from __future__ import annotations

from hidream_mlx.families.i1.e1.sizes import ResizePlan, edit_max_seq
from hidream_mlx.weights.source import recorded_name


def run_metadata(request, plan: ResizePlan, source) -> dict:
    """The run's part of an edited image's metadata (``source``: the ``E1Source`` that ran)."""
    return {"edited_size": list(plan.size), "source_size": list(plan.source),
            "max_seq": edit_max_seq(request.width, request.height, source.pixels_per_token)}


def model_metadata(source) -> dict:
    """The E1 model's kind, its base and a separate Llama as an image records them (the model itself
    is the shared schema's ``model``, ``model_name`` and ``model_fingerprint``)."""
    llama = source.llama.given
    return {"e1_model": source.kind, "base": source.base_name, "base_fingerprint": source.base_fingerprint,
            "llama": None if llama is None else recorded_name(llama)}


def recorded_edit_settings(meta: dict) -> dict:
    """Option values (underscored CLI names) that re-create the edit ``meta`` records; the source
    comes back through ``reference_files`` (name and sha256) like an O1 reference, the base and a
    separate Llama by their recorded names (a local folder: give it again with ``--base``/``--llama``)."""
    recipe = dict(meta.get("recipe_settings") or {})
    settings = {"prompt": meta["prompt"], "seed": meta["seed"], "recipe": meta.get("recipe"),
                "width": meta.get("width"), "height": meta.get("height"), "noise": meta.get("noise"),
                "negative_prompt": meta.get("negative_prompt"), "dtype": meta.get("dtype"),
                "base": meta.get("base"), "llama": meta.get("llama"),
                "encoder_bits": str(meta["encoder_bits"]) if meta.get("encoder_bits") else None}
    for key in ("steps", "guidance", "image_guidance", "refine_strength"):
        settings[key] = recipe.get(key, meta.get(key))
    if recipe.get("clip_cfg_norm", meta.get("clip_cfg_norm")) is False:
        settings["no_clip_cfg_norm"] = True
    if recipe.get("keep_source_size"):
        settings["keep_source_size"] = True
    bits = meta.get("quantize_bits")
    settings["quantize_bits"] = str(bits) if bits else None
    return {k: v for k, v in settings.items() if v is not None}


def describe_edit_image(meta: dict) -> list[str]:
    """The E1 lines of ``info IMAGE``."""
    edited, source = meta.get("edited_size") or ["?", "?"], meta.get("source_size") or ["?", "?"]
    refine = meta.get("refine_strength")
    lines = [f"  HiDream-E1 ({meta.get('e1_model')}) on {meta.get('base')} ({meta.get('base_fingerprint')}) | seed "
             f"{meta.get('seed')} | edited {edited[0]}x{edited[1]} from a {source[0]}x{source[1]} source "
             f"(--width/--height {meta.get('width')}x{meta.get('height')})",
             f"  image guidance {meta.get('image_guidance')} | refine strength {refine}"
             f"{' (no refine stage)' if refine == 0 else ''} | CFG norm clip "
             f"{'on' if meta.get('clip_cfg_norm') else 'off'}"]
    if meta.get("target_prompt"):
        lines.append(f"  target description (refine stage): {meta['target_prompt']!r}")
    return lines
