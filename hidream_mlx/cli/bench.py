"""``hidream-mlx bench``: time denoising steps on random weights, or load a model and report its peak.

A plain click command; ``cli/__init__.py`` registers it. The step benchmark is the chosen family's
(``Family.bench``: O1's decoder with its prefix cache, or I1's transformer and routed layer);
``--load-only`` is the harness's. User errors are raised as ValueError (and the loader's
ModelLoadError), which the CLI group turns into one line.
"""

from __future__ import annotations

import click
from click.core import ParameterSource

from hidream_mlx.families import family_named, registered
from hidream_mlx.harness.bench import load_line, run_load
from hidream_mlx.quant.recipes import SUPPORTED_BITS
from hidream_mlx.weights.precision import PRECISIONS

DTYPE_CHOICES = list(PRECISIONS)
BENCH_FAMILIES = [family.name for family in registered() if family.random_dims]
DIMS = sorted({dims for family in registered() for dims in family.random_dims})


@click.command("bench")
@click.option("--family", type=click.Choice(BENCH_FAMILIES), default="o1", show_default=True,
              help="Whose random-weight architecture to time (i1: tiny or mid dims only).")
@click.option("--dims", type=click.Choice(DIMS), default="mid", show_default=True,
              help="Architecture of the random-weight model (real = HiDream-O1's decoder).")
@click.option("--layers", type=int, default=None, help="O1: decoder layers (default: the dims' own).")
@click.option("-q", "--quantize", "bits", type=click.Choice([str(b) for b in SUPPORTED_BITS]), default=None,
              help="Quantize the linears (slow on CPU: quantized matmul has no fast CPU kernel).")
@click.option("--size", type=int, default=None, help="Square image side in pixels [default: 512; i1: 1024, the "
              "area every I1 request is rendered at].")
@click.option("--steps", type=int, default=3, show_default=True, help="Timed steps per run.")
@click.option("--guidance", type=float, default=1.0, show_default=True, help="> 1 adds the unconditional pass.")
@click.option("--compare-naive", is_flag=True, help="O1: also time the uncached full-sequence path; ratio printed last.")
@click.option("--compare-cfg", is_flag=True,
              help="O1, with --guidance > 1: also time the other CFG mode (batched/sequential).")
@click.option("--repeats", type=int, default=3, show_default=True,
              help="Runs of --steps steps per variant (i1: and 5 timed calls of each layer per repeat).")
@click.option("--prompt-tokens", type=int, default=100, show_default=True,
              help="O1: length T of the synthetic prompt (with boi and tms).")
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default=None,
              help="Default float32 (MLX's CPU bf16 matmul is ~15x slower); bfloat16 with --load-only, as generate.")
@click.option("--load-only", is_flag=True, help="Only load --model as text-to-image generate does; print time and peak RSS.")
@click.option("--model", "model_arg", default=None, help="With --load-only: model folder or Hugging Face repo id.")
def bench(family, dims, layers, bits, size, steps, guidance, compare_naive, compare_cfg, repeats, prompt_tokens,
          dtype, load_only, model_arg):
    """Time denoising steps on random weights (no download): s/step, tokens, peak memory.

    Every time is a median with the min and max of the same samples beside it.
    With --family i1: HiDream-I1 steps, then its routed MoE layer against a dense SwiGLU of the
    same active width, interleaved; printed last: `moe <a> ms (min / max), dense <b> ms (min /
    max), ratio <a/b>`.
    With --load-only --model PATH: load the folder (as text-to-image generate does) and print, last,
    `load <seconds> s, peak RSS <x> GiB, weights <y> GiB` (peak RSS: the process high-water mark).
    """
    if load_only != (model_arg is not None):
        raise ValueError("--load-only and --model go together")
    if load_only:
        result = run_load(model_arg, int(bits) if bits else None, dtype or "bfloat16")
        if result.quantization:
            click.echo(f"quantization: {result.quantization.get('bits')} bits, group size "
                       f"{result.quantization.get('group_size')}", err=True)
        click.echo(load_line(result))
        return
    given_tokens = click.get_current_context().get_parameter_source("prompt_tokens") != ParameterSource.DEFAULT
    options = {"dims": dims, "layers": layers, "bits": int(bits) if bits else None, "size": size, "steps": steps,
               "guidance": guidance, "prompt_tokens": prompt_tokens if given_tokens else None, "repeats": repeats,
               "dtype": dtype or "float32", "compare_naive": compare_naive, "compare_cfg": compare_cfg}
    click.echo("\n".join(family_named(family).bench(options, log=lambda line: click.echo(line, err=True))))
