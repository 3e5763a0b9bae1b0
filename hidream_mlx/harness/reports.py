"""What an eval run says: ``report.md``, a labelled contact sheet, and run-vs-run image metrics.

Timing summaries are medians (robust to one slow image); speed-ups are the baseline variant's
median time divided by each variant's, as in the seeds' tables. Sizes are GiB/MiB (powers of 2).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from hidream_mlx.harness.evaluation import RUN_FILE, read_results
from hidream_mlx.files import atomic_output, read_json_file
from hidream_mlx.memory import format_bytes
from hidream_mlx.harness.grid import grid_energy

REPORT_FILE = "report.md"
THUMB = 256  # contact-sheet thumbnails fit in THUMB x THUMB
LABEL_HEIGHT = 28


def read_run(rundir: Path | str) -> dict:
    path = Path(rundir) / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{rundir}: not an eval run folder (no {RUN_FILE})")
    run = read_json_file(path, "eval run file")
    if not isinstance(run, dict):
        raise ValueError(f"{path}: eval run file is not a JSON object")
    return run


def ordered_records(run: dict, records: dict[str, dict]) -> list[dict]:
    """Records in variant order (the run's), then by prompt id and seed."""
    order = {name: i for i, name in enumerate(run.get("variant_order", []))}
    return sorted(records.values(), key=lambda r: (order.get(r["variant"], len(order)), r["id"], r["seed"]))


def baseline_name(run: dict, records: list[dict], requested: Optional[str] = None) -> Optional[str]:
    present = list(dict.fromkeys(r["variant"] for r in records))
    if requested is not None:
        if requested not in present:
            raise ValueError(f"--baseline {requested!r} is not a variant of this run; "
                             f"choose one of {', '.join(present) or '(none finished)'}")
        return requested
    return present[0] if present else None


def variant_summary(records: list[dict], baseline: Optional[str]) -> list[dict]:
    by_variant: dict[str, list[dict]] = {}
    for r in records:
        by_variant.setdefault(r["variant"], []).append(r)
    rows = []
    for name, rs in by_variant.items():
        rows.append({
            "variant": name,
            "settings": rs[0]["variant_overrides"],
            "images": len(rs),
            "total_time": statistics.median(r["total_time"] for r in rs),
            "seconds_per_step": statistics.median(r["seconds_per_step"] for r in rs),
            "peak_rss_bytes": statistics.median(r["peak_rss_bytes"] for r in rs),
            "mlx_peak_bytes": statistics.median(r["mlx_peak_bytes"] for r in rs),
        })
    base = next((row for row in rows if row["variant"] == baseline), None)
    for row in rows:
        row["speedup"] = base["total_time"] / row["total_time"] if base and row["total_time"] > 0 else None
    return rows


def seconds(value: float) -> str:
    """Enough digits for both a 0.004 s test image and a 270 s one."""
    return f"{value:.2f} s" if value >= 1 else f"{value:.3g} s"


def _size(record: dict) -> str:
    bucket = " (bucket)" if "official bucket" in record.get("size_note", "") else ""
    return f"{record['width']}x{record['height']}{bucket}"


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _grid(record: dict) -> str:
    g = record.get("grid_energy")
    return f"{_num(g['y'], '.2f')}/{_num(g['x'], '.2f')}" if g else "—"


def render_report(run: dict, records: list[dict], baseline: Optional[str], sheet: Optional[str]) -> str:
    identity = run.get("identity", {})
    out = [f"# Eval: {identity.get('battery', '?')} on {identity.get('model', '?')}", ""]
    facts = [("model", identity.get("model")), ("dtype", identity.get("dtype")),
             ("quantization", identity.get("quantize") or "none"), ("battery", run.get("battery_path")),
             ("machine", run.get("machine")), ("weights", run.get("weight_bytes") and format_bytes(run["weight_bytes"])),
             ("peak RSS method", run.get("rss_method"))]
    out += [f"- **{k}**: {v}" for k, v in facts if v]
    for i, s in enumerate(run.get("sessions", []), start=1):
        warm = f", warm-up {s['warmup_time']:.2f} s" if s.get("warmup_time") is not None else ""
        out.append(f"- **session {i}** ({s.get('started', '?')}): model load {s.get('load_time', 0):.2f} s "
                   f"(not in any image's time){warm}, peak RSS while loading {format_bytes(s.get('load_peak_rss', 0))}, "
                   f"{s.get('images', 0)} images")
    out += ["", "Times are wall-clock with every step forced by `mx.eval`; an image's time includes prompt "
            "encoding. Peak RSS is this process's resident high-water mark during the image; MLX peak is "
            "`mx.get_peak_memory()`, reset per image.", ""]
    if not records:
        return "\n".join(out + ["No images finished yet.", ""])

    out += ["## Variants", ""]
    rows = []
    for row in variant_summary(records, baseline):
        mark = " (baseline)" if row["variant"] == baseline else ""
        speed = f"{row['speedup']:.2f}x" if row["speedup"] is not None else "—"
        overrides = row["settings"].partition(":")[2] or "(as the battery says)"
        rows.append([f"`{row['variant']}`{mark}", f"`{overrides}`", row["images"],
                     seconds(row["total_time"]), seconds(row["seconds_per_step"]), speed,
                     format_bytes(row["peak_rss_bytes"]), format_bytes(row["mlx_peak_bytes"])])
    out += [_table(["variant", "settings", "images", "median time", "median s/step", f"vs. {baseline}",
                    "median peak RSS", "median MLX peak"], rows), ""]

    out += ["## Images", ""]
    rows = [[r["id"], r.get("genre", ""), f"`{r['variant']}`", r["seed"], _size(r),
             r["recipe"], r["steps"], f"{r['guidance']:g}", seconds(r["total_time"]),
             seconds(r["seconds_per_step"]), format_bytes(r["peak_rss_bytes"]),
             format_bytes(r["mlx_peak_bytes"]), _grid(r), r.get("seam_passes", 0),
             f"[png]({r['image']})"] for r in records]
    out += [_table(["id", "genre", "variant", "seed", "size", "recipe", "steps", "guidance", "time", "s/step",
                    "peak RSS", "MLX peak", "grid y/x", "seam passes", "image"], rows),
            "", "grid y/x: mean step across the 32 px seams over the mean step elsewhere, per axis (1 = no grid); "
            "seam passes: extra transformer passes of `seam_smoothing`.", ""]
    if sheet:
        out += ["## Contact sheet", "", f"![contact sheet]({sheet})", ""]
    return "\n".join(out)


def _fit(image: Image.Image, box: int) -> Image.Image:
    scale = min(box / image.width, box / image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    # Small test images are enlarged: keep their pixels sharp rather than smear them.
    resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS
    return image.resize(size, resample)


def contact_sheet(rundir: Path, records: list[dict]) -> Image.Image:
    """Rows of prompts (id, seed) by columns of variants; with one variant, a plain grid."""
    variants = list(dict.fromkeys(r["variant"] for r in records))
    if len(variants) > 1:
        rows = list(dict.fromkeys((r["id"], r["seed"]) for r in records))
        cell = {((r["id"], r["seed"]), r["variant"]): r for r in records}
        grid = [[cell.get((row, v)) for v in variants] for row in rows]
    else:
        cols = math.ceil(math.sqrt(len(records)))
        grid = [records[i:i + cols] for i in range(0, len(records), cols)]
    n_cols = max(len(row) for row in grid)
    sheet = Image.new("RGB", (n_cols * THUMB, len(grid) * (THUMB + LABEL_HEIGHT)), "white")
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default()
    for y, row in enumerate(grid):
        for x, record in enumerate(row):
            if record is None:
                continue
            left, top = x * THUMB, y * (THUMB + LABEL_HEIGHT)
            with Image.open(rundir / record["image"]) as im:
                thumb = _fit(im.convert("RGB"), THUMB)
            sheet.paste(thumb, (left + (THUMB - thumb.width) // 2, top + (THUMB - thumb.height) // 2))
            draw.text((left + 4, top + THUMB + 2), f"{record['id']} | seed {record['seed']}", fill="black", font=font)
            draw.text((left + 4, top + THUMB + 14), f"{record['variant']} | {seconds(record['total_time'])}",
                      fill="dimgray", font=font)
    return sheet


def write_reports(rundir: Path | str, baseline: Optional[str] = None) -> Path:
    """(Re)write ``report.md`` and the contact sheet from what ``rundir`` holds now."""
    rundir = Path(rundir)
    run = read_run(rundir)
    records = ordered_records(run, read_results(rundir))
    chosen = baseline_name(run, records, baseline or run.get("baseline"))
    sheet_name = None
    if records:
        sheet_name = f"contact_{run.get('identity', {}).get('battery', 'battery')}.png"
        sheet = contact_sheet(rundir, records)
        with atomic_output(rundir / sheet_name, overwrite=True) as tmp:
            sheet.save(tmp, format="PNG")
    path = rundir / REPORT_FILE
    with atomic_output(path, overwrite=True) as tmp:
        tmp.write_text(render_report(run, records, chosen, sheet_name), encoding="utf-8")
    return path


# --- comparing two runs ----------------------------------------------------------------------------

def image_metrics(a: np.ndarray, b: np.ndarray) -> dict:
    """B against A: mean absolute difference and PSNR (0-255 scale; None when sizes differ),
    mean-brightness shift (B - A, 0-255 levels) and the 32 px grid-energy ratio B/A."""
    fa, fb = a.astype(np.float64), b.astype(np.float64)
    same_size = a.shape == b.shape
    mse = float(np.mean((fa - fb) ** 2)) if same_size else None
    energy_a, energy_b = grid_energy(a), grid_energy(b)
    return {
        "mad": float(np.mean(np.abs(fa - fb))) if same_size else None,
        "psnr": (math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)) if same_size else None,
        "brightness_shift": float(fb.mean() - fa.mean()),
        "grid_energy_a": energy_a,
        "grid_energy_b": energy_b,
        "grid_energy_ratio": energy_b / energy_a if energy_a > 0 else math.inf,
    }


def match_records(a: dict[str, dict], b: dict[str, dict], ignore_seed: bool = False) -> list[tuple[dict, dict]]:
    """Pairs of the same prompt id and seed. When both runs have several variants, the variant
    name must match too; otherwise the single variant of one run faces each of the other's.
    ``ignore_seed`` pairs every seed with every seed of the same prompt: the difference two
    seeds make is the scale against which a setting's difference can be judged."""
    variants_a = {r["variant"] for r in a.values()}
    variants_b = {r["variant"] for r in b.values()}
    by_variant = len(variants_a) > 1 and len(variants_b) > 1

    def key(r):
        seed = () if ignore_seed else (r["seed"],)
        return (r["id"], *seed, *((r["variant"],) if by_variant else ()))

    pairs = []
    for ra in sorted(a.values(), key=lambda r: (r["id"], r["seed"], r["variant"])):
        pairs += [(ra, rb) for rb in sorted(b.values(), key=lambda r: (r["variant"], r["seed"])) if key(rb) == key(ra)]
    return pairs


def _load(rundir: Path, record: dict) -> np.ndarray:
    with Image.open(rundir / record["image"]) as im:
        return np.asarray(im.convert("RGB"))


def mismatches(ra: dict, rb: dict, ignore_seed: bool = False) -> list[str]:
    """What makes a pair matched by id not the same picture request: another prompt, seed
    (unless seeds are meant to differ) or size."""
    found = []
    if ra["prompt"] != rb["prompt"]:
        found.append("prompt")
    if ra["seed"] != rb["seed"] and not ignore_seed:
        found.append("seed")
    if (ra["width"], ra["height"]) != (rb["width"], rb["height"]):
        found.append("size")
    return found


def compare_runs(run_a: Path | str, run_b: Path | str, ignore_seed: bool = False,
                 allow_mismatch: bool = False) -> list[dict]:
    """Metrics per pair matched by id. Pairs whose prompt, seed or size differ are refused,
    or with ``allow_mismatch`` kept and marked in their ``mismatch`` field."""
    run_a, run_b = Path(run_a), Path(run_b)
    read_run(run_a), read_run(run_b)
    pairs = match_records(read_results(run_a), read_results(run_b), ignore_seed)
    if not pairs:
        what = "prompt id" if ignore_seed else "prompt id and seed (--ignore-seed matches by id alone)"
        raise ValueError(f"{run_a} and {run_b} have no images with the same {what}")
    marks = [mismatches(ra, rb, ignore_seed) for ra, rb in pairs]
    bad = [f"{ra['id']} ({', '.join(m)})" for (ra, _), m in zip(pairs, marks) if m]
    if bad and not allow_mismatch:
        raise ValueError(f"{run_a} and {run_b} are not the same battery: {len(bad)} images matched by id differ "
                         f"in prompt, seed or size: {', '.join(bad[:6])}{', ...' if len(bad) > 6 else ''}; "
                         f"--allow-mismatch compares them anyway, marked")
    return [{"id": ra["id"], "seed": ra["seed"], "seed_b": rb["seed"], "variant_a": ra["variant"],
             "variant_b": rb["variant"], "mismatch": mark,
             "size_a": f"{ra['width']}x{ra['height']}", "size_b": f"{rb['width']}x{rb['height']}",
             **image_metrics(_load(run_a, ra), _load(run_b, rb))} for (ra, rb), mark in zip(pairs, marks)]


def _num(value: Optional[float], fmt: str) -> str:
    if value is None:
        return "n/a (sizes differ)"
    return "inf" if math.isinf(value) else format(value, fmt)


def render_comparison(run_a: Path | str, run_b: Path | str, rows: list[dict]) -> str:
    table = [[r["id"] + (f" (differs: {', '.join(r['mismatch'])})" if r.get("mismatch") else ""), r["seed"] if r["seed"] == r["seed_b"] else f"{r['seed']} / {r['seed_b']}", f"`{r['variant_a']}`", f"`{r['variant_b']}`", _num(r["mad"], ".2f"),
              _num(r["psnr"], ".2f"), f"{r['brightness_shift']:+.2f}", f"{r['grid_energy_a']:.3f}",
              f"{r['grid_energy_b']:.3f}", _num(r["grid_energy_ratio"], ".3f")] for r in rows]
    lines = [f"# Compare: A = `{run_a}`, B = `{run_b}`", "",
             "MAD and brightness shift in 0-255 levels (shift = mean B - mean A); PSNR in dB (inf = identical); "
             "grid energy: mean step across 32 px patch seams over the mean step inside patches (1 = no grid).",
             "",
             _table(["id", "seed", "variant A", "variant B", "MAD", "PSNR", "brightness shift", "grid A",
                     "grid B", "grid B/A"], table), ""]
    comparable = [r for r in rows if r["mad"] is not None]
    if comparable:
        lines.append(f"Median over {len(comparable)} same-size pairs: MAD "
                     f"{statistics.median(r['mad'] for r in comparable):.2f}, PSNR "
                     f"{_num(statistics.median(r['psnr'] for r in comparable), '.2f')} dB, brightness shift "
                     f"{statistics.median(r['brightness_shift'] for r in comparable):+.2f}, grid-energy ratio "
                     f"{_num(statistics.median(r['grid_energy_ratio'] for r in comparable), '.3f')}.")
        lines.append("")
    return "\n".join(lines)
