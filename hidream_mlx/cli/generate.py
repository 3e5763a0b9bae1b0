"""``hidream-mlx generate``: one image from a prompt (the CLI face of :class:`Engine`)."""

from __future__ import annotations

import sys
from pathlib import Path

import click
import numpy as np

from hidream_mlx.recipes import PRESETS as PRESET_NAMES
from hidream_mlx.recipes import RECIPES as RECIPE_NAMES

DEFAULT_MODEL = "HiDream-ai/HiDream-O1-Image-Dev"
# Editing below about 2 MP is known to give noise with the released checkpoints.
EDIT_MIN_PIXELS = 2_000_000


def _check_references(refs, layout, keep_aspect, width, height):
    """Validate reference options before any model loads; returns the layout as JSON text."""
    from hidream_mlx.editing.layout import parse_layout_boxes
    from hidream_mlx.editing.references import load_reference_images

    if not refs:
        if layout or keep_aspect:
            raise ValueError(f"{'--layout' if layout else '--keep-aspect'} needs at least one --ref image")
        return None
    load_reference_images(list(refs))
    if keep_aspect and len(refs) != 1:
        raise ValueError(f"--keep-aspect works with exactly one --ref image, got {len(refs)}")
    if layout is not None:
        path = Path(layout)
        text = path.read_text() if len(layout) < 4096 and path.is_file() else layout
        parse_layout_boxes(text, width, height)
        layout = text
    if not keep_aspect and width * height < EDIT_MIN_PIXELS:
        click.echo(f"warning: editing at {width}x{height} (< 2 MP) is known to give noisy images; "
                   "consider a larger size or --keep-aspect", err=True)
    return layout


def _print_summary(result, engine, elapsed_note: str = "") -> None:
    r = result.request
    from hidream_mlx.memory import format_bytes

    click.echo(
        f"{r.width}x{r.height} | recipe {r.recipe.name}{'' if r.recipe.official else ' (modified)'} | "
        f"{r.recipe.steps} steps | guidance {r.recipe.guidance:g} | total {result.total_time:.2f} s | "
        f"{result.seconds_per_step:.3f} s/step | peak {format_bytes(result.peak_memory)}"
        f"{f' | seam smoothing +{r.seam_passes} passes' if r.seam_passes else ''}{elapsed_note}",
        err=True,
    )


@click.command("generate")
@click.option("--model", "model_arg", default=DEFAULT_MODEL, show_default=True,
              help="Hugging Face repo id or local folder (official or quantized layout).")
@click.option("--prompt", required=True, help="What to draw.")
@click.option("--output", "-o", default="image.png", show_default=True, type=click.Path(path_type=Path))
@click.option("--seed", type=int, default=None, help="Random seed (default: a random one, printed and stored).")
@click.option("--width", type=int, default=None, help="Width in pixels (default 2048, or the preset's).")
@click.option("--height", type=int, default=None, help="Height in pixels (default 2048, or the preset's).")
@click.option("--no-snap", is_flag=True, help="Render the exact size instead of the closest official bucket.")
@click.option("--recipe", type=click.Choice(sorted(RECIPE_NAMES)), default=None,
              help="Sampling recipe (default: from the model's name or stored metadata).")
@click.option("--preset", type=click.Choice(sorted(PRESET_NAMES)), default=None,
              help="quick / standard / high / official: size and effort for explore -> re-render.")
@click.option("--steps", type=int, default=None, help="Override the recipe's step count.")
@click.option("--guidance", type=float, default=None, help="Override CFG scale (<= 1 turns CFG off).")
@click.option("--shift", type=float, default=None, help="Override the timestep shift.")
@click.option("--noise-scale", type=float, default=None, help="Override the initial noise scale.")
@click.option("--s-noise", type=float, default=None, help="Dev: override the per-step noise scale.")
@click.option("--noise-clip", type=float, default=None, help="Dev: override the per-step noise clip (x std).")
@click.option("--noise", type=click.Choice(["torch", "mlx"]), default="torch", show_default=True,
              help="torch reproduces the official pipeline's images for a seed; mlx uses MLX's generator.")
@click.option("--blend-seams", type=int, default=0, show_default=True, metavar="R",
              help="Soften the 32 px patch grid: average a band of R px across each seam (0 = off).")
@click.option("--seam-smoothing", type=float, default=0.0, show_default=True, metavar="F",
              help="Fix the 32 px patch grid in the sampler: the last F (0-1) of the steps also run the model on "
                   "the grid shifted by half a patch (1 extra pass per such step, 2 with CFG; 0 = off).")
@click.option("--seam-window", type=click.Choice(["hann", "mean"]), default="hann", show_default=True,
              help="How the two passes mix: hann leans on the pass whose patch centre is nearer; mean halves.")
@click.option("--seam-strength", type=float, default=1.0, show_default=True, metavar="S",
              help="0-1: how much of the mixed prediction replaces the plain one in smoothed steps.")
@click.option("--preview-every", type=int, default=0, metavar="N", help="Write the x0 preview every N steps.")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16", show_default=True)
@click.option("-q", "--quantize", "quantize_bits", type=click.Choice(["4", "6", "8"]), default=None,
              help="Quantize the decoder in memory at load time.")
@click.option("--ref", "refs", multiple=True, metavar="IMAGE",
              help="Reference image for editing / subject-driven generation (repeatable, up to 10).")
@click.option("--layout", default=None, metavar="JSON|FILE",
              help='Boxes placing the references: [[x1,x2,y1,y2], ...] relative, or {"bbox": [...], "text": ...}.')
@click.option("--keep-aspect", is_flag=True, help="One reference: the output takes its aspect ratio (up to 2048).")
@click.option("--overwrite", is_flag=True, help="Replace --output if it exists.")
@click.option("--force", is_flag=True, help="Run even if the memory estimate says it will not fit.")
def generate(model_arg, prompt, output, seed, width, height, no_snap, recipe, preset, steps, guidance, shift,
             noise_scale, s_noise, noise_clip, noise, blend_seams, preview_every, dtype, quantize_bits,
             refs, layout, keep_aspect, overwrite, force, seam_smoothing=0.0, seam_window="hann", seam_strength=1.0):
    """Generate one image from a prompt."""
    import secrets

    from hidream_mlx.files import check_output_path
    from hidream_mlx.generation import Engine, Request, preview_image
    from hidream_mlx.models.loading import parse_dtype, read_config, resolve_model_path
    from hidream_mlx.memory import check_fits_folder
    from hidream_mlx.png import save_png
    from hidream_mlx.recipes import (
        apply_preset,
        get_preset,
        get_recipe,
        recipe_for_model,
        recipe_for_references,
    )
    from hidream_mlx.resolution import resolve_size
    from hidream_mlx.seams import blend_seams as check_blend

    if not prompt.strip():
        raise ValueError("--prompt is empty")
    if preview_every < 0:
        raise ValueError(f"--preview-every must be >= 0, got {preview_every}")
    check_blend(np.zeros((64, 64, 3), np.uint8), blend_seams)
    from hidream_mlx.seam_smoothing import check_settings as check_seam_smoothing

    check_seam_smoothing(seam_smoothing, seam_window, seam_strength)
    check_output_path(output, overwrite)
    chosen = get_preset(preset) if preset else None
    snap = not no_snap
    if chosen is not None and chosen.size is not None:
        default_w, default_h = chosen.size
        snap = snap and (width is not None or height is not None)
    else:
        default_w = default_h = 2048
    w, h, size_note = resolve_size(width or default_w, height or default_h, snap)
    layout = _check_references(refs, layout, keep_aspect, w, h)

    # Everything that can be refused is refused before the (possibly 30 GB) weights load.
    model_dir = resolve_model_path(model_arg)
    stored = read_config(model_dir).hidream
    rec = get_recipe(recipe_for_references(recipe or recipe_for_model(model_arg, stored), len(refs)))
    if chosen is not None:
        rec = apply_preset(rec, chosen)
    rec = rec.with_overrides(steps=steps, guidance=guidance, shift=shift, noise_scale=noise_scale,
                             s_noise=s_noise, noise_clip=noise_clip)
    bits = int(quantize_bits) if quantize_bits else None
    if not force:
        check_fits_folder(model_dir, parse_dtype(dtype).size, bits, w, h, rec.uses_cfg)

    engine = Engine.load(model_arg, dtype=dtype, quantize_bits=bits)
    engine.keep_vision = False
    seed = secrets.randbelow(2**31) if seed is None else seed
    request = Request(prompt, w, h, seed, rec, noise=noise, blend_seams=blend_seams, size_note=size_note,
                      references=tuple(str(r) for r in refs), layout=layout, keep_aspect=keep_aspect,
                      seam_smoothing=seam_smoothing, seam_window=seam_window, seam_strength=seam_strength)
    click.echo(f"size {size_note}; recipe {rec.name}, {rec.steps} steps, guidance {rec.guidance:g}, seed {seed}"
               f" (model loaded in {engine.load_time:.1f} s)", err=True)
    if not rec.official:
        subset = f" ({rec.steps} of the 28 distilled timesteps)" if rec.distilled and rec.steps < 28 else ""
        click.echo(f"note: settings differ from the released {rec.name} recipe{subset}", err=True)

    with click.progressbar(length=rec.steps, label="sampling", file=sys.stderr,
                           show_eta=True, item_show_func=lambda s: s) as bar:
        def on_step(step, seconds):
            bar.update(1, f"{seconds:.2f} s/step")
            if preview_every and (step.index + 1) % preview_every == 0 and step.index + 1 < step.total:
                path = output.with_name(f"{output.stem}.step{step.index + 1:03d}{output.suffix}")
                save_png(preview_image(step, request), path, overwrite=True)

        result = engine.run(request, on_step)
    save_png(result.image, output, result.metadata, overwrite=overwrite)
    _print_summary(result, engine)
    click.echo(str(output))
