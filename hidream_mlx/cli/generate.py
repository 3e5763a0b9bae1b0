"""``hidream-mlx generate``: images from prompts, one model load for the whole batch.

The model's family (``hidream_mlx.families``) resolves the source, checks the requests, predicts
the memory and loads an engine; this module only parses, prints and writes. A family that loads
phase by phase (HiDream-I1) encodes every prompt in ``engine.prepare`` before its transformer loads.
"""

from __future__ import annotations

from pathlib import Path

import click

from hidream_mlx.cli.render import from_image_settings, given_on_command_line, plan, render, summary
from hidream_mlx.families import family_named, option_choices, recipe_names
from hidream_mlx.family import PRESET_NAMES, SEED_MAX, check_number, range_help
from hidream_mlx.memory import format_bytes
from hidream_mlx.requests import limits_help
from hidream_mlx.weights.lora import lora_memory
from hidream_mlx.weights.lora_specs import MAX_LORA_SCALE, checked_specs, parse_lora_options
from hidream_mlx.weights.precision import PRECISIONS

USED_BY = family_named("o1").recipe_options  # the O1 options that only some of its recipes read

DEFAULT_MODEL = "HiDream-ai/HiDream-O1-Image-Dev"


def steps_text(request) -> str:
    """``28 steps``, or from an image ``8 of 28 steps (strength 0.3)``: how many steps ran."""
    if request.start is None:
        return f"{request.recipe.steps} steps"
    return f"{request.run_steps} of {request.recipe.steps} steps (strength {request.start.strength:g})"


def _print_summary(result, engine) -> None:
    r = result.request
    click.echo(
        f"{r.width}x{r.height} | recipe {r.recipe.name}{'' if r.recipe.official else ' (modified)'} | "
        f"{steps_text(r)} | guidance {r.recipe.guidance:g} | total {result.total_time:.2f} s | "
        f"{result.seconds_per_step:.3f} s/step | peak {format_bytes(result.peak_memory)}{engine.summary(result)}",
        err=True,
    )


@click.command("generate")
@click.option("--model", "model_arg", default=DEFAULT_MODEL, show_default=True,
              help="Hugging Face repo id or local folder (official or quantized layout).")
@click.option("--prompt", default=None,
              help=f"What to draw (required unless --prompt-file or --from-image); {limits_help()}.")
@click.option("--prompt-file", type=click.Path(path_type=Path), default=None,
              help="One prompt per line, or JSONL objects with per-line settings named like these options "
                   "with underscores (\"prompt\", \"seed\", \"steps\", ...).")
@click.option("--negative-prompt", default=None,
              help="Replaces the unconditional prompt (recipes with CFG only); blank means the recipe's own.")
@click.option("--from-image", type=click.Path(path_type=Path), default=None, metavar="IMAGE",
              help="Take every setting from an image we wrote; flags given here (and a --preset's) win.")
@click.option("--output", "-o", default="image.png", show_default=True, type=click.Path(path_type=Path),
              help="Output .png/.jpg/.jpeg/.webp; {seed}, {n} (1-based) and {prompt} are filled in.")
@click.option("--quality", type=int, default=None,
              help="1-100: JPEG quality (default 95); makes WebP lossy; refused for .png (always lossless).")
@click.option("--seed", "seeds", type=int, multiple=True,
              help=f"Random seed, 0 to {SEED_MAX}; repeatable (default: a random one, printed and stored).")
@click.option("--count", type=int, default=None, metavar="N",
              help="N images: the given seed and the next N-1, or N random seeds.")
@click.option("--width", type=int, default=None, help=f"Width in pixels, {range_help('width')} (default 2048, or the preset's; with --keep-aspect the pixel budget; HiDream-I1: 1024).")
@click.option("--height", type=int, default=None, help=f"Height in pixels, {range_help('height')} (default 2048, or the preset's; with --keep-aspect the pixel budget; HiDream-I1: 1024).")
@click.option("--no-snap", is_flag=True, help="Render the exact size instead of the closest official bucket (HiDream-I1: instead of the rescale to the 1024x1024 area; multiples of 16).")
@click.option("--recipe", type=click.Choice(recipe_names()), default=None,
              help="Sampling recipe (default: from the model's name or stored metadata; HiDream-I1: full, dev, fast).")
@click.option("--preset", type=click.Choice(PRESET_NAMES), default=None,
              help="quick / standard / high / official: size and effort for explore -> re-render.")
@click.option("--steps", type=int, default=None, help=f"Override the recipe's step count ({range_help('steps')}; distilled recipes: at most 28).")
@click.option("--guidance", type=float, default=None, help=f"Override CFG scale ({range_help('guidance')}; <= 1 turns CFG off).")
@click.option("--shift", type=float, default=None, help=f"Override the timestep shift ({range_help('shift')}; recipes: {', '.join(USED_BY['shift'])}; HiDream-I1: all, and on full it replaces both UniPC shifts, official exp(mu) included).")
@click.option("--noise-scale", type=float, default=None, help=f"Override the initial noise scale ({range_help('noise_scale')}).")
@click.option("--s-noise", type=float, default=None, help=f"Override the per-step noise scale ({range_help('s_noise')}; recipes: {', '.join(USED_BY['s_noise'])}).")
@click.option("--noise-clip", type=float, default=None, help=f"Override the per-step noise clip, x std ({range_help('noise_clip')}; recipes: {', '.join(USED_BY['noise_clip'])}).")
@click.option("--noise", type=click.Choice(["torch", "mlx"]), default="torch", show_default=True,
              help="torch reproduces the official pipeline's images for a seed; mlx uses MLX's generator.")
@click.option("--blend-seams", type=int, default=0, show_default=True, metavar="R",
              help=f"Soften the 32 px patch grid: average a band of R px each side of every seam ({range_help('blend_seams')}; 0 = off).")
@click.option("--seam-smoothing", type=float, default=0.0, show_default=True, metavar="F",
              help="Fix the 32 px patch grid in the sampler: the last F (0-1) of the steps also run the model on "
                   "the grid shifted by half a patch (1 extra pass per such step, 2 with CFG; 0 = off).")
@click.option("--seam-window", type=click.Choice(["hann", "mean"]), default="hann", show_default=True,
              help="How the two passes mix: hann leans on the pass whose patch centre is nearer; mean halves.")
@click.option("--seam-strength", type=float, default=1.0, show_default=True, metavar="S",
              help="0-1: how much of the mixed prediction replaces the plain one in smoothed steps.")
@click.option("--preview-every", type=int, default=0, metavar="N", help=f"Write the x0 preview every N steps ({range_help('preview_every')}; 0 = off).")
@click.option("--dtype", type=click.Choice(list(PRECISIONS)), default="bfloat16", show_default=True)
@click.option("-q", "--quantize", "quantize_bits", type=click.Choice(["2", "3", "4", "5", "6", "8"]), default=None,
              help="Quantize the decoder in memory at load time.")
@click.option("--ref", "refs", multiple=True, metavar="IMAGE",
              help="Reference image for editing / subject-driven generation (repeatable, up to 10).")
@click.option("--layout", default=None, metavar="JSON|FILE",
              help='Boxes placing the references: [[x1,x2,y1,y2], ...] relative, or {"bbox": [...], "text": ...}.')
@click.option("--keep-aspect", is_flag=True, help="One reference: the output takes its aspect ratio, fitted into the --width x --height pixel area (default 2048x2048).")
@click.option("--editing-scheduler", type=click.Choice(["flow_match", "flash"]), default="flow_match", show_default=True,
              help="Dev recipes with exactly one --ref: flow-match Euler (official default) or the flash sampler.")
@click.option("--init-image", type=click.Path(), default=None, metavar="IMAGE",
              help="Start from this image (image-to-image): resized to the render size, which is its own size through "
                   "the family's size rule unless --width/--height are given.")
@click.option("--strength", type=float, default=None, metavar="S",
              help=f"With --init-image: the share of the recipe's steps that runs ({range_help('strength')}; "
                   "1 ignores the image's content; default 0.8, with --mask 1.0).")
@click.option("--mask", type=click.Path(), default=None, metavar="MASK",
              help="With --init-image: inpaint; white repaints, black keeps the source's pixels, grey in between "
                   "(resized to the render size).")
@click.option("--mask-blur", type=int, default=None, metavar="R",
              help=f"With --mask: blend the mask's edge over R px into the kept region ({range_help('mask_blur')}; "
                   "default 4).")
@click.option("--llama", default=None, metavar="PATH_OR_ID",
              help="HiDream-I1: the Llama-3.1-8B-Instruct folder or repo id (an mlx-lm quantized folder too) "
                   "when the model folder has no text_encoder_4/ (default: meta-llama/Meta-Llama-3.1-8B-Instruct, gated).")
@click.option("--encoder-bits", type=click.Choice([str(b) for b in option_choices("encoder_bits")]), default=None,
              help="HiDream-I1: quantize the T5 and Llama text encoders in memory (CLIP stays in floats).")
@click.option("--step-noise-seed", type=int, default=None, metavar="N",
              help="HiDream-I1 dev/fast: seed of the per-step noise, as torch.manual_seed(N) before the reference "
                   "pipeline's call (default: --seed).")
@click.option("--overwrite", is_flag=True, help="Replace --output if it exists.")
@click.option("--force", is_flag=True, help="Run even if the memory estimate says it will not fit.")
@click.option("--lora", "loras", multiple=True, metavar="PATH",
              help="LoRA .safetensors file (repeatable; several stack, in order).")
@click.option("--lora-scale", "lora_scales", multiple=True, type=float, metavar="S",
              help=f"Strength of the matching --lora, in order (default 1.0 each; >= {-MAX_LORA_SCALE:g} and "
                   f"<= {MAX_LORA_SCALE:g}).")
@click.option("--lora-paths", "lora_paths", multiple=True, hidden=True, help="mflux's spelling of --lora.")
@click.option("--lora-scales", "lora_scales_mflux", multiple=True, type=float, hidden=True,
              help="mflux's spelling of --lora-scale.")
def generate(model_arg, prompt, output, seeds, width, height, no_snap, recipe, preset, steps, guidance, shift,
             noise_scale, s_noise, noise_clip, noise, blend_seams, preview_every, dtype, quantize_bits,
             refs, layout, keep_aspect, overwrite, force, seam_smoothing=0.0, seam_window="hann", seam_strength=1.0,
             prompt_file=None, negative_prompt=None, from_image=None, quality=None, count=None,
             loras=(), lora_scales=(), lora_paths=(), lora_scales_mflux=(), editing_scheduler="flow_match",
             llama=None, encoder_bits=None, step_noise_seed=None, init_image=None, strength=None, mask=None,
             mask_blur=None):
    """Generate images from a prompt (several seeds or a prompt file: one model load)."""
    check_number("preview_every", preview_every)
    note = lambda line: click.echo(line, err=True)  # noqa: E731
    ctx = click.get_current_context()
    params = dict(ctx.params)
    if from_image is not None:
        params = from_image_settings(from_image, params, given_on_command_line(ctx, params), note)
    # Everything that can be refused (every job and output name) is refused before the weights load.
    family, source, jobs, requests = plan(params, note)
    bits = int(params["quantize_bits"]) if params["quantize_bits"] else None
    lora_specs = checked_specs(parse_lora_options([*params["loras"], *params["lora_paths"]],
                                                  [*params["lora_scales"], *params["lora_scales_mflux"]]))
    load = {"dtype": params["dtype"], "bits": bits, "loras": lora_specs,
            **{name: params[name] for name in family.load_options if name in params}}
    family.check_load(source, load)
    for line in source.notes:
        note(line)
    if not force:
        extra = lora_memory(lora_specs, quantized=bits is not None or source.quantization is not None)
        family.check_fits(source, requests, load, extra_bytes=extra)
    engine = family.load_engine(source, load)
    engine.prepare(requests, note)

    def announce(request):
        for line in engine.announce(request):
            note(line)

    written = render(engine, jobs, requests, params, announce, lambda result: _print_summary(result, engine))
    if summary(written):
        note(summary(written))
    for path in written:
        click.echo(str(path))
