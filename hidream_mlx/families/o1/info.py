"""What ``info`` says about HiDream-O1: a checkpoint's weights per component and the memory a
request needs (from safetensors headers alone: nothing is loaded, nothing downloaded), and the
settings an O1 image carries (``--from-image``, ``info IMAGE``).
"""

from __future__ import annotations

from typing import Optional

from hidream_mlx.family import RECIPE_NUMBERS, RequestError, check_number, recorded_start_settings, uses_cfg
from hidream_mlx.memory import format_bytes, predict_load_peak_bytes, size_table, uses_fused_attention, verdict_line
from hidream_mlx.families.o1.memory import (checkpoint_sizes, predict_peak_bytes, skeleton_shapes, weight_sizes,
                                            working_set)
from hidream_mlx.families.o1.recipes import get_recipe, recipe_for_model
from hidream_mlx.families.o1.requests import check_free_size
from hidream_mlx.families.o1.source import ModelSource
from hidream_mlx.families.o1.synthetic import synthetic_config
from hidream_mlx.quant.plans import check_requested_bits
from hidream_mlx.quant.recipes import DEFAULT_GROUP_SIZE

O1_DEFAULT_SIDE = 2048
COMPONENT_ORDER = ["language_model.embed_tokens", "language_model.layers", "language_model.norm",
                   "x_embedder", "t_embedder1", "final_layer2"]


def o1_info_lines(model_arg: Optional[str], dims: Optional[str], layers: Optional[int], bits: Optional[int],
                  dtype: str, dtype_bytes: int, width: Optional[int], height: Optional[int],
                  guidance: Optional[float], text_tokens: int, note=lambda line: None) -> list[str]:
    """The O1 report: a checkpoint folder (``model_arg``) or random weights of ``dims``."""
    width, height = width or O1_DEFAULT_SIDE, height or O1_DEFAULT_SIDE
    check_free_size(width, height)
    if text_tokens < 3:
        raise RequestError(f"--text-tokens must be at least 3, got {text_tokens}")
    if dims is not None:
        config = synthetic_config(dims, layers)
        loaded, skipped = weight_sizes(skeleton_shapes(config), dtype_bytes, bits), {}
        title, recipe_guidance = f"random {dims} ({config.text.num_hidden_layers} layers)", 1.0
    else:
        source = ModelSource.resolve(model_arg, allow_download=False)  # info never downloads 33 GB
        config = source.config
        if config.quantization and bits:
            check_requested_bits(config.quantization, bits)  # as generate: another width is refused
            bits = None
        loaded, skipped = checkpoint_sizes(source, dtype_bytes, bits)
        title = str(source.path)
        recipe_guidance = get_recipe(recipe_for_model(source.name, config.hidream)).guidance
    guidance = recipe_guidance if guidance is None else guidance
    check_number("guidance", guidance)
    cfg_pass = uses_cfg(guidance)
    weights = sum(s.nbytes for s in loaded.values())
    t = config.text
    quant = f", decoder linears Q{bits} (group {DEFAULT_GROUP_SIZE}, scales/biases in {dtype})" if bits else ""
    if config.quantization:
        quant = f", stored quantization {config.quantization}"

    lines = [f"model: {title}",
             f"architecture: {t.num_hidden_layers} layers, hidden {t.hidden_size}, heads {t.num_attention_heads}/"
             f"{t.num_key_value_heads} x {t.head_dim}, MLP {t.intermediate_size}, vocab {t.vocab_size}",
             f"weights loaded for text-to-image ({dtype}{quant}):"]
    lines += size_table(loaded, COMPONENT_ORDER)
    lines.append(f"  total: {sum(s.parameters for s in loaded.values()):,} params, {format_bytes(weights)}")
    if skipped:
        lines.append("never loaded for text-to-image (stored size):")
        lines += size_table(skipped, COMPONENT_ORDER)
    lines.append(f"predicted peak while loading: {format_bytes(predict_load_peak_bytes(weights))}")
    lines.append(f"request: {width}x{height}, guidance {guidance:g} ({'2 passes' if cfg_pass else '1 pass'}), "
                 f"{text_tokens} text tokens assumed")
    for fused, where in ((False, "CPU (attention scores materialized)"), (True, "Metal (fused attention)")):
        ws = working_set(t, width, height, text_tokens, cfg_pass, dtype_bytes, fused_attention=fused)
        peak = predict_peak_bytes(weights, t, width, height, cfg_pass, text_tokens, dtype_bytes, fused)
        here = " <- this machine" if fused == uses_fused_attention() else ""
        lines.append(f"predicted peak on {where}: {format_bytes(peak)} (working set {format_bytes(ws.total)}: "
                     f"prefix cache {format_bytes(ws.prefix_cache)}, activations {format_bytes(ws.activations)}, "
                     f"scores {format_bytes(ws.attention_scores)}, latents {format_bytes(ws.latents)}){here}")
    lines.append(verdict_line(predict_peak_bytes(weights, t, width, height, cfg_pass, text_tokens, dtype_bytes)))
    return lines


def recorded_o1_settings(meta: dict) -> dict:
    """Option values (named like the CLI's, underscores) that re-create the O1 image in ``meta``."""
    settings = {"prompt": meta["prompt"], "seed": meta["seed"], "recipe": meta.get("recipe"),
                "noise": meta.get("noise", "torch"), "blend_seams": meta.get("blend_seams", 0)}
    recipe = dict(meta.get("recipe_settings") or {})
    for key in RECIPE_NUMBERS:
        if key in recipe:
            settings[key] = recipe[key]
        elif key in meta:
            settings[key] = meta[key]
    if meta.get("keep_aspect"):
        budget = meta.get("keep_aspect_budget", 2048)
        settings.update(width=budget, height=budget, keep_aspect=True)
    else:
        settings.update(width=meta.get("width"), height=meta.get("height"))
    settings["no_snap"] = True  # the recorded size is the one that ran
    if meta.get("layout") is not None:
        settings["layout"] = meta["layout"]
    if len(meta.get("references") or []) == 1 and meta.get("recipe") in ("dev", "dev-2604"):
        # One reference under a Dev recipe ran the flash sampler only with --editing-scheduler flash
        # (flow-match editing records the recipe dev-edit), so the re-render asks for flash again.
        settings["editing_scheduler"] = "flash"
    seams = meta.get("seam_smoothing")
    if isinstance(seams, dict):
        settings.update(seam_smoothing=seams.get("fraction", 0.0), seam_window=seams.get("window", "hann"),
                        seam_strength=seams.get("strength", 1.0))
    if meta.get("negative_prompt") is not None:
        settings["negative_prompt"] = meta["negative_prompt"]
    settings.update(recorded_start_settings(meta))
    settings["dtype"] = meta.get("dtype")
    bits = meta.get("quantize_bits")
    settings["quantize_bits"] = str(bits) if bits else None
    return {k: v for k, v in settings.items() if v is not None}


def describe_o1_image(meta: dict) -> list[str]:
    return [f"  seed {meta.get('seed')} | {meta.get('width')}x{meta.get('height')} | noise {meta.get('noise')}"]
