"""The batch and ``--from-image`` side of ``hidream-mlx generate``: plan, check, load once, render.

Everything that can be refused (prompt file, seeds, output names, every request) is refused
before the weights load; then the model loads once and each distinct prompt is encoded once.
The model's family (``hidream_mlx.families``) resolves its source; the shared request builder
applies that family's rules.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, Optional

import click
from click.core import ParameterSource

from hidream_mlx.families import family_of, registered
from hidream_mlx.family import RequestError
from hidream_mlx.workflow.batch import (Job, build_requests, check_outputs, output_names, plan_jobs, preview_path,
                               preview_paths)
from hidream_mlx.images import check_quality, image_format, save_image
from hidream_mlx.workflow.metadata import read_image_metadata
from hidream_mlx.workflow.reproduce import (
    check_family,
    check_model,
    find_loras,
    find_references,
    find_start_files,
    merge_settings,
    recorded_location,
    recorded_model,
    recorded_settings,
)

# build_request's options, as generate's parameters are named.
REQUEST_OPTIONS = ("width", "height", "no_snap", "recipe", "preset", "steps", "guidance", "shift", "noise_scale",
                   "s_noise", "noise_clip", "noise", "blend_seams", "seam_smoothing", "seam_window", "seam_strength",
                   "layout", "keep_aspect", "editing_scheduler", "negative_prompt", "step_noise_seed",
                   "init_image", "strength", "mask", "mask_blur", "image_guidance", "refine_strength",
                   "no_clip_cfg_norm", "keep_source_size")


def load_option_names() -> tuple[str, ...]:
    """generate's load options that only some family reads (``--llama``, ...), not request options."""
    return tuple(name for family in registered() for name in family.load_options)


def given_on_command_line(ctx: click.Context, names) -> set:
    return {name for name in names if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE}


def from_image_settings(image: Path, params: dict, explicit: set, note: Callable[[str], None]) -> dict:
    """``params`` (generate's values) with the image's settings under the command line's own."""
    meta, _ = read_image_metadata(image)  # no metadata, or a key of the wrong kind: one clear line
    model = params["model_arg"]
    if "model_arg" in explicit and Path(model).expanduser().exists():  # said first, not as the options it lacks
        check_family(meta, family_of(model).name, model, image)
    recorded = recorded_settings(meta, str(image))
    recorded.pop("prompt", None) if "prompt" in explicit or "prompt_file" in explicit else None
    if "seeds" in explicit or "count" in explicit:
        recorded.pop("seed", None)
    if "seeds" in explicit or "count" in explicit:
        recorded.pop("step_noise_seed", None)  # a new seed draws new per-step noise too
    recorded_dtype = recorded.pop("dtype", None)
    recorded_bits = recorded.pop("quantize_bits", None)
    recorded_load = {k: recorded.pop(k) for k in load_option_names() if k in recorded}
    mine = {k: params[k] for k in REQUEST_OPTIONS if k in explicit}
    target = params["recipe"] if "recipe" in explicit else recorded.get("recipe")
    merged = merge_settings(recorded, mine, target, meta.get("family", "o1"))
    out = dict(params)
    out.update({k: v for k, v in merged.items() if k in REQUEST_OPTIONS})
    if "prompt" in merged and "prompt_file" not in explicit:
        out["prompt"] = merged["prompt"]
    if "seed" in merged:
        out["seeds"] = (merged["seed"],)
    if "model_arg" not in explicit:
        out["model_arg"] = recorded_model(meta, image)
    if "dtype" not in explicit and recorded_dtype:
        out["dtype"] = recorded_dtype
    if "quantize_bits" not in explicit:
        out["quantize_bits"] = recorded_bits
    for key, value in recorded_load.items():
        if key not in explicit and key in out:
            located = {"llama": "Llama", "base": "base"}  # recorded by name: a local one is given again
            out[key] = recorded_location(value, image, f"--{key}", located[key], meta) if key in located else value
    out["refs"] = find_references(meta, image, params["refs"], note)
    out.update(find_start_files(meta, image, {k: params.get(k) for k in ("init_image", "mask")}, note))
    lora_flags = {"loras", "lora_scales", "lora_paths", "lora_scales_mflux"}
    if "loras" in params and meta.get("loras") and not lora_flags & explicit:
        out["loras"], out["lora_scales"] = find_loras(meta, image)
    out["_meta"] = meta
    return out


def resolve_source(params: dict):
    """(family, source) of ``--model``; another family's load options are refused here, naming the flag
    (and the oldest family that reads it, as the request builder names options)."""
    arg = params["model_arg"]
    family = family_of(arg)
    for other in reversed(registered()):
        for name in other.load_options:
            if name not in family.load_options and params.get(name) not in (None, False):
                raise RequestError(f"--{name.replace('_', '-')} is for {other.title} models; {arg} is a "
                                   f"{family.title} model")
    return family, family.resolve(arg, {name: params.get(name) for name in family.load_options})


def plan(params: dict, note: Callable[[str], None]):
    """(family, source, jobs, requests) with every output checked; nothing loads here."""
    family, source = resolve_source(params)
    if params.get("_meta"):
        check_model(params["_meta"], source, note, params.get("from_image") or "the image")
    jobs = plan_jobs(params["prompt"], params["prompt_file"], tuple(params["seeds"]), params["count"])
    for job, name in zip(jobs, output_names(params["output"], jobs)):
        job.output = name
    check_outputs([job.output for job in jobs], params["overwrite"])
    check_quality_for([job.output for job in jobs], params.get("quality"))
    options = {k: params[k] for k in REQUEST_OPTIONS}
    options["refs"] = params["refs"]
    requests = build_requests(source, jobs, options, note)
    every = params["preview_every"]
    check_outputs([path for job, request in zip(jobs, requests)
                   for path in preview_paths(job.output, request.run_steps, every)], params["overwrite"])
    return family, source, jobs, requests


def check_quality_for(outputs: list[Path], quality: Optional[int]) -> None:
    """``--quality`` in range and meaning something for every output (PNG is lossless: it would be
    ignored), before anything loads."""
    if quality is None:
        return
    check_quality(quality)
    png = next((path for path in outputs if image_format(path) == "PNG"), None)
    if png is not None:
        raise RequestError(f"--quality applies to .jpg/.jpeg and .webp outputs; {png} is a PNG, which is always "
                           "lossless: leave --quality out or choose another extension")


def render(engine, jobs: list[Job], requests: list, params: dict, announce=None, on_image_done=None) -> list[Path]:
    """Render every job with the one loaded ``engine``; returns the files written, in order."""
    engine.conditioning_cache = {}
    written, started, total = [], time.perf_counter(), len(jobs)
    bits = int(params["quantize_bits"]) if params["quantize_bits"] else None
    for job, request in zip(jobs, requests):
        if total > 1:
            done = len(written)
            eta = f", ETA {(time.perf_counter() - started) / done * (total - done):.0f} s" if done else ""
            click.echo(f"[image {job.n}/{total}{eta}] seed {request.seed}: {request.prompt[:60]!r} -> {job.output}",
                       err=True)
        if announce is not None:
            announce(request)
        result = _run_one(engine, request, job.output, params)
        meta = {**result.metadata, **({"quantize_bits": bits} if bits is not None else {})}
        save_image(result.image, job.output, meta, overwrite=params["overwrite"], quality=params["quality"])
        written.append(job.output)
        if on_image_done is not None:
            on_image_done(result)
    engine.conditioning_cache = None
    return written


def _run_one(engine, request, output: Path, params: dict):
    every = params["preview_every"]
    with click.progressbar(length=request.run_steps, label="sampling", file=sys.stderr,
                           show_eta=True, item_show_func=lambda s: s) as bar:
        def on_step(step, seconds):
            bar.update(1, f"{seconds:.2f} s/step")
            if every and (step.index + 1) % every == 0 and step.index + 1 < step.total:
                save_image(engine.preview_image(step, request), preview_path(output, step.index + 1),
                           overwrite=params["overwrite"], quality=params["quality"])

        return engine.run(request, on_step)


def summary(written: list[Path]) -> Optional[str]:
    if len(written) < 2:
        return None
    return f"wrote {len(written)} images: " + ", ".join(str(p) for p in written)
