"""``hidream-mlx info`` (what a model needs, before loading it) and ``hidream-mlx bench``.

Both are plain click commands; ``cli.py`` registers them. User errors are raised as
ValueError (and the loader's ModelLoadError), which the CLI group turns into one line.
"""

from __future__ import annotations

from pathlib import Path

import click

from hidream_mlx.models.precision import PRECISIONS, parse_dtype

from hidream_mlx.quant.recipes import SUPPORTED_BITS
from hidream_mlx.recipes import uses_cfg

DTYPE_CHOICES = list(PRECISIONS)
COMPONENT_ORDER = ["language_model.embed_tokens", "language_model.layers", "language_model.norm",
                   "x_embedder", "t_embedder1", "final_layer2"]


def _sorted_components(sizes: dict) -> list:
    rank = {name: i for i, name in enumerate(COMPONENT_ORDER)}
    return sorted(sizes.items(), key=lambda item: (rank.get(item[0], len(rank)), item[0]))


def _size_table(sizes: dict) -> list[str]:
    from hidream_mlx.memory import format_bytes

    width = max(len(name) for name in sizes)
    return [f"  {name:<{width}}  {size.parameters:>15,} params  {format_bytes(size.nbytes):>10}"
            for name, size in _sorted_components(sizes)]


@click.command("info")
@click.argument("image", required=False, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="With IMAGE: print its stored hidream-mlx object as JSON.")
@click.option("--model", "model_arg", default=None, help="Model folder or Hugging Face repo id (only headers are read).")
@click.option("--random-weights", "dims", type=click.Choice(["tiny", "mid", "real"]), default=None,
              help="Describe a random-weight model of these dims instead (as `bench` builds).")
@click.option("--layers", type=int, default=None, help="With --random-weights: number of decoder layers.")
@click.option("-q", "--quantize", "bits", type=click.Choice([str(b) for b in SUPPORTED_BITS]), default=None,
              help="Size the decoder linears as if quantized at load (group size 64).")
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default="bfloat16", show_default=True,
              help="Load dtype of the unquantized weights and the activations.")
@click.option("--width", type=int, default=2048, show_default=True)
@click.option("--height", type=int, default=2048, show_default=True)
@click.option("--guidance", type=float, default=None,
              help="CFG scale of the request (default: the model's recipe; > 1 adds the uncond pass).")
@click.option("--text-tokens", type=int, default=128, show_default=True,
              help="Prompt length assumed for the prefix cache and attention.")
def info(model_arg, dims, layers, bits, dtype, width, height, guidance, text_tokens, image=None, as_json=False):
    """Parameters and bytes per component, predicted peak memory for a request, and this machine's memory.

    With an IMAGE we wrote: the recipe it carries (``--json``: the stored object itself)."""
    if image is not None:
        from hidream_mlx.workflow.reproduce import describe_image

        if not image.is_file():
            raise ValueError(f"{image}: image not found")
        click.echo(describe_image(image, as_json))
        return
    from hidream_mlx.memory import (
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

    if (model_arg is None) == (dims is None):
        raise ValueError("give exactly one of --model or --random-weights")
    if layers is not None and dims is None:
        raise ValueError("--layers goes with --random-weights")
    if width < 32 or height < 32 or width % 32 or height % 32:
        raise ValueError(f"--width and --height must be multiples of 32, got {width}x{height}")
    if text_tokens < 3:
        raise ValueError(f"--text-tokens must be at least 3, got {text_tokens}")
    bits = int(bits) if bits else None
    dtype_bytes = parse_dtype(dtype).size

    if dims is not None:
        from hidream_mlx.models.o1.synthetic import synthetic_config

        config = synthetic_config(dims, layers)
        loaded, skipped = weight_sizes(skeleton_shapes(config), dtype_bytes, bits), {}
        title, recipe_guidance = f"random {dims} ({config.text.num_hidden_layers} layers)", 1.0
    else:
        from hidream_mlx.models.source import ModelSource
        from hidream_mlx.recipes import get_recipe, recipe_for_model

        source = ModelSource.resolve(model_arg, allow_download=False)  # info never downloads 33 GB
        path, config = source.path, source.config
        if config.quantization and bits:
            click.echo(f"note: {path} is already quantized ({config.quantization.get('bits')} bits); "
                       f"-q {bits} is ignored", err=True)
            bits = None
        loaded, skipped = checkpoint_sizes(source, dtype_bytes, bits)
        title = str(path)
        recipe_guidance = get_recipe(recipe_for_model(source.name, config.hidream)).guidance
    guidance = recipe_guidance if guidance is None else guidance
    cfg_pass = uses_cfg(guidance)
    weights = sum(s.nbytes for s in loaded.values())
    t = config.text
    quant = f", decoder linears Q{bits} (group 64, scales/biases in {dtype})" if bits else ""
    if config.quantization:
        quant = f", stored quantization {config.quantization}"

    lines = [f"model: {title}",
             f"architecture: {t.num_hidden_layers} layers, hidden {t.hidden_size}, heads {t.num_attention_heads}/"
             f"{t.num_key_value_heads} x {t.head_dim}, MLP {t.intermediate_size}, vocab {t.vocab_size}",
             f"weights loaded for text-to-image ({dtype}{quant}):"]
    lines += _size_table(loaded)
    lines.append(f"  total: {sum(s.parameters for s in loaded.values()):,} params, {format_bytes(weights)}")
    if skipped:
        lines.append("never loaded for text-to-image (stored size):")
        lines += _size_table(skipped)
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
    have = machine_memory()
    need = predict_peak_bytes(weights, t, width, height, cfg_pass, text_tokens, dtype_bytes)
    source = "Metal recommended working set" if uses_fused_attention() else "physical RAM"
    verdict = "fits" if need <= have else "does NOT fit (try -q 6 or -q 4, or a smaller size)"
    lines.append(f"machine: {format_bytes(have)} ({source}); this request {verdict}")
    click.echo("\n".join(lines))


@click.command("bench")
@click.option("--dims", type=click.Choice(["tiny", "mid", "real"]), default="mid", show_default=True,
              help="Architecture of the random-weight model (real = HiDream-O1's decoder).")
@click.option("--layers", type=int, default=None, help="Decoder layers (default: the dims' own).")
@click.option("-q", "--quantize", "bits", type=click.Choice([str(b) for b in SUPPORTED_BITS]), default=None,
              help="Quantize the decoder linears (slow on CPU: quantized matmul has no fast CPU kernel).")
@click.option("--size", type=int, default=512, show_default=True, help="Square image side in pixels.")
@click.option("--steps", type=int, default=3, show_default=True, help="Timed steps per run.")
@click.option("--guidance", type=float, default=1.0, show_default=True, help="> 1 adds the unconditional pass.")
@click.option("--compare-naive", is_flag=True, help="Also time the uncached full-sequence path; ratio printed last.")
@click.option("--compare-cfg", is_flag=True, help="With --guidance > 1: also time the other CFG mode (batched/sequential).")
@click.option("--repeats", type=int, default=3, show_default=True, help="Runs of --steps steps per variant.")
@click.option("--prompt-tokens", type=int, default=100, show_default=True,
              help="Length T of the synthetic prompt (with boi and tms).")
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default=None,
              help="Default float32 (MLX's CPU bf16 matmul is ~15x slower); bfloat16 with --load-only, as generate.")
@click.option("--load-only", is_flag=True, help="Only load --model as text-to-image generate does; print time and peak RSS.")
@click.option("--model", "model_arg", default=None, help="With --load-only: model folder or Hugging Face repo id.")
def bench(dims, layers, bits, size, steps, guidance, compare_naive, compare_cfg, repeats, prompt_tokens, dtype,
          load_only, model_arg):
    """Time denoising steps on random weights (no download): s/step, tokens, peak memory.

    With --load-only --model PATH: load the folder (as text-to-image generate does) and print, last,
    `load <seconds> s, peak RSS <x> GiB, weights <y> GiB` (peak RSS: the process high-water mark).
    """
    from hidream_mlx.harness.bench import BenchConfig, load_line, report_lines, run_bench, run_load

    if load_only != (model_arg is not None):
        raise ValueError("--load-only and --model go together")
    if load_only:
        result = run_load(model_arg, int(bits) if bits else None, dtype or "bfloat16")
        if result.quantization:
            click.echo(f"quantization: {result.quantization.get('bits')} bits, group size "
                       f"{result.quantization.get('group_size')}", err=True)
        click.echo(load_line(result))
        return
    dtype = dtype or "float32"
    config = BenchConfig(dims=dims, layers=layers, quantize=int(bits) if bits else None, size=size, steps=steps,
                         guidance=guidance, prompt_tokens=prompt_tokens, repeats=repeats, dtype=dtype,
                         compare_naive=compare_naive, compare_cfg=compare_cfg)
    result = run_bench(config, log=lambda line: click.echo(line, err=True))
    click.echo("\n".join(report_lines(result)))
