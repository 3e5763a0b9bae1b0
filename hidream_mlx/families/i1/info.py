"""What ``info`` says about HiDream-I1: the transformer's size at each precision and every phase's
predicted peak (from safetensors headers alone), and the settings an I1 image carries.
"""

from __future__ import annotations

from typing import Optional

from hidream_mlx.family import check_number, recorded_start_settings, uses_cfg
from hidream_mlx.memory import format_bytes, machine_memory, uses_fused_attention
from hidream_mlx.families.i1.memory import ENCODERS, LEVELS, QUANTIZABLE_ENCODERS, I1Memory, phase_peaks
from hidream_mlx.families.i1.recipes import get_i1_recipe
from hidream_mlx.families.i1.sizes import DEFAULT_SIZE as I1_DEFAULT_SIZE
from hidream_mlx.families.i1.source import I1Source
from hidream_mlx.families.i1.text_encoding import DEFAULT_MAX_SEQUENCE_LENGTH
from hidream_mlx.families.i1.weights import expert_widths
from hidream_mlx.quant.recipes import DEFAULT_GROUP_SIZE


PHASE_ROWS = (("encode (largest encoder: {})", lambda p: p.encode), ("transformer load", lambda p: p.load),
              ("sample (load included)", lambda p: p.sample), ("VAE decode", lambda p: p.decode),
              ("whole run (largest phase)", lambda p: p.whole))


def phase_table(levels, table: dict, floats: str, rows, fit_note: str = "") -> list[str]:
    """The per-phase peaks at each precision (``table``: fused attention or not -> the peaks of each
    of ``levels``), the CPU's whole run, and whether this machine holds each; ``rows``: (label, value)."""
    here = uses_fused_attention()
    lines = ["predicted peak per phase on Metal (computed; the transformer and T5/Llama at each precision, "
             f"CLIP and the VAE in {floats}){' <- this machine' if here else ''}:",
             f"  {'phase':<34}" + "".join(f"{name:>12}" for name, _ in levels)]
    for label, value in rows:
        label = label.format(table[True][0].encode_by)
        lines.append(f"  {label:<34}" + "".join(f"{format_bytes(value(p)):>12}" for p in table[True]))
    cpu = ", ".join(f"{name} {format_bytes(p.whole)} ({p.largest})" for (name, _), p in zip(levels, table[False]))
    lines.append(f"on CPU (attention scores and convolution buffers materialized): whole run {cpu}"
                 f"{'' if here else ' <- this machine'}")
    have = machine_memory()
    fits = ", ".join(f"{name} {'fits' if p.whole <= have else 'does NOT fit'}"
                     for (name, _), p in zip(levels, table[here]))
    where = "Metal recommended working set" if here else "physical RAM"
    lines.append(f"machine: {format_bytes(have)} ({where}); this request: {fits}{fit_note}")
    return lines


def check_i1_size(source: I1Source, width: int, height: int, no_snap: bool) -> tuple[int, int, str]:
    """The size a HiDream-I1 ``generate`` renders for this request (its ranges and size rule)."""
    check_number("width", width)
    check_number("height", height)
    return source.render_size(width, height, not no_snap)


def i1_info_lines(model_arg: str, llama_arg, dtype: str, dtype_bytes: int, width: Optional[int],
                  height: Optional[int], guidance: Optional[float], no_snap: bool = False) -> list[str]:
    """The I1 report: the transformer's size at each precision and every phase's predicted peak."""
    source = I1Source.resolve(model_arg, llama=None if llama_arg is None else str(llama_arg), allow_download=False)
    width, height, size_note = check_i1_size(source, width or I1_DEFAULT_SIZE, height or I1_DEFAULT_SIZE, no_snap)
    guidance = get_i1_recipe(source.variant).guidance if guidance is None else guidance
    check_number("guidance", guidance)
    cfg_pass = uses_cfg(guidance)
    memory = I1Memory.from_source(source)
    t = source.transformer
    transformer = memory.weights["transformer"]
    floats = "bf16" if dtype_bytes == 2 else dtype
    levels = [(floats if bits is None else name, bits) for name, bits in LEVELS]
    stored = source.quantization
    routed, shared, text = expert_widths(transformer.tensors, "transformer")
    lines = [f"model: {source.path} (HiDream-I1 {source.variant}; {source.llama.describe()})",
             f"transformer: {t.num_layers} double + {t.num_single_layers} single blocks, {t.num_attention_heads} "
             f"heads x {t.attention_head_dim} = {t.inner_dim} wide, {t.num_routed_experts} routed experts "
             f"({t.num_activated_experts} active, width {routed}) + 1 shared (width {shared}), text FFN {text}",
             "transformer weights (computed from the safetensors headers; Q8/Q4: quant.plans' I1 layers, group "
             f"{DEFAULT_GROUP_SIZE}, scales and biases in {dtype}):"]
    for name, bits in levels:
        size = transformer.size(bits, dtype_bytes)
        label = f"stored {stored.get('bits')}-bit" if stored else name
        lines.append(f"  {label:<8} {size.parameters:>16,} params  {format_bytes(size.nbytes):>10}  "
                     f"({size.nbytes / 1e9:.1f} GB)")
        if stored:
            break
    kept = memory.kept_in_floats(8, 8)  # the same layers at every width: the group size decides
    for component, paths in kept.items():
        lines.append(f"  Q8/Q4: {component} keeps {len(paths)} layer(s) in floats (group size {DEFAULT_GROUP_SIZE} "
                     f"does not divide their input width): {', '.join(paths)}")
    if not kept:
        lines.append(f"  Q8/Q4: every quantizable layer's input width is divisible by {DEFAULT_GROUP_SIZE} "
                     "(none kept in floats for that reason)")
    parts = []
    for name in ENCODERS + ("vae",):
        sizes = [format_bytes(memory.component_bytes(name, bits, dtype_bytes)) for _, bits in levels]
        parts.append(f"{name} {sizes[0]}" + (f" (Q8 {sizes[1]}, Q4 {sizes[2]})" if name in QUANTIZABLE_ENCODERS
                                               else ""))
    lines.append(f"other components ({floats}; T5 and Llama quantizable with --encoder-bits): " + " | ".join(parts))
    lines.append(f"request: {size_note}, guidance {guidance:g} ({'CFG: batch 2' if cfg_pass else '1 pass'}), "
                 f"{DEFAULT_MAX_SEQUENCE_LENGTH} tokens per text encoder")
    table = {fused: [phase_peaks(memory, bits, bits, width, height, cfg_pass, dtype_bytes, fused)
                     for _, bits in levels] for fused in (True, False)}
    return lines + phase_table(levels, table, floats, PHASE_ROWS)


def recorded_i1_settings(meta: dict) -> dict:
    """Option values (named like the CLI's, underscores) that re-create the I1 image in ``meta``."""
    recipe = dict(meta.get("recipe_settings") or {})
    settings = {"prompt": meta["prompt"], "seed": meta["seed"], "recipe": meta.get("recipe"),
                "width": meta.get("width"), "height": meta.get("height"), "no_snap": True}
    for key in ("steps", "guidance", "shift"):
        settings[key] = recipe.get(key, meta.get(key))
    if recipe.get("mu_shift", meta.get("mu_shift")):
        settings.pop("shift")  # the official exp(mu) second shift is what leaving --shift out gives
    if meta.get("step_noise_seed") not in (None, meta["seed"]):
        settings["step_noise_seed"] = meta["step_noise_seed"]
    settings["negative_prompt"] = meta.get("negative_prompt")
    settings.update(recorded_start_settings(meta))
    settings["dtype"] = meta.get("dtype")
    bits = meta.get("quantize_bits")
    settings["quantize_bits"] = str(bits) if bits else None
    settings["llama"] = meta.get("llama")
    settings["encoder_bits"] = str(meta["encoder_bits"]) if meta.get("encoder_bits") else None
    return {k: v for k, v in settings.items() if v is not None}


def describe_i1_image(meta: dict) -> list[str]:
    return [f"  HiDream-I1 | seed {meta.get('seed')} (step noise {meta.get('step_noise_seed')}) | "
            f"{meta.get('width')}x{meta.get('height')} | second shift {meta.get('second_shift')}"]
