"""``hidream-mlx quantize``: convert an official checkpoint into a quantized folder.

The click layer only parses and prints; the model's family converts (``Family.convert``: O1
checkpoints with their optional fidelity report, I1 pipelines). User errors are raised as ValueError /
FileExistsError / ModelLoadError for the command group to print as one ``error:`` line.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import click

from hidream_mlx.quant.recipes import (
    BUILTIN_RECIPES,
    DEFAULT_GROUP_SIZE,
    GROUP_SIZES,
    SUPPORTED_BITS,
    QuantRecipe,
    bits_warning,
    get_quant_recipe,
)

from hidream_mlx.families import family_of
from hidream_mlx.memory import format_bytes
from hidream_mlx.quant.output import REPORT_FILE
from hidream_mlx.weights.lora_specs import checked_specs, parse_lora_options


def choose_recipe(name: str | None, recipe_file: Path | None) -> QuantRecipe:
    if name and recipe_file:
        raise ValueError("give --plan or --recipe-file, not both")
    if recipe_file is not None:
        return QuantRecipe.from_file(recipe_file)
    return get_quant_recipe(name or "flat")


def size_table(conversion) -> list[str]:
    width = max(14, *(len(name) for name in conversion.sizes))
    lines = [f"{'component':<{width}} {'parameters':>14} {'size':>12} {'bits/weight':>12}"]
    for name, size in [*conversion.sizes.items(), ("total", conversion.total)]:
        lines.append(f"{name:<{width}} {size.parameters:>14,} {format_bytes(size.nbytes):>12} {size.bits_per_weight:>12.2f}")
    return lines


@click.command("quantize")
@click.option("--model", "model_arg", required=True,
              help="Source: Hugging Face repo id, a folder in the official layout (float32 or bf16 shards), an O1 "
                   "single-file .safetensors, or a HiDream-I1 diffusers pipeline folder.")
@click.option("--bits", type=click.Choice([str(b) for b in SUPPORTED_BITS]), default=None,
              help="Bits for the quantized layers: O1's decoder linears, I1's block linears. Required with the "
                   "flat plan (the default); a plan or recipe file may fix them.")
@click.option("--plan", "--recipe", "recipe_name", type=click.Choice(sorted(BUILTIN_RECIPES)), default=None,
              help="Built-in mixed-precision quantization plan (default: flat). --recipe is the old spelling, "
                   "kept as an alias for one release (on generate, --recipe is the sampling recipe).")
@click.option("--recipe-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="JSON recipe: per-layer overrides, first match wins (see quantize/recipes/).")
@click.option("--group-size", type=click.Choice([str(g) for g in GROUP_SIZES]), default=None,
              help=f"Quantization group size (default: the recipe's, else {DEFAULT_GROUP_SIZE}).")
@click.option("--tokenizer", "tokenizer", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="With an O1 single-file .safetensors: the folder holding the official tokenizer, chat template "
                   "and configs (default: fetched from the official repository, small files only).")
@click.option("--no-vision", is_flag=True, help="Leave the vision tower out (text-to-image only; no editing).")
@click.option("--output", "--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder to create.")
@click.option("--quantize-embeddings", is_flag=True,
              help="Also quantize embed_tokens (vocab x hidden) at the default bits: smallest folder, "
                   "slightly perturbed text features (see --report).")
@click.option("--overwrite", is_flag=True,
              help="Replace --output if it is a folder a previous quantize wrote (nothing else is ever replaced).")
@click.option("--report", is_flag=True,
              help=f"Also measure each layer's output error on real activations ({REPORT_FILE}).")
@click.option("--report-dtype", type=click.Choice(["bfloat16", "float32"]), default="bfloat16", show_default=True,
              help="Precision of the unquantized model that the report runs.")
@click.option("--lora", "loras", multiple=True, metavar="PATH",
              help="Bake this LoRA .safetensors in (merged in float32, then quantized; repeatable, in order).")
@click.option("--lora-scale", "lora_scales", multiple=True, type=float, metavar="S",
              help="Strength of the matching --lora, in order (default 1.0 each).")
def quantize(model_arg, bits, recipe_name, recipe_file, group_size, no_vision, output, quantize_embeddings,
             overwrite, report, report_dtype, loras=(), lora_scales=(), tokenizer=None):
    """Convert a checkpoint to affine-quantized MLX weights (Q4/Q6/Q8 and mixed recipes).

    The output folder loads with no flags: its config.json records mode, bits, group size and
    every per-layer override.
    """
    lora_specs = checked_specs(parse_lora_options(loras, lora_scales))
    recipe = choose_recipe(recipe_name, recipe_file)
    if bits is None and recipe.bits is None:  # refused here, before anything is read or printed
        default = " (the default)" if not recipe_name and not recipe_file else ""
        raise ValueError(f"--bits is required with the {recipe.name} plan{default}: it quantizes every layer to "
                         f"the width you give (--bits {'|'.join(map(str, SUPPORTED_BITS))}); "
                         "q4-selective and q4-down8 set their own")
    if quantize_embeddings:
        recipe = replace(recipe, quantize_embeddings=True)

    def notice(line: str) -> None:
        click.echo(f"note: {line}", err=True)

    def progress(done: int, total: int, name: str) -> None:
        click.echo(f"[{done}/{total}] {'reading ' + name if name else 'writing index and config'}", err=True)

    click.echo(f"converting {model_arg} with recipe {recipe.name} -> {output}", err=True)
    bits, group_size = int(bits) if bits else None, int(group_size) if group_size else None
    options = {"bits": bits, "group_size": group_size, "overwrite": overwrite, "no_vision": no_vision,
               "quantize_embeddings": quantize_embeddings, "report": report, "report_dtype": report_dtype,
               "loras": lora_specs, "tokenizer": tokenizer}
    conversion = family_of(model_arg).convert(model_arg, output, recipe, options, notice, progress)
    for lora in conversion.loras:
        click.echo(f"baked in: {lora.line()}", err=True)
    q = conversion.config["quantization"]
    for width in sorted({q["bits"], *(v["bits"] for v in q.values() if isinstance(v, dict))}):
        if bits_warning(width):
            click.echo(f"warning: {bits_warning(width)}", err=True)
    overrides = sum(1 for k, v in q.items() if k not in ("mode", "bits", "group_size") and v != "bf16")
    click.echo(f"wrote {len(conversion.shards)} shard(s): {q['bits']}-bit, group size {q['group_size']}, "
               f"{overrides} layer override(s); sizes in MiB/GiB (powers of two)")
    for line in size_table(conversion):
        click.echo(line)
    if conversion.report is not None:
        result = conversion.report
        click.echo(f"fidelity ({output / REPORT_FILE}), per layer family:")
        for line in result.family_table()[2:]:
            click.echo(f"  {line}")
        click.echo("worst layers first:")
        for line in result.top(5):
            click.echo(f"  {line}")
    click.echo(str(output))
