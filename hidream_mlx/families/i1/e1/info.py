"""What ``info --model`` says about a HiDream-E1 model: what an edit reads (the E1 transformer or
checkpoint, the base's encoders and VAE), the transformer's size at each precision and every
phase's predicted peak for a request, from safetensors headers and configs alone."""

from __future__ import annotations

from typing import Optional

from hidream_mlx.families.i1.e1.memory import adapter_bytes, edit_memory, edit_phase_peaks
from hidream_mlx.families.i1.e1.recipes import get_e1_recipe
from hidream_mlx.families.i1.e1.sizes import BUDGET, edit_max_seq, resize_plan
from hidream_mlx.families.i1.e1.source import E1Source
from hidream_mlx.families.i1.info import phase_table
from hidream_mlx.families.i1.memory import ENCODERS, LEVELS, QUANTIZABLE_ENCODERS
from hidream_mlx.families.i1.text_encoding import DEFAULT_MAX_SEQUENCE_LENGTH
from hidream_mlx.family import RequestError, check_number
from hidream_mlx.memory import format_bytes
from hidream_mlx.quant.recipes import DEFAULT_GROUP_SIZE

PHASES = (("encode (largest encoder: {})", lambda p: p.encode), ("source (VAE encode)", lambda p: p.source),
          ("transformer load", lambda p: p.load), ("sample (load included)", lambda p: p.sample),
          ("VAE decode", lambda p: p.decode), ("whole run (largest phase)", lambda p: p.whole))


def e1_info_lines(model_arg: str, base: Optional[str], llama: Optional[str], dtype: str, dtype_bytes: int,
                  width: Optional[int], height: Optional[int], guidance: Optional[float]) -> list[str]:
    """The E1 report for an edit at ``width`` x ``height`` (E1.1's budget, E1-Full's exact size;
    default the recipe's) of a source of that aspect."""
    source = E1Source.resolve(model_arg, base, llama=llama, allow_download=False)
    recipe = get_e1_recipe(source.variant)
    width, height = width or recipe.width, height or recipe.height
    for name, value in (("width", width), ("height", height)):
        check_number(name, value)
    if guidance is not None:
        check_number("guidance", guidance)
        recipe = recipe.with_overrides(guidance=guidance)
    try:
        edited = resize_plan(recipe.size_rule, (width, height), width, height).size
    except ValueError as e:
        raise RequestError(str(e)) from None
    memory = edit_memory(source)
    t = source.transformer
    floats = "bf16" if dtype_bytes == 2 else dtype
    levels = [(floats if bits is None else name, bits) for name, bits in LEVELS]
    lines = [f"model: {source.name} (HiDream-E1, recipe {recipe.name}) on the base {source.base_name} "
             f"({source.llama.describe()})",
             f"an edit reads: {source.requirements()}",
             f"transformer: {t.num_layers} double + {t.num_single_layers} single blocks, {t.num_attention_heads} "
             f"heads x {t.attention_head_dim} = {t.inner_dim} wide, {t.num_routed_experts} routed experts "
             f"({t.num_activated_experts} active)",
             "transformer weights (computed from the safetensors headers; Q8/Q4: quant.plans' I1 layers, group "
             f"{DEFAULT_GROUP_SIZE}, scales and biases in {dtype}):"]
    transformer = memory.weights["transformer"]
    for name, bits in levels:
        size = transformer.size(bits, dtype_bytes)
        label = f"stored {source.quantization.get('bits')}-bit" if source.quantization else name
        lines.append(f"  {label:<8} {size.parameters:>16,} params  {format_bytes(size.nbytes):>10}")
        if source.quantization:
            break
    lora = adapter_bytes(source, dtype_bytes)
    if lora:
        lines.append(f"  + E1-Full's LoRA side paths (ranks {', '.join(map(str, source.e1_full.ranks))}): "
                     f"{format_bytes(lora)} in {floats}")
    parts = []
    for name in ENCODERS + ("vae",):
        sizes = [format_bytes(memory.component_bytes(name, bits, dtype_bytes)) for _, bits in levels]
        parts.append(f"{name} {sizes[0]}" + (f" (Q8 {sizes[1]}, Q4 {sizes[2]})" if name in QUANTIZABLE_ENCODERS
                                               else ""))
    lines.append(f"base components ({floats}; T5 and Llama quantizable with --encoder-bits): " + " | ".join(parts))
    rule = (f"the source's aspect kept within a {width}x{height} pixel budget" if recipe.size_rule == BUDGET
            else f"the source resized to exactly {width}x{height}")
    max_seq = edit_max_seq(width, height, source.pixels_per_token)
    rows = f"CFG: batch 3 over {max_seq} tokens" if recipe.uses_cfg else f"1 row of {max_seq} tokens"
    lines.append(f"request: {rule} (a source of that aspect is edited at {edited[0]}x{edited[1]}); guidance "
                 f"{recipe.guidance:g}, image guidance {recipe.image_guidance:g} ({rows}: the noise beside the "
                 f"source, padded to max_seq), {DEFAULT_MAX_SEQUENCE_LENGTH} tokens per text encoder")
    texts = 3 if recipe.name == "e1-full" else 2

    def peaks(bits, fused):
        return edit_phase_peaks(source, recipe, width, height, edited, bits, bits, dtype_bytes, fused, texts,
                                memory=memory)

    table = {fused: [peaks(bits, fused) for _, bits in levels] for fused in (True, False)}
    return lines + phase_table(levels, table, floats, PHASES,
                               " (generate checks this before loading; --force runs anyway)")
