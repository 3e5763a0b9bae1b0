"""What ``hidream-mlx info`` prints: a model's weights per component and the memory a request
needs, for both families, from safetensors headers alone (nothing is loaded, nothing downloaded).

The numbers come from ``memory`` (O1) and ``models.i1.memory`` (I1); this module only checks
the request and lays the lines out. Size limits are checked first: a request that cannot run
gets one error, never memory advice.
"""

from __future__ import annotations

from typing import Optional

from hidream_mlx.memory import (
    ComponentSize,
    checkpoint_sizes,
    format_bytes,
    machine_memory,
    predict_load_peak_bytes,
    predict_peak_bytes,
    skeleton_shapes,
    uses_fused_attention,
    weight_sizes,
    working_set,
)
from hidream_mlx.families.i1.memory import ENCODERS, LEVELS, QUANTIZABLE_ENCODERS, I1Memory, phase_peaks
from hidream_mlx.families.i1.recipes import get_i1_recipe
from hidream_mlx.families.i1.sizes import DEFAULT_SIZE as I1_DEFAULT_SIZE
from hidream_mlx.families.i1.source import I1Source
from hidream_mlx.families.i1.text_encoding import DEFAULT_MAX_SEQUENCE_LENGTH
from hidream_mlx.families.i1.weights import expert_widths
from hidream_mlx.families.o1.synthetic import synthetic_config
from hidream_mlx.weights.source import ModelSource
from hidream_mlx.quant.plans import check_requested_bits
from hidream_mlx.quant.recipes import DEFAULT_GROUP_SIZE
from hidream_mlx.families.o1.recipes import get_recipe, recipe_for_model, uses_cfg
from hidream_mlx.requests import RequestError, check_free_size, check_number

O1_DEFAULT_SIDE = 2048
COMPONENT_ORDER = ["language_model.embed_tokens", "language_model.layers", "language_model.norm",
                   "x_embedder", "t_embedder1", "final_layer2"]


def size_table(sizes: dict[str, ComponentSize], order: list[str] = COMPONENT_ORDER) -> list[str]:
    rank = {name: i for i, name in enumerate(order)}
    items = sorted(sizes.items(), key=lambda item: (rank.get(item[0], len(rank)), item[0]))
    width = max(len(name) for name in sizes)
    return [f"  {name:<{width}}  {size.parameters:>15,} params  {format_bytes(size.nbytes):>10}"
            for name, size in items]


def verdict_line(need: int) -> str:
    have = machine_memory()
    where = "Metal recommended working set" if uses_fused_attention() else "physical RAM"
    verdict = "fits" if need <= have else "does NOT fit (try -q 6 or -q 4, or a smaller size)"
    return f"machine: {format_bytes(have)} ({where}); this request {verdict}"


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
    lines += size_table(loaded)
    lines.append(f"  total: {sum(s.parameters for s in loaded.values()):,} params, {format_bytes(weights)}")
    if skipped:
        lines.append("never loaded for text-to-image (stored size):")
        lines += size_table(skipped)
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
    here = uses_fused_attention()
    lines.append("predicted peak per phase on Metal (computed; the transformer and T5/Llama at each precision, "
                 f"CLIP and the VAE in {floats}){' <- this machine' if here else ''}:")
    lines.append(f"  {'phase':<34}" + "".join(f"{name:>12}" for name, _ in levels))
    rows = (("encode (largest encoder: {})", lambda p: p.encode), ("transformer load", lambda p: p.load),
            ("sample (load included)", lambda p: p.sample), ("VAE decode", lambda p: p.decode),
            ("whole run (largest phase)", lambda p: p.whole))
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
    lines.append(f"machine: {format_bytes(have)} ({where}); this request: {fits}")
    return lines
