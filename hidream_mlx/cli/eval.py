"""``hidream-mlx eval``: run a prompt battery (the default), ``eval compare``, ``eval report``.

Everything a user can get wrong (battery lines, variant keys and values, sizes, seeds, a run
folder made with another model) is checked before the model is loaded. User errors are raised
as ValueError / FileNotFoundError; the top-level group turns them into one ``error:`` line.
``--hosts`` re-runs the same command under ``mlx.launch``; a process that ``mlx.launch`` started
runs as one rank of :mod:`hidream_mlx.harness.distributed`.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Optional

import click

from hidream_mlx.cli.render import resolve_source
from hidream_mlx.families import family_named
from hidream_mlx.quant.recipes import SUPPORTED_BITS
from hidream_mlx.weights.precision import PRECISIONS
from hidream_mlx.files import atomic_output, check_output_path
from hidream_mlx.harness import distributed
from hidream_mlx.requests import limits_help
from hidream_mlx.harness.batteries import VARIANT_KEYS, parse_seeds, parse_variants, read_battery, variant_lines
from hidream_mlx.harness.distributed import HostLost, agree, gather_json, launch_command, lost_line, run_ranks
from hidream_mlx.harness.evaluation import (EvalRun, check_image_paths, check_jobs, load_engine, plan_jobs, read_results,
                                            run_lock)
from hidream_mlx.harness.reports import REPORT_FILE, compare_runs, render_comparison, write_reports
from hidream_mlx.memory import format_bytes


def _echo(message: str) -> None:
    click.echo(message, err=True)


def _image_line(done: int, todo: int, record: dict) -> None:
    _echo(f"[{done}/{todo}] {record['variant']}/{record['id']} seed {record['seed']} "
          f"{record['width']}x{record['height']}: {record['total_time']:.2f} s, "
          f"{record['seconds_per_step']:.3f} s/step, peak RSS {format_bytes(record['peak_rss_bytes'])}, "
          f"MLX peak {format_bytes(record['mlx_peak_bytes'])}")


@click.group(name="eval", invoke_without_command=True)
@click.option("--battery", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Battery file: JSONL, one prompt per line (id, prompt, optional genre/seed/size/steps/"
                   f"guidance/recipe); prompts as generate's: {limits_help()}.")
@click.option("--model", "model_arg", default=None, help="Hugging Face repo id or local model folder.")
@click.option("--random-weights", type=click.Choice(sorted(family_named("o1").random_dims)), default=None,
              help="Measure a random-weight model of this size instead of --model (no download).")
@click.option("--layers", type=int, default=None, help="With --random-weights: number of decoder layers.")
@click.option("--variant", "variant_specs", multiple=True, metavar="NAME:key=value,...",
              help=f"A setting variant (keys: {', '.join(VARIANT_KEYS)}); repeatable. Default: one variant "
                   "'default'.")
@click.option("--variants-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Variant specs, one per line (# comments); added before any --variant.")
@click.option("--seeds", default=None, metavar="42,43", help="Run every prompt at these seeds (replaces each line's seed).")
@click.option("--output", "-o", "rundir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run folder; rerunning with the same folder does only what is missing.")
@click.option("--warmup", is_flag=True, help="One short untimed generation before the first measured image.")
@click.option("--baseline", default=None, help="Variant the report's speed-ups are against (default: the first).")
@click.option("--dtype", type=click.Choice(list(PRECISIONS)), default="bfloat16",
              show_default=True, help="Weight dtype (CPU benchmarks: use float32).")
@click.option("-q", "--quantize", "quantize_bits", type=click.Choice([str(b) for b in SUPPORTED_BITS]), default=None,
              help="Quantize the decoder in memory at load time.")
@click.option("--base", default=None, metavar="PATH_OR_ID",
              help="HiDream-E1: the HiDream-I1-Full pipeline the E1 model edits on (as generate's --base).")
@click.option("--llama", default=None, metavar="PATH_OR_ID",
              help="HiDream-I1 and E1: the Llama folder or repo id when the pipeline has no text_encoder_4/.")
@click.option("--hosts", default=None, metavar="HOSTFILE|IP,IP,...",
              help="Run over several Macs with mlx.launch (ring backend): an mlx.launch JSON hostfile or a comma "
                   "list of IPs, the first being this machine (127.0.0.1,127.0.0.1 = two local ranks).")
@click.pass_context
def eval_group(ctx, battery, model_arg, random_weights, layers, variant_specs, variants_file, seeds, rundir,
               warmup, baseline, dtype, quantize_bits, hosts, base=None, llama=None):
    """Run a prompt battery and log per-step time, peak RSS and MLX memory per image.

    \b
    hidream-mlx eval --battery evals/batteries/showcase.jsonl --model M --output runs/showcase
    hidream-mlx eval compare runs/q8 runs/q6
    """
    if ctx.invoked_subcommand is not None:
        return
    run_battery(battery, model_arg, random_weights, layers, list(variant_specs), variants_file, seeds, rundir,
                warmup, baseline, dtype, int(quantize_bits) if quantize_bits else None, hosts,
                {"base": base, "llama": llama})


def _eval_args(battery, model_arg, random_weights, layers, variant_specs, variants_file, seeds, rundir, warmup,
               baseline, dtype, quantize_bits, load_options=None) -> list[str]:
    """The same eval command line, minus ``--hosts``, for each launched rank."""
    pairs = [("--battery", battery), ("--model", model_arg), ("--random-weights", random_weights),
             ("--layers", layers), ("--variants-file", variants_file), ("--seeds", seeds), ("--output", rundir),
             ("--baseline", baseline), ("--dtype", dtype), ("--quantize", quantize_bits)]
    pairs += [(f"--{name}", value) for name, value in (load_options or {}).items()]
    args = [a for flag, value in pairs if value is not None for a in (flag, str(value))]
    args += [a for spec in variant_specs for a in ("--variant", spec)]
    return args + (["--warmup"] if warmup else [])


def run_battery(battery: Optional[Path], model_arg: Optional[str], random_weights: Optional[str],
                layers: Optional[int], variant_specs: list[str], variants_file: Optional[Path],
                seeds: Optional[str], rundir: Optional[Path], warmup: bool, baseline: Optional[str],
                dtype: str, quantize_bits: Optional[int], hosts: Optional[str] = None,
                load_options: Optional[dict] = None) -> Path:
    load_options = {k: v for k, v in (load_options or {}).items() if v is not None}
    if battery is None:
        raise ValueError("--battery is required (or use a subcommand: compare, report)")
    if rundir is None:
        raise ValueError("--output RUNDIR is required")
    if (model_arg is None) == (random_weights is None):
        raise ValueError("give exactly one of --model and --random-weights")
    if layers is not None and random_weights is None:
        raise ValueError("--layers only applies to --random-weights")
    if load_options and random_weights is not None:
        raise ValueError(f"--{next(iter(load_options))} goes with --model, not --random-weights")
    group = None
    if distributed.launched_rank():
        if hosts is not None:
            raise ValueError("--hosts starts mlx.launch itself: inside mlx.launch, leave it out")
        group = distributed.init_group()
        distributed.check_inputs(group, [str(battery), variants_file and str(variants_file), model_arg])
    from_file = variant_lines(variants_file) if variants_file else []
    variants = parse_variants([spec for spec, _ in from_file] + variant_specs, dict(from_file))
    if baseline is not None and baseline not in {v.name for v in variants}:
        raise ValueError(f"--baseline {baseline!r} is not one of the variants: {', '.join(v.name for v in variants)}")
    items = read_battery(battery)
    jobs = plan_jobs(items, variants, parse_seeds(seeds))
    # Every job's settings, the load options and the battery's LoRAs, before anything loads.
    model = None if model_arg is None else resolve_source({"model_arg": model_arg, **load_options})[1]
    source = check_jobs(jobs, model, load={"dtype": dtype, "bits": quantize_bits})
    check_image_paths(rundir, jobs)
    model_name = _model_name(model_arg, random_weights, layers)
    if group is not None:
        distributed.check_same_jobs(group, jobs)
        return _rank_battery(group, jobs, lambda: _open_run(rundir, model_name, dtype, quantize_bits, battery,
                                                            variants, baseline),
                             lambda: load_engine(source, random_weights, layers, dtype, quantize_bits),
                             rundir, baseline)
    if hosts is not None:
        return _launch(hosts, _eval_args(battery, model_arg, random_weights, layers, variant_specs, variants_file,
                                         seeds, rundir, warmup, baseline, dtype, quantize_bits, load_options),
                       rundir, jobs)
    with run_lock(rundir):
        run = _open_run(rundir, model_name, dtype, quantize_bits, battery, variants, baseline)
        _echo(f"{len(items)} prompts x {len(jobs) // len(items)} variant/seed combinations = {len(jobs)} images; "
              f"loading {model_name} ({dtype}{f', Q{quantize_bits}' if quantize_bits else ''})")
        engine = load_engine(source, random_weights, layers, dtype, quantize_bits)
        run.start_session(engine)
        if engine.load_time:
            _echo(f"model loaded in {engine.load_time:.2f} s (reported separately, not in image times)")
        else:  # a phase-by-phase family (HiDream-I1): nothing heavy has loaded yet
            _echo(f"{family_named(source.family).title}: every prompt is encoded first, then the transformer loads "
                  "once (its load time is recorded in run.json, not in image times)")
        try:
            records = run.run(engine, jobs, warmup=warmup, on_image=_image_line)
        finally:
            # Also on Ctrl-C: the report covers every image finished so far.
            report = write_reports(rundir, baseline)
    return _finish(jobs, records, report)


def _model_name(model_arg, random_weights, layers) -> str:
    return model_arg or f"random-{random_weights}" + (f" ({layers} layers)" if layers else "")


def _open_run(rundir, model_name, dtype, quantize_bits, battery, variants, baseline):
    identity = {"model": model_name, "dtype": dtype, "quantize": quantize_bits, "battery": battery.stem}
    run = EvalRun(rundir, identity, variants, {"battery_path": str(battery), "baseline": baseline})
    for line in run.dropped:
        _echo(f"warning: {line}")
    return run


def _launch(hosts: str, eval_args: list[str], rundir: Path, jobs) -> Path:
    """Run the ranks with mlx.launch and judge the outcome from the run folder itself:
    mlx.launch exits 0 even when a rank failed, so a missing result is the one sure sign."""
    command = launch_command(hosts, eval_args)
    with run_lock(rundir):  # refuse a folder in use now, not after every host has loaded
        pass
    _echo(f"launching {len(jobs)} jobs with mlx.launch over {hosts}")
    subprocess.run(command, check=False)
    missing = sorted({job.key for job in jobs} - set(read_results(rundir)))
    if missing:
        raise ValueError(f"{len(missing)} of {len(jobs)} jobs have no result ({', '.join(missing[:8])}"
                         f"{', ...' if len(missing) > 8 else ''}); see the messages above, then rerun the same "
                         f"command to make only those")
    return rundir / REPORT_FILE


def _rank_battery(group, jobs, open_run, load, rundir: Path, baseline: Optional[str]) -> None:
    """One launched rank. Rank 0 locks and opens the run folder first; every rank loads the model;
    one collective after loading is the barrier before any job starts."""
    rank, run = group.rank(), None
    with ExitStack() as stack:
        problem = None
        if rank == 0:
            try:
                stack.enter_context(run_lock(rundir))
                run = open_run()
            except (ValueError, OSError) as e:
                problem = str(e)
        agree(group, problem)
        if rank == 0:
            _echo(f"{len(jobs)} images over {group.size()} ranks; every rank loads the model")
        engine, problem = None, None
        try:
            engine = load()
        except (ValueError, OSError) as e:
            problem = f"cannot load the model: {e}"
        agree(group, problem)  # the barrier: nobody starts before everyone has loaded
        hosts = gather_json(group, {"host": socket.gethostname(), "load_time": engine.load_time})
        if rank != 0:
            run_ranks(group, engine, jobs)
            _leave(group)
        run.start_session(engine)
        run.session["ranks"] = hosts
        run.save()
        _echo(f"all {group.size()} ranks loaded (rank 0 in {engine.load_time:.2f} s, not in image times)")
        in_flight: list[str] = []
        try:
            records = run_ranks(group, engine, jobs, run, on_image=_image_line, in_flight=in_flight)
        except (KeyboardInterrupt, HostLost) as e:
            # Said at once: mlx.launch's SIGTERM may cut the report writing below short.
            why = "a host stopped" if isinstance(e, HostLost) else "stopped (by mlx.launch after a rank failed, or by you)"
            _echo(f"{why}; {lost_line(in_flight)}")
            raise
        finally:
            report = write_reports(rundir, baseline)
    _finish(jobs, records, report)
    _leave(group)


def _leave(group) -> None:
    """End a rank once all are done. A last collective first, so no rank closes its sockets
    while another still talks; then exit without interpreter teardown, during which a rank's
    ring-backend threads were seen to hang now and then (keeping mlx.launch waiting)."""
    agree(group, None)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _finish(jobs, records, report) -> Path:
    skipped = len(jobs) - len(records)
    _echo(f"{len(records)} images made" + (f", {skipped} already done" if skipped else "") + f"; report: {report}")
    click.echo(str(report))
    return report


@eval_group.command()
@click.argument("run_a", type=click.Path(file_okay=False, path_type=Path))
@click.argument("run_b", type=click.Path(file_okay=False, path_type=Path))
@click.option("--output", "-o", "output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the table to this markdown file.")
@click.option("--overwrite", is_flag=True, help="Replace --output if it exists.")
@click.option("--ignore-seed", is_flag=True, help="Match by prompt id alone (e.g. to measure how much two seeds differ).")
@click.option("--allow-mismatch", is_flag=True,
              help="Compare images matched by id even when their prompt, seed or size differ (marked in the table).")
def compare(run_a, run_b, output, overwrite, ignore_seed, allow_mismatch):
    """Per matching image (same prompt id and seed): MAD, PSNR, brightness shift, grid-energy ratio B/A.

    Images are matched by prompt id; a pair whose prompt, seed or size differ is refused
    unless --allow-mismatch, which marks it."""
    if output is not None:
        check_output_path(output, overwrite)
    text = render_comparison(run_a, run_b, compare_runs(run_a, run_b, ignore_seed, allow_mismatch))
    if output is not None:
        with atomic_output(output, overwrite) as tmp:
            tmp.write_text(text, encoding="utf-8")
        _echo(f"wrote {output}")
    sys.stdout.write(text)


@eval_group.command()
@click.argument("rundir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--baseline", default=None, help="Variant the speed-ups are against (default: the run's).")
def report(rundir, baseline):
    """Rewrite RUNDIR/report.md and the contact sheet from the results so far."""
    click.echo(str(write_reports(rundir, baseline)))
