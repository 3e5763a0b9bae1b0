"""One battery over several Macs: ``mlx.launch`` starts a rank per host, ``mx.distributed``
(ring backend) carries the control messages and the finished images back to rank 0.

Work distribution is **lockstep rounds over collectives**, sized by measured speed. Each round
rank 0 hands every rank a batch of job keys (broadcast), every rank runs its batch, and one
all-gather brings back the rows and PNG bytes; rank 0 writes them. The first round gives every
rank one job, which measures each rank's speed (pixel-steps per second); later rounds give
each rank as many jobs as it finishes in the time the slowest rank needs for about
:data:`ROUND_JOBS` jobs, so a fast Mac and a slow one finish a round together and neither
idles for long. We chose this over a separate control socket because ``mx.distributed`` then
carries everything (launch, dispatch, gathering), no extra port or firewall rule is needed,
and a lost host shows up as an error in the very next collective (the ring backend raises
"connection to a peer was lost"; ``mlx.launch`` also stops the other ranks). The price is a
short wait at each round's end, bounded by one job of the slowest host. The gather is an
all-gather (the ring backend's send/receive reach neighbours only), so every rank also receives
the others' PNGs: a few MB per image, which a battery's minutes per image dwarf.

Only rank 0 holds the run folder: it locks it, works out what is still to do (resume), writes
its own images as they finish and the other ranks' at each round's end. A round cut short by
a failing host loses only that round's jobs on the other ranks; they are named, and a rerun
(on any number of hosts) makes exactly them. Every rank computes an image from its seed alone,
so which rank ran a job never changes its pixels.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import numpy as np

from hidream_mlx.files import read_json_file
from hidream_mlx.harness.evaluation import Job, image_metadata, make_record
from hidream_mlx.images import save_image
from hidream_mlx.memory import PeakRss

ROUND_JOBS = 2  # the slowest rank's share of a round, in jobs: small rounds lose little to a failure


class HostLost(ValueError):
    """A rank stopped mid-run; the message names the jobs whose results were lost."""


def launched_rank() -> bool:
    """True inside a process that ``mlx.launch`` started as part of a group of several."""
    hostfile = os.environ.get("MLX_HOSTFILE")
    return "MLX_RANK" in os.environ and bool(hostfile) and Path(hostfile).is_file() and \
        Path(hostfile).stat().st_size > 2


def init_group():
    return mx.distributed.init(backend="ring", strict=True)


# --- launching -----------------------------------------------------------------------------------

def launcher_hosts(hosts: str) -> list[str]:
    """``--hosts`` as ``mlx.launch`` arguments: an existing file is its JSON hostfile, anything
    else a comma list of IP addresses (``localhost`` means 127.0.0.1; the ring backend wants IPs)."""
    if Path(hosts).is_file():
        entries = read_json_file(hosts, "--hosts file")
        if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
            raise ValueError(f"{hosts}: an mlx.launch hostfile is a JSON list of host objects "
                             '(like [{"ssh": "mini.local", "ips": ["10.0.0.2"]}, ...])')
        return ["--hostfile", str(hosts)]
    names = [h.strip() for h in hosts.split(",")]
    if len(names) < 2 or not all(names):
        raise ValueError(f"--hosts wants a hostfile or a comma list of at least two addresses, got {hosts!r}")
    return ["--hosts", ",".join("127.0.0.1" if h == "localhost" else h for h in names)]


def launch_command(hosts: str, eval_args: list[str]) -> list[str]:
    """``mlx.launch`` running ``hidream-mlx eval ARGS`` once per host, with this Python."""
    entry = "from hidream_mlx.cli import main; main(prog_name='hidream-mlx')"
    launcher = "from mlx._distributed_utils.launch import main; main()"  # what the mlx.launch script runs
    return [sys.executable, "-c", launcher, "--backend", "ring", *launcher_hosts(hosts),
            "--", sys.executable, "-c", entry, "eval", *eval_args]


# --- collectives on bytes --------------------------------------------------------------------------

def gather_bytes(group, data: bytes) -> list[bytes]:
    """Every rank's ``data``, in rank order, on every rank (two all-gathers: lengths, then bytes).

    Each piece travels with its hash: after losing a peer the ring backend can hand back
    zeros instead of raising, and that must read as a lost peer, never as data."""
    data = hashlib.sha256(data).digest()[:8] + data
    lengths = mx.distributed.all_gather(mx.array([len(data)], dtype=mx.int32), group=group)
    lengths = np.array(lengths).tolist()
    width = max(1, max(lengths))
    buffer = np.zeros(width, dtype=np.uint8)
    buffer[:len(data)] = np.frombuffer(data, dtype=np.uint8)
    rows = np.array(mx.distributed.all_gather(mx.array(buffer), group=group)).reshape(group.size(), width)
    pieces = [rows[r, :n].tobytes() for r, n in enumerate(lengths)]
    for rank, piece in enumerate(pieces):
        if len(piece) < 8 or hashlib.sha256(piece[8:]).digest()[:8] != piece[:8]:
            raise RuntimeError(f"[ring] damaged data from rank {rank}: a peer was lost")
    return [piece[8:] for piece in pieces]


def gather_json(group, value) -> list:
    return [json.loads(b) for b in gather_bytes(group, json.dumps(value, sort_keys=True).encode("utf-8"))]


def broadcast_json(group, value):
    """Rank 0's ``value`` on every rank."""
    return gather_json(group, value if group.rank() == 0 else None)[0]


def agree(group, problem: Optional[str]) -> None:
    """Every rank says whether it can go on; if any cannot, all stop: rank 0 with every rank's
    reason (one error line), the others quietly (so the reason is not printed once per host)."""
    problems = gather_json(group, None if problem is None else f"{socket.gethostname()} (rank {group.rank()}): "
                                                               f"{problem}")
    lines = [p for p in problems if p]
    if lines:
        if group.rank() != 0:
            raise SystemExit(1)
        raise ValueError("; ".join(lines))


# --- inputs present on every host ----------------------------------------------------------------

def fingerprint(path: Path) -> str:
    """Cheap identity of an input: a file's hash (batteries are small), a folder's names and sizes."""
    if path.is_dir():
        listing = sorted((str(p.relative_to(path)), p.stat().st_size) for p in path.rglob("*") if p.is_file())
        return hashlib.sha256(json.dumps(listing).encode("utf-8")).hexdigest()
    if path.stat().st_size > (64 << 20):
        return f"size {path.stat().st_size}"
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_inputs(group, candidates: list[Optional[str]]) -> None:
    """Inputs are read at the same path on every host: the local paths rank 0 has (a repo id is
    not a path and resolves from each host's own cache) must exist, and be the same, everywhere."""
    host = socket.gethostname()
    local = [str(p) for p in candidates if p is not None and Path(p).exists()] if group.rank() == 0 else None
    paths = broadcast_json(group, local)
    mine = {p: fingerprint(Path(p)) if Path(p).exists() else None for p in paths}
    reports = gather_json(group, {"host": host, "prints": mine})
    reference = reports[0]["prints"]
    problems = []
    for rank, report in enumerate(reports[1:], start=1):
        missing = [p for p, fp in report["prints"].items() if fp is None]
        differ = [p for p, fp in report["prints"].items() if fp is not None and fp != reference[p]]
        where = f"host {report['host']} (rank {rank})"
        if missing:
            problems.append(f"{where} lacks {', '.join(missing)}")
        if differ:
            problems.append(f"{where} has a different {', '.join(differ)} than rank 0")
    if problems:
        if group.rank() != 0:
            raise SystemExit(1)
        raise ValueError("inputs must exist at the same path on every host: " + "; ".join(problems))


def check_same_jobs(group, jobs: list[Job]) -> None:
    """Every rank must have planned the same jobs with the same settings (same battery, variants)."""
    digest = hashlib.sha256(json.dumps([[j.key, j.variant.spec(), j.item.prompt] for j in jobs]).encode()).hexdigest()
    hosts = gather_json(group, [socket.gethostname(), digest])
    odd = [f"{h} (rank {r})" for r, (h, d) in enumerate(hosts) if d != hosts[0][1]]
    if odd:
        if group.rank() != 0:
            raise SystemExit(1)
        raise ValueError(f"{', '.join(odd)} planned other jobs than rank 0: give every host the same battery "
                         f"and variants")


# --- rounds --------------------------------------------------------------------------------------

def job_cost(request) -> float:
    return float(request.width * request.height * request.run_steps)


def plan_round(queue: list[tuple[str, float]], speeds: list[Optional[float]]) -> list[list[str]]:
    """Take jobs from the front of ``queue`` (key, cost) for each rank: one each while any speed
    is unknown, then greedily to the least-loaded rank until each has about ROUND_JOBS jobs'
    worth of the slowest rank's time."""
    plan: list[list[str]] = [[] for _ in speeds]
    if any(s is None for s in speeds):
        for r in range(len(speeds)):
            if queue:
                plan[r].append(queue.pop(0)[0])
        return plan
    mean_cost = sum(c for _, c in queue) / max(1, len(queue))
    target = ROUND_JOBS * mean_cost / min(speeds)
    loads = [0.0] * len(speeds)
    while queue:
        r = min(range(len(speeds)), key=lambda i: loads[i])
        seconds = queue[0][1] / speeds[r]
        if loads[r] > 0 and loads[r] + seconds > target * (1 + 1e-9):  # full; every rank gets at least one
            break
        plan[r].append(queue.pop(0)[0])
        loads[r] += seconds
    return plan


def png_bytes(job: Job, result) -> bytes:
    """The exact file rank 0 would have written (same metadata), as bytes to send."""
    with tempfile.TemporaryDirectory(prefix="hidream-eval-") as tmp:
        path = save_image(result.image, Path(tmp) / "image.png", image_metadata(job, result))
        return path.read_bytes()


def _pack(rows: list[tuple[dict, bytes]], elapsed: float, cost: float) -> bytes:
    header = json.dumps({"records": [r for r, _ in rows], "sizes": [len(b) for _, b in rows],
                         "elapsed": elapsed, "cost": cost}).encode("utf-8")
    return len(header).to_bytes(8, "little") + header + b"".join(b for _, b in rows)


def _unpack(data: bytes) -> tuple[list[tuple[dict, bytes]], float, float]:
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    rows, offset = [], 8 + n
    for record, size in zip(header["records"], header["sizes"]):
        rows.append((record, data[offset:offset + size]))
        offset += size
    return rows, header["elapsed"], header["cost"]


def lost_line(in_flight: list[str]) -> str:
    """What rank 0 says when the group breaks: the jobs of the round in progress with no result."""
    lost = ", ".join(in_flight) if in_flight else "none, every finished image is written"
    return f"jobs lost (no result, made again on rerun): {lost}"


def run_ranks(group, engine, jobs: list[Job], run=None, on_image: Optional[Callable[[int, int, dict], None]] = None,
              in_flight: Optional[list[str]] = None) -> list[dict]:
    """The round loop, on every rank; ``run`` (the locked :class:`EvalRun`) only on rank 0.
    Returns the rows written (rank 0) or made (other ranks). ``in_flight`` is kept, at every
    moment, as the jobs handed out but not yet written: if the run is stopped (mlx.launch
    sends SIGTERM to rank 0 as soon as another rank dies), the caller names them from it."""
    rank, size, host = group.rank(), group.size(), socket.gethostname()
    in_flight = [] if in_flight is None else in_flight
    by_key = {job.key: job for job in jobs}
    requests = {job.key: job.request(engine) for job in jobs}
    queue = [(job.key, job_cost(req)) for job, req in run.pending(engine, jobs)] if rank == 0 else []
    todo = len(queue)
    speeds: list[Optional[float]] = [None] * size
    totals = [[0.0, 0.0] for _ in range(size)]  # per rank: cost done, seconds spent
    records, rss = [], PeakRss()
    while True:
        try:
            plan = broadcast_json(group, plan_round(queue, speeds) if rank == 0 else None)
            if not any(plan):
                return records
            in_flight[:] = [k for keys in plan for k in keys]
            rows, start, cost = [], time.perf_counter(), 0.0
            for key in plan[rank]:
                job, request = by_key[key], requests[key]
                with rss.measure():
                    result = engine.run(request)
                cost += job_cost(request)
                if rank == 0:
                    record = run._store(job, request, result, rss)
                    run.session["images"] += 1
                    run.save()
                    in_flight.remove(key)
                    records.append(record)
                    if on_image is not None:
                        on_image(len(records), todo, record)
                else:
                    png = png_bytes(job, result)
                    rows.append((make_record(job, request, result, rss, hashlib.sha256(png).hexdigest(), rank, host),
                                 png))
            gathered = gather_bytes(group, _pack(rows, time.perf_counter() - start, cost))
            if rank != 0:
                records += [r for r, _ in rows]
                continue
            for r, data in enumerate(gathered):
                got, elapsed, spent = _unpack(data)
                if spent > 0 and elapsed > 0:
                    totals[r][0] += spent
                    totals[r][1] += elapsed
                    speeds[r] = totals[r][0] / totals[r][1]
                for record, png in got:
                    records.append(run.store_remote(record, png))
                    run.save()
                    in_flight.remove(record["key"])
                    if on_image is not None:
                        on_image(len(records), todo, record)
        except RuntimeError as e:
            if "[ring]" not in str(e):
                raise
            if rank != 0:
                raise HostLost(f"rank {rank} lost its connection ({e}); rank 0's run folder keeps every image it "
                               f"wrote, rerun the same command there to make the rest") from None
            raise HostLost(f"a host stopped mid-run ({e}); every image written is kept, rerun the same command "
                           f"to make the rest") from None
