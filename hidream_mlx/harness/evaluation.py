"""The resumable eval runner: jobs, the run folder, and honest per-image measurement.

Every (prompt, seed, variant) is one job. Each finished job is one line of
``RUNDIR/results.jsonl``, appended and fsynced as soon as its image is on disk (images are
written atomically), so Ctrl-C loses nothing finished and a rerun with the same folder does
only what is missing (key: variant + prompt id + seed, with the same settings).
``RUNDIR/run.json`` keeps the run's identity (model, dtype, quantization, battery), variant
definitions, and one entry per session with its model load time, kept out of image times.
One process at a time owns a run folder (:func:`run_lock`); a line torn by a hard kill is
dropped and reported when the folder is opened, and its job runs again.

Settings are layered: eval defaults < the battery line < the variant.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import platform
import socket
import statistics
import time
from dataclasses import dataclass
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import mlx.core as mx
import psutil

from hidream_mlx.families import family_named, family_of
from hidream_mlx.files import (atomic_output, check_name_length, check_output_path, read_json_file, read_text_file,
                               sha256_file)
from hidream_mlx.harness.batteries import DEFAULT_SEED, DEFAULT_SIZE, START_FIELDS, BatteryItem, Variant
from hidream_mlx.harness.grid import grid_energy_axes
from hidream_mlx.images import save_image
from hidream_mlx.memory import PeakRss, reset_high_water, ru_maxrss_bytes
from hidream_mlx.requests import build_request
from hidream_mlx.weights.lora import switch_loras

RESULTS_FILE = "results.jsonl"
RUN_FILE = "run.json"
LOCK_FILE = ".lock"


# --- jobs ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    item: BatteryItem
    variant: Variant
    seed: int

    @property
    def key(self) -> str:
        return job_key(self.variant.name, self.item.id, self.seed)

    @property
    def image_path(self) -> str:
        return f"images/{self.variant.name}/{self.item.id}_s{self.seed}.png"

    def settings(self) -> dict:
        # From a start image or a source to edit the size is the family's for it unless one is given.
        size = None if self.item.init_image is not None or self.item.refs else DEFAULT_SIZE
        merged = {"size": size, "snap": False, "noise": "torch", "blend_seams": 0}
        return {**merged, **self.item.settings(), **self.variant.overrides}

    def request(self, model):
        """This job's request through the shared builder (``model``: a source or an engine of any
        family, None for random weights, or a HiDream-O1 recipe name as the default). Free sizes may
        go below 256 px (fast measurements)."""
        s = self.settings()
        default = model if isinstance(model, str) else None
        width, height = s["size"] or (None, None)
        return build_request(
            None if default else model, prompt=self.item.prompt, seed=self.seed, width=width, height=height,
            no_snap=not s["snap"], recipe=s.get("recipe") or default, steps=s.get("steps"),
            guidance=s.get("guidance"), shift=s.get("shift"), noise=s["noise"], blend_seams=s["blend_seams"],
            seam_smoothing=s.get("seam_smoothing", 0.0), seam_window=s.get("seam_window", "hann"),
            seam_strength=s.get("seam_strength", 1.0), small_sizes=True, refs=s.get("refs", ()),
            image_guidance=s.get("image_guidance"), refine_strength=s.get("refine_strength"),
            **{key: s.get(key) for key in START_FIELDS})


def job_key(variant: str, item_id: str, seed: int) -> str:
    return f"{variant}/{item_id}/{seed}"


def plan_jobs(items: list[BatteryItem], variants: list[Variant], seeds: Optional[list[int]] = None) -> list[Job]:
    """Prompt-major order: a prompt's variants run back to back, so slow drift of the machine
    (heat, other load) hits every variant alike. ``seeds`` replaces each line's own seed.
    :func:`check_jobs` then builds every job's request before any weight loads."""
    jobs = []
    for item in items:
        for seed in seeds or [item.seed if item.seed is not None else DEFAULT_SEED]:
            jobs.extend(Job(item, v, seed) for v in variants)
    return jobs


def check_jobs(jobs: list[Job], model, llama: Optional[str] = None, load: Optional[dict] = None):
    """The source of ``model`` (None: random weights; a resolved source as it is), after every job's
    request is built against it: a setting that cannot run is refused naming its battery line or
    variant, before anything loads. With ``load`` (``dtype``, ``bits``) the family also refuses load
    options it cannot honour and reads every LoRA the battery names against the model
    (``Family.check_load``), before loading."""
    source = family_of(model).resolve(model, {"llama": llama}) if isinstance(model, (str, Path)) else model
    for job in jobs:
        checked_request(job, source)
    if source is not None and load is not None:
        loras = tuple(dict.fromkeys(spec for job in jobs for spec in job.item.loras))
        family_named(source.family).check_load(source, {**load, "loras": loras})
    return source


def check_image_paths(rundir: Path | str, jobs: list[Job]) -> None:
    """Every job's image can be written where it goes (its folders are folders, an earlier image a
    plain file, its name within the file system's limits with the temporary suffix), before the
    model loads: a write refused after sampling would lose the work."""
    for job in jobs:
        path = Path(rundir) / job.image_path
        for folder in (path.parent.parent, path.parent):
            if os.path.lexists(folder) and not folder.is_dir():
                raise ValueError(f"{folder}: exists and is not a folder; {job.key}'s image goes there")
        if path.parent.is_dir():
            check_output_path(path, overwrite=True)
        else:
            check_name_length(path, path.parent)


def origin(job: Job, from_variant: bool) -> str:
    """Where a job's setting came from: ``variant 'NAME' (FILE:LINE)`` or ``FILE:LINE (id ID)``."""
    if from_variant:
        return f"variant {job.variant.name!r}" + (f" ({job.variant.where})" if job.variant.where else "")
    return f"{job.item.where or 'battery line'} (id {job.item.id})"


def checked_request(job: Job, model):
    """``job.request(model)``; a refusal names the battery line or the variant it comes from
    (the variant when the line alone builds)."""
    try:
        return job.request(model)
    except ValueError as e:
        try:
            Job(job.item, Variant(job.variant.name), job.seed).request(model)
            blame = bool(job.variant.overrides)
        except ValueError:
            blame = False
        raise ValueError(f"{origin(job, blame)}: {e}") from None


# --- the run folder ----------------------------------------------------------------------------

def read_results(rundir: Path | str) -> dict[str, dict]:
    """Finished images by key; a later line for the same key replaces an earlier one."""
    path = Path(rundir) / RESULTS_FILE
    records: dict[str, dict] = {}
    if not path.is_file():
        return records
    for number, line in enumerate(read_text_file(path, "results file").splitlines(), start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            # Only a write cut short by a hard kill leaves such a line (later appends start on a
            # fresh line after it); its image counts as not done and is made again.
            continue
        if not isinstance(record, dict) or "key" not in record:
            raise ValueError(f"{path}:{number}: not a result record (no \"key\")")
        records[record["key"]] = record
    return records


def append_result(rundir: Path, record: dict) -> None:
    path = Path(rundir) / RESULTS_FILE
    with open(path, "a+b") as f:
        f.seek(0, os.SEEK_END)
        if f.tell():
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":  # finish a line a hard kill cut short
                f.write(b"\n")
        f.write((json.dumps(record, sort_keys=True) + "\n").encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


def repair_results(rundir: Path | str) -> list[str]:
    """Drop lines that are not whole JSON records (a write cut short by a hard kill) and return
    a description of each, so the caller can say so; their jobs then count as not done."""
    path = Path(rundir) / RESULTS_FILE
    if not path.is_file():
        return []
    kept, dropped = [], []
    for number, line in enumerate(read_text_file(path, "results file").splitlines(), start=1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "key" not in record:
                raise ValueError("not a result record")
        except ValueError:
            if line.strip():
                dropped.append(f"{path}:{number}: dropped a torn line ({len(line)} bytes: {line[:60]!r}...); "
                               f"that image is made again")
            continue
        kept.append(line)
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)
    return dropped


@contextmanager
def run_lock(rundir: Path | str) -> Iterator[Path]:
    """Hold an exclusive lock on a run folder: two runs appending to one ``results.jsonl`` would
    duplicate rows. The lock file names the holder; the kernel frees the lock if it dies."""
    rundir = Path(rundir)
    rundir.mkdir(parents=True, exist_ok=True)
    path = rundir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown process"
            raise ValueError(f"{rundir} is in use by another eval run ({holder}); wait for it to finish "
                             f"or use another --output folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode("utf-8"), 0)
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)



def machine_description() -> str:
    device = "Metal GPU" if mx.metal.is_available() else "CPU"
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, MLX {mx.__version__} on {device}, "
            f"Python {platform.python_version()}")


def load_engine(source, random_weights: Optional[str] = None, layers: Optional[int] = None,
                dtype: str = "bfloat16", quantize_bits: Optional[int] = None):
    """An engine for ``source`` (a family's source), or random weights of a named HiDream-O1 size
    (no download; for speed and memory; ``quantize_bits`` gets the same flat recipe as ``generate -q``).
    A family that loads phase by phase (HiDream-I1) loads its weights in :meth:`EvalRun.run`."""
    if random_weights is not None:
        return family_named("o1").random_engine(random_weights, layers, dtype, quantize_bits)
    if isinstance(source, (str, Path)):
        source = family_of(source).resolve(str(source))
    return family_named(source.family).load_engine(source, {"dtype": dtype, "bits": quantize_bits})


class EvalRun:
    """A run folder: refuses to mix in measurements of another model or setup (or a redefined
    variant), which would make its comparisons meaningless, and records each session."""

    def __init__(self, rundir: Path | str, identity: dict, variants: list[Variant], details: Optional[dict] = None):
        self.rundir = Path(rundir)
        self.rundir.mkdir(parents=True, exist_ok=True)
        path = self.rundir / RUN_FILE
        run = read_json_file(path, "eval run file") if path.is_file() else {}
        if not isinstance(run, dict):
            raise ValueError(f"{path}: eval run file is not a JSON object")
        for key, value in identity.items():
            if key in run.get("identity", {}) and run["identity"][key] != value:
                raise ValueError(f"{self.rundir} was run with {key}={run['identity'][key]!r}, not {value!r}; "
                                 f"use another --output folder")
        known = run.get("variants", {})
        for v in variants:
            if v.name in known and known[v.name] != v.spec():
                raise ValueError(f"{self.rundir}: variant {v.name!r} was {known[v.name]!r} there, now "
                                 f"{v.spec()!r}; rename the variant or use another --output folder")
        run.update(details or {})
        run["identity"] = {**run.get("identity", {}), **identity}
        run["variants"] = {**known, **{v.name: v.spec() for v in variants}}
        order = run.setdefault("variant_order", [])
        order += [v.name for v in variants if v.name not in order]
        run.setdefault("sessions", [])
        self.data = run
        self.session: dict = {}
        self.dropped = repair_results(self.rundir)

    def save(self) -> None:
        write_json(self.rundir / RUN_FILE, self.data)

    def start_session(self, engine) -> None:
        """Call right after loading: the process high-water mark so far is the load's peak."""
        self.session = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "load_time": engine.load_time,
                        "load_peak_rss": ru_maxrss_bytes(), "rss_after_load": psutil.Process().memory_info().rss,
                        "images": 0, "warmup_time": None}
        self.data["sessions"].append(self.session)
        self.data["machine"] = machine_description()
        # A phase-by-phase engine loads its weights after the prompts (see run); their bytes are recorded then.
        self.data["weight_bytes"] = engine.resident_bytes() or None
        self.data["rss_method"] = ("kernel high-water mark reset per image (/proc/self/clear_refs), "
                                   "with 5 ms psutil sampling" if reset_high_water()
                                   else "psutil RSS sampled every 5 ms, and ru_maxrss")
        self.save()

    def run(self, engine, jobs: list[Job], warmup: bool = False,
            on_image: Optional[Callable[[int, int, dict], None]] = None, on_step=None) -> list[dict]:
        """Run what is not finished yet and return the new records.

        ``on_image(done, todo, record)`` is called once an image's line is safely on disk; an
        exception raised there (KeyboardInterrupt, say) stops the run with that image kept.
        """
        todo = self.pending(engine, jobs)
        if todo:
            self._prepare(engine, [request for _, request in todo])
        if todo and warmup:
            self.session["warmup_time"] = warm_up(engine, todo[0][1])
            self.save()
        rss, records = PeakRss(), []
        for done, (job, request) in enumerate(todo, start=1):
            switch_loras(engine, job.item.loras)  # a no-op while consecutive jobs share them
            with rss.measure():
                result = engine.run(request, on_step)
            record = self._store(job, request, result, rss)
            records.append(record)
            self.session["images"] += 1
            self.save()
            if on_image is not None:
                on_image(done, len(todo), record)
        return records

    def _prepare(self, engine, requests: list) -> None:
        """The engine's work before the first image (HiDream-I1: every prompt encoded, encoders freed,
        then the transformer loaded once); its load time and weight bytes go into the session."""
        engine.prepare(requests, lambda line: None)
        self.session["load_time"] = engine.load_time
        self.data["weight_bytes"] = engine.resident_bytes() or None
        self.save()

    def pending(self, engine, jobs: list[Job]) -> list[tuple[Job, object]]:
        """The jobs with no finished result for their exact settings, with their requests."""
        finished = read_results(self.rundir)
        requests = [(job, checked_request(job, engine)) for job in jobs]  # bad settings fail here
        return [(job, req) for job, req in requests if not is_done(finished.get(job.key), req, self.rundir)]

    def _store(self, job: Job, request, result, rss: PeakRss) -> dict:
        image_path = self.rundir / job.image_path
        image_path.parent.mkdir(parents=True, exist_ok=True)
        save_image(result.image, image_path, image_metadata(job, result), overwrite=True)
        record = make_record(job, request, result, rss, sha256_file(image_path))
        append_result(self.rundir, record)
        return record

    def store_remote(self, record: dict, png: bytes) -> dict:
        """Write an image made by another rank (its bytes, checked against its hash), then its line."""
        if hashlib.sha256(png).hexdigest() != record["sha256"]:
            raise ValueError(f"{record['key']}: the image from rank {record['rank']} arrived damaged")
        image_path = self.rundir / record["image"]
        image_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(image_path, overwrite=True) as tmp:
            tmp.write_bytes(png)
        append_result(self.rundir, record)
        self.session["images"] += 1
        return record


def image_metadata(job: Job, result) -> dict:
    return {**result.metadata, "eval_variant": job.variant.name, "eval_id": job.item.id}


def make_record(job: Job, request, result, rss: PeakRss, sha256: str, rank: int = 0,
                host: Optional[str] = None) -> dict:
    """One ``results.jsonl`` row: what ran, where (rank and host), and what it measured."""
    return {
        "key": job.key, "variant": job.variant.name, "id": job.item.id, "genre": job.item.genre,
        "seed": job.seed, "prompt": job.item.prompt, "width": request.width, "height": request.height,
        "size_note": request.size_note, "recipe": request.recipe.name, "steps": request.recipe.steps,
        "guidance": request.recipe.guidance, "variant_overrides": job.variant.spec(),
        "settings": request.metadata(), "model": result.metadata.get("model"),
        "dtype": result.metadata.get("dtype"), "quantization": result.metadata.get("quantization"),
        "loras": result.metadata.get("loras", []),
        "image": job.image_path, "sha256": sha256, "rank": rank, "host": host or socket.gethostname(),
        "step_times": result.step_times, "seconds_per_step": statistics.median(result.step_times),
        "seam_passes": request.seam_passes, "grid_energy": grid_energy_axes(result.image),
        "encode_time": result.encode_time, "total_time": result.total_time,
        "peak_rss_bytes": rss.peak, "process_max_rss_bytes": rss.process_max,
        "mlx_peak_bytes": int(result.peak_memory), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def is_done(record: Optional[dict], request, rundir: Path) -> bool:
    """Finished with these exact settings, and its image is still there."""
    if record is None or not (rundir / record["image"]).is_file():
        return False
    return json.dumps(record["settings"], sort_keys=True) == json.dumps(request.metadata(), sort_keys=True)


def warm_up(engine, request) -> float:
    """One short untimed generation at the first job's size, so one-time costs (allocations,
    kernel setup) stay out of the first measured image."""
    recipe = request.recipe.with_overrides(steps=min(2, request.recipe.steps))
    start = time.perf_counter()
    # Text-to-image: a start image's strength could run no step of the shortened recipe. Only the
    # request's own fields are replaced (a family whose requests never blend seams has no such field).
    changes = {"recipe": recipe, "blend_seams": 0, "start": None}
    fields = {f.name for f in dataclasses.fields(request)}
    engine.run(dataclasses.replace(request, **{k: v for k, v in changes.items() if k in fields}))
    return time.perf_counter() - start
