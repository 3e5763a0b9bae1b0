"""Many images per load: the jobs a command line asks for, and the files they will write.

A batch is a list of (prompt, seed, settings) jobs from repeated ``--seed``, ``--count N`` and
``--prompt-file`` (one prompt per line, or JSONL objects whose keys are named like the CLI
options with underscores). Every job's request and output path is checked before the model
loads; two jobs that would write the same file are refused.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from hidream_mlx.files import check_output_path, parse_json, read_text_file
from hidream_mlx.images import image_format
from hidream_mlx.family import SEED_MAX, RequestError, check_number
from hidream_mlx.requests import build_request, kind_error

# Per-line settings a JSONL prompt file may carry (build_request's options, plus the prompt).
LINE_KEYS = ("prompt", "seed", "width", "height", "no_snap", "recipe", "preset", "steps", "guidance", "shift",
             "noise_scale", "s_noise", "noise_clip", "noise", "blend_seams", "seam_smoothing", "seam_window",
             "seam_strength", "negative_prompt", "step_noise_seed", "init_image", "strength", "mask", "mask_blur")
# Per-line settings that name a file: a relative path is taken from the prompt file's folder.
PATH_KEYS = ("init_image", "mask")
PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
PLACEHOLDERS = ("seed", "n", "prompt")
SLUG_LENGTH = 40


@dataclass
class Job:
    n: int  # 1-based position in the batch
    prompt: str
    seed: int
    settings: dict = field(default_factory=dict)  # per-job options over the command line's
    output: Optional[Path] = None


def expand_seeds(seeds: tuple, count: Optional[int]) -> list[int]:
    """Seeds for one prompt: the given ones; with ``count`` the given one and the next count-1, or
    count random ones. No seed at all draws one (so an output name can show it)."""
    for seed in seeds:
        check_number("seed", seed)
    if count is None:
        return list(seeds) or [secrets.randbelow(SEED_MAX + 1)]
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise RequestError(f"--count must be a whole number >= 1, got {count}")
    if len(seeds) > 1:
        raise RequestError("--count takes at most one --seed (the first of the run)")
    if not seeds:
        return [secrets.randbelow(SEED_MAX + 1) for _ in range(count)]
    if seeds[0] + count - 1 > SEED_MAX:
        raise RequestError(f"--seed {seeds[0]} --count {count} runs past the largest seed {SEED_MAX}")
    return [seeds[0] + i for i in range(count)]


def read_prompt_file(path: Path | str) -> list[dict]:
    """One dict per prompt (``prompt`` plus any per-line settings); errors name the file and line."""
    path = Path(path)
    try:
        text = read_text_file(path, "prompt file")
    except (OSError, ValueError) as e:
        raise RequestError(str(e)) from None
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        where = f"{path}:{number}"
        if not line.startswith("{"):
            entries.append({"prompt": line, "line": where})
            continue
        try:
            entry = parse_json(line, where, "the line")
        except ValueError as e:
            raise RequestError(str(e)) from None
        if not isinstance(entry, dict):
            raise RequestError(f"{where}: not a JSON object")
        unknown = sorted(set(entry) - set(LINE_KEYS))
        if unknown:
            raise RequestError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(LINE_KEYS)})")
        entry = {k: v for k, v in entry.items() if v is not None}  # null: as if the key were absent
        if not isinstance(entry.get("prompt"), str) or not entry["prompt"].strip():
            raise RequestError(f"{where}: no \"prompt\" text")
        wrong = next((e for e in (kind_error(k, v) for k, v in entry.items()) if e), None)
        if wrong:
            raise RequestError(f"{where}: {wrong}")
        entries.append({**entry, **beside(path, entry, where), "line": where})
    if not entries:
        raise RequestError(f"{path}: no prompts in this file (it is empty)")
    return entries


def beside(path: Path, entry: dict, where: str) -> dict:
    """The entry's file settings (:data:`PATH_KEYS`) with relative paths taken from ``path``'s folder."""
    files = {}
    for key in PATH_KEYS:
        if entry.get(key) is None:
            continue
        if not isinstance(entry[key], str) or not entry[key].strip():
            raise RequestError(f"{where}: \"{key}\" must be an image file path, got {entry[key]!r}")
        files[key] = str(path.parent / entry[key])  # an absolute path stays as it is
    return files


def plan_jobs(prompt: Optional[str], prompt_file, seeds: tuple, count: Optional[int]) -> list[Job]:
    """Every (prompt, seed, settings) job, in order: each prompt with each seed."""
    if prompt is not None and prompt_file is not None:
        raise RequestError("give --prompt or --prompt-file, not both")
    if prompt is None and prompt_file is None:
        raise RequestError("--prompt is required (or --prompt-file, or --from-image)")
    entries = read_prompt_file(prompt_file) if prompt_file is not None else [{"prompt": prompt}]
    jobs = []
    for entry in entries:
        settings = {k: v for k, v in entry.items() if k not in ("prompt", "seed", "line")}
        try:
            line_seeds = expand_seeds((entry["seed"],), None) if "seed" in entry else expand_seeds(seeds, count)
        except RequestError as e:
            raise RequestError(f"{entry['line']}: {e}" if "seed" in entry else str(e)) from None
        for seed in line_seeds:
            jobs.append(Job(len(jobs) + 1, entry["prompt"], seed, {**settings, "line": entry.get("line")}))
    return jobs


def slug(prompt: str) -> str:
    """A short file-name-safe form of a prompt: lowercase words joined by '-'."""
    text = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    return text[:SLUG_LENGTH].rstrip("-") or "prompt"


def output_names(template: Path | str, jobs: list[Job]) -> list[Path]:
    """The file each job writes: ``{seed}``, ``{n}``, ``{prompt}`` filled in; several jobs and no
    placeholder give ``name-{n}.ext``. Two jobs sharing a name are refused."""
    template = str(template)
    for name in PLACEHOLDER.findall(template):
        if name not in PLACEHOLDERS:
            raise RequestError(f"-o {template}: unknown placeholder {{{name}}}; use {{seed}}, {{n}} or {{prompt}}")
    if len(jobs) > 1 and not PLACEHOLDER.search(template):
        path = Path(template)
        template = str(path.with_name(f"{path.stem}-{{n}}{path.suffix}"))
    names = []
    for job in jobs:
        values = {"seed": str(job.seed), "n": str(job.n), "prompt": slug(job.prompt)}
        names.append(Path(PLACEHOLDER.sub(lambda m: values[m.group(1)], template)))
    seen: dict[Path, int] = {}
    for job, name in zip(jobs, names):
        if name in seen:
            raise RequestError(f"-o {template}: images {seen[name]} and {job.n} would both be written to {name}; "
                               "add {seed}, {n} or {prompt} to the name")
        seen[name] = job.n
    return names


def preview_path(output: Path, step: int) -> Path:
    """Where the x0 preview after ``step`` (1-based) of ``output`` goes: ``out.step007.png``."""
    return output.with_name(f"{output.stem}.step{step:03d}{output.suffix}")


def preview_paths(output: Path, steps: int, every: int) -> list[Path]:
    """Every preview a run of ``steps`` writes with ``--preview-every every`` (none after the last step)."""
    return [preview_path(output, s) for s in range(every, steps, every)] if every else []


def check_outputs(paths: list[Path], overwrite: bool) -> None:
    """Every target writable and of a known format, before anything loads."""
    for path in paths:
        check_output_path(path, overwrite)
        image_format(path)


def make_request(source, options: dict, note=None):
    """``build_request`` with a job's (or a request body's) options, named as its parameters."""
    return build_request(source, note=note, **options)


def build_requests(source, jobs: list[Job], options: dict, note=None) -> list:
    """A checked request per job: the command line's options, then the job's own settings."""
    requests = []
    for job in jobs:
        settings = {k: v for k, v in job.settings.items() if k != "line"}
        try:
            requests.append(make_request(source, {**options, **settings, "prompt": job.prompt, "seed": job.seed},
                                         note))
        except ValueError as e:
            where = job.settings.get("line")
            raise RequestError(f"{where}: {e}" if where else str(e)) from None
    return requests
