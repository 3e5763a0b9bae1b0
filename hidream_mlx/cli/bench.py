"""``hidream-mlx bench``: time denoising steps on random weights, or load a model and report its peak.

A plain click command; ``cli/__init__.py`` registers it. User errors are raised as
ValueError (and the loader's ModelLoadError), which the CLI group turns into one line.
"""

from __future__ import annotations

import click
from click.core import ParameterSource

from hidream_mlx.weights.precision import PRECISIONS
from hidream_mlx.quant.recipes import SUPPORTED_BITS
from hidream_mlx.harness.bench import BenchConfig, load_line, report_lines, run_bench, run_load
from hidream_mlx.harness.bench_i1 import I1BenchConfig, report_lines_i1, run_bench_i1

DTYPE_CHOICES = list(PRECISIONS)


@click.command("bench")
@click.option("--family", type=click.Choice(["o1", "i1"]), default="o1", show_default=True,
              help="Which model's random-weight architecture to time (i1: tiny or mid dims only).")
@click.option("--dims", type=click.Choice(["tiny", "mid", "real"]), default="mid", show_default=True,
              help="Architecture of the random-weight model (real = HiDream-O1's decoder).")
@click.option("--layers", type=int, default=None, help="Decoder layers (default: the dims' own).")
@click.option("-q", "--quantize", "bits", type=click.Choice([str(b) for b in SUPPORTED_BITS]), default=None,
              help="Quantize the decoder linears (slow on CPU: quantized matmul has no fast CPU kernel).")
@click.option("--size", type=int, default=None, help="Square image side in pixels [default: 512; i1: 1024, the "
              "area every I1 request is rendered at].")
@click.option("--steps", type=int, default=3, show_default=True, help="Timed steps per run.")
@click.option("--guidance", type=float, default=1.0, show_default=True, help="> 1 adds the unconditional pass.")
@click.option("--compare-naive", is_flag=True, help="Also time the uncached full-sequence path; ratio printed last.")
@click.option("--compare-cfg", is_flag=True, help="With --guidance > 1: also time the other CFG mode (batched/sequential).")
@click.option("--repeats", type=int, default=3, show_default=True,
              help="Runs of --steps steps per variant (i1: and 5 timed calls of each layer per repeat).")
@click.option("--prompt-tokens", type=int, default=100, show_default=True,
              help="Length T of the synthetic prompt (with boi and tms).")
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
    if family == "i1" and not load_only:
        given_tokens = click.get_current_context().get_parameter_source("prompt_tokens") != ParameterSource.DEFAULT
        o1_only = {"--dims real": dims == "real", "--layers": layers is not None, "--compare-naive": compare_naive,
                   "--compare-cfg": compare_cfg, "--prompt-tokens": given_tokens}
        given = [name for name, on in o1_only.items() if on]
        if given:
            raise ValueError(f"{given[0]} is for the O1 bench, not --family i1")
        config = I1BenchConfig(dims=dims, quantize=int(bits) if bits else None, size=size or I1BenchConfig.size,
                               steps=steps, guidance=guidance, repeats=repeats, dtype=dtype or "float32")
        result = run_bench_i1(config, log=lambda line: click.echo(line, err=True))
        click.echo("\n".join(report_lines_i1(result)))
        return
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
    config = BenchConfig(dims=dims, layers=layers, quantize=int(bits) if bits else None, size=size or 512, steps=steps,
                         guidance=guidance, prompt_tokens=prompt_tokens, repeats=repeats, dtype=dtype,
                         compare_naive=compare_naive, compare_cfg=compare_cfg)
    result = run_bench(config, log=lambda line: click.echo(line, err=True))
    click.echo("\n".join(report_lines(result)))
