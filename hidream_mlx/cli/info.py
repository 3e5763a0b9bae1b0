"""``hidream-mlx info``: what a model needs, before loading it (or the recipe an image carries).

A thin click layer: the model's family writes the report (``Family.info_lines``); user errors are
ValueErrors, which the CLI group turns into one line.
"""

from __future__ import annotations

from pathlib import Path

import click

from hidream_mlx.families import family_named, family_of
from hidream_mlx.weights.precision import PRECISIONS
from hidream_mlx.quant.recipes import DEFAULT_GROUP_SIZE, SUPPORTED_BITS
from hidream_mlx.workflow.reproduce import describe_image


@click.command("info")
@click.argument("image", required=False, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="With IMAGE: print its stored hidream-mlx object as JSON.")
@click.option("--model", "model_arg", default=None,
              help="Model folder or Hugging Face repo id, HiDream-O1, a HiDream-I1 pipeline or a HiDream-E1 model "
                   "(only headers are read).")
@click.option("--random-weights", "dims", type=click.Choice(family_named("o1").random_dims), default=None,
              help="Describe a random-weight O1 model of these dims instead (as `bench` builds).")
@click.option("--layers", type=int, default=None, help="With --random-weights: number of decoder layers.")
@click.option("-q", "--quantize", "bits", type=click.Choice([str(b) for b in SUPPORTED_BITS]), default=None,
              help=f"O1: size the decoder linears as if quantized at load (group size {DEFAULT_GROUP_SIZE}). "
                   "I1 always shows bf16, Q8 and Q4.")
@click.option("--dtype", type=click.Choice(list(PRECISIONS)), default="bfloat16", show_default=True,
              help="Load dtype of the unquantized weights and the activations.")
@click.option("--width", type=int, default=None,
              help="Image width as rendered (O1: a free size, default 2048; I1: default 1024).")
@click.option("--height", type=int, default=None, help="Image height as rendered (defaults as --width).")
@click.option("--guidance", type=float, default=None,
              help="CFG scale of the request (default: the model's recipe; > 1 adds the uncond pass).")
@click.option("--text-tokens", type=int, default=128, show_default=True,
              help="O1: prompt length assumed for the prefix cache and attention.")
@click.option("--no-snap", is_flag=True, help="I1: the exact size, not rescaled to the official area (O1 sizes are always taken as given).")
@click.option("--llama", "llama_arg", default=None, type=click.Path(path_type=Path),
              help="I1 and E1: Llama-3.1-8B folder when the pipeline has no text_encoder_4/.")
@click.option("--base", default=None, metavar="PATH_OR_ID",
              help="E1: the HiDream-I1-Full pipeline the model edits on [default: HiDream-ai/HiDream-I1-Full, "
                   "from the local cache].")
def info(model_arg, dims, layers, bits, dtype, width, height, guidance, text_tokens, image=None, as_json=False,
         no_snap=False, llama_arg=None, base=None):
    """Parameters and bytes per component, predicted peak memory for a request, and this machine's memory.

    For a HiDream-I1 pipeline: the transformer's size at bf16/Q8/Q4 and each phase's predicted
    peak (encode, sampling, VAE decode) and the whole run's; for a HiDream-E1 model on its --base
    the same for an edit (--width/--height: E1.1's budget, E1-Full's exact size) and what it reads.
    With an IMAGE we wrote: the recipe it carries (``--json``: the stored object itself)."""
    if image is not None:
        if image.is_dir():
            raise ValueError(f"{image} is a folder; IMAGE is an image hidream-mlx wrote. To describe a model, "
                             f"give it with --model: hidream-mlx info --model {image}")
        if not image.is_file():
            raise ValueError(f"{image}: image not found")
        click.echo(describe_image(image, as_json))
        return
    if (model_arg is None) == (dims is None):
        raise ValueError("give exactly one of --model or --random-weights")
    if layers is not None and dims is None:
        raise ValueError("--layers goes with --random-weights")
    family = family_of(model_arg) if model_arg is not None else family_named("o1")
    if base is not None and "base" not in family.load_options:
        raise ValueError(f"--base is for HiDream-E1 models; {model_arg or 'a random-weight model'} is a "
                         f"{family.title} model")
    options = {"dims": dims, "layers": layers, "bits": int(bits) if bits else None, "dtype": dtype, "width": width,
               "height": height, "guidance": guidance, "text_tokens": text_tokens, "no_snap": no_snap,
               "llama": None if llama_arg is None else str(llama_arg), "base": base}
    click.echo("\n".join(family.info_lines(model_arg, options, note=lambda line: click.echo(line, err=True))))
