"""One worker thread renders jobs in order (one model, one device); others wait and see their place.

A job is one body (one or more images). Its progress is an append-only list of events that any
number of readers (SSE streams, a waiting POST) follow by index. Cancelling a queued job drops it;
cancelling a running one stops it at the next step boundary, before anything is written.

Whatever a job raises fails that job only (its ``failed`` event names the cause) and the worker
goes on with the model's LoRAs undone; should the thread itself end, every job still open fails
and :meth:`JobQueue.health` says so. Stopping (SIGTERM) cancels everything at once and does not
wait on a render inside the device: :meth:`JobQueue.close` gives it a few seconds, then the
caller may end the process, with :meth:`JobQueue.quiesce` first so no file is mid-write.
"""

from __future__ import annotations

import base64
import io
import itertools
import logging
import secrets
import threading
import time
from collections import deque
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from hidream_mlx.images import save_image
from hidream_mlx.server.fields import Spec
from hidream_mlx.weights.lora import switch_loras

PREVIEW_SIDE = 256
PREVIEW_QUALITY = 70
FINISHED = ("done", "failed", "cancelled")
# Failures callers can act on read as their message; anything else is named by its type too.
EXPECTED = (ValueError, OSError, MemoryError, RuntimeError)
log = logging.getLogger("hidream_mlx.server")


class Cancelled(Exception):
    """Raised from the step callback to unwind a running render."""


def jpeg_data_url(image: np.ndarray, side: int = PREVIEW_SIDE, quality: int = PREVIEW_QUALITY) -> str:
    pil = Image.fromarray(np.ascontiguousarray(image))
    pil.thumbnail((side, side))
    buffer = io.BytesIO()
    pil.save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def preview_interval(steps: int) -> int:
    """About eight previews per image: enough to watch, few enough to cost nothing."""
    return max(1, steps // 8)


class Job:
    def __init__(self, spec: Spec):
        self.id = secrets.token_hex(8)
        self.spec = spec
        self.state = "queued"
        self.events: list[dict] = []
        self.images: list[dict] = []  # {"file": name in the output folder, "metadata"}
        self.error: Optional[str] = None
        self.created = time.time()
        self.last_event = self.created  # when the job last showed progress (health's stuck check)
        self.cancel_requested = threading.Event()
        self.changed = threading.Condition()

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    def emit(self, kind: str, **data) -> None:
        with self.changed:
            self.events.append({"event": kind, "job": self.id, **data})
            self.last_event = time.time()
            self.changed.notify_all()

    def finish(self, state: str, **data) -> None:
        """End the job once: a later finish (the worker reaching a job already cancelled by a
        shutdown) changes nothing."""
        with self.changed:
            if self.finished:
                return
            self.state = state
            if state == "failed":
                self.error = data.get("error")
        self.emit(state, **data)

    def wait(self, timeout: Optional[float] = None) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: self.finished, timeout)

    def summary(self, position: Optional[int] = None) -> dict:
        return {"id": self.id, "state": self.state, "position": position, "error": self.error,
                "images": [{"file": i["file"], "metadata": i["metadata"]} for i in self.images]}


class JobQueue:
    """FIFO of jobs rendered by one thread with ``engine``; every image saved under ``output_dir``."""

    def __init__(self, engine, output_dir: Path, quantize_bits: Optional[int] = None, keep_finished: int = 200):
        self.engine = engine
        self.quantize_bits = quantize_bits
        self.output_dir = output_dir
        self.waiting: deque[Job] = deque()
        self.running: Optional[Job] = None
        self.jobs: dict[str, Job] = {}
        self.keep_finished = keep_finished
        self.lock = threading.Condition()
        self.closing = False
        self.stopped: Optional[str] = None  # why the worker thread ended, when it did
        self.writing = threading.Lock()  # held while an image file is written
        self.counter = itertools.count(1)
        self.thread = threading.Thread(target=self._work, name="hidream-render", daemon=True)
        self.thread.start()

    def submit(self, spec: Spec) -> Job:
        job = Job(spec)
        with self.lock:
            if self.closing:
                raise RuntimeError("the server is shutting down")
            if self.stopped is not None or not self.thread.is_alive():
                raise RuntimeError(f"the render worker has stopped ({self.stopped or 'it ended'}); restart the server")
            self.jobs[job.id] = job
            self.waiting.append(job)
            self._forget_old()
            self.lock.notify_all()
        job.emit("queued", position=self.position(job))
        return job

    def position(self, job: Job) -> Optional[int]:
        """0 while rendering, 1.. while waiting (how many jobs go first, plus one), None when finished."""
        with self.lock:
            if job is self.running:
                return 0
            for i, waiting in enumerate(self.waiting):
                if waiting is job:
                    return i + 1
        return None

    def get(self, job_id: str) -> Optional[Job]:
        with self.lock:
            return self.jobs.get(job_id)

    def cancel(self, job: Job) -> None:
        job.cancel_requested.set()
        with self.lock:
            if job in self.waiting:
                self.waiting.remove(job)
                dropped = True
            else:
                dropped = False
        if dropped:
            job.finish("cancelled")

    def close(self, timeout: float = 60.0) -> bool:
        """Stop (see :meth:`stop`) and wait up to ``timeout`` seconds for the worker thread to
        end; True when it did (a render inside one long device call may not, see :meth:`quiesce`)."""
        self.stop()
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def stop(self) -> None:
        """Refuse new jobs and cancel the waiting and the running one at once, without waiting:
        their readers get ``cancelled`` now; the render itself stops at its next step and writes
        nothing (files are written atomically, so none is half-written)."""
        with self.lock:
            self.closing = True
            waiting, self.waiting = list(self.waiting), deque()
            running = self.running
            self.lock.notify_all()
        for job in waiting + ([running] if running is not None else []):
            job.cancel_requested.set()
            job.finish("cancelled")

    def quiesce(self, timeout: float = 10.0) -> bool:
        """After :meth:`stop`: wait (up to ``timeout``) for a file being written to be complete,
        then keep any other from starting, so the process may end without leaving a partial file."""
        return self.writing.acquire(timeout=timeout)

    def health(self, stuck_after: float) -> tuple[str, Optional[str]]:
        """("ok" | "stopped" | "stuck", why): the worker thread has ended, or the running job has
        shown no progress for ``stuck_after`` seconds (one device call that never returns)."""
        with self.lock:
            running = self.running
        if self.stopped is not None or not self.thread.is_alive():
            return "stopped", f"the render worker has stopped ({self.stopped or 'it ended'})"
        if running is not None and time.time() - running.last_event > stuck_after:
            return "stuck", (f"job {running.id} has shown no progress for "
                             f"{time.time() - running.last_event:.0f} s (limit {stuck_after:g} s)")
        return "ok", None

    def _forget_old(self) -> None:
        finished = [j for j in self.jobs.values() if j.finished]
        for job in finished[: max(0, len(finished) - self.keep_finished)]:
            del self.jobs[job.id]

    def _next(self) -> Optional[Job]:
        with self.lock:
            self.lock.wait_for(lambda: self.waiting or self.closing)
            if self.closing:
                return None
            self.running = self.waiting.popleft()
            for i, job in enumerate(self.waiting):
                job.emit("queued", position=i + 1)
            return self.running

    def _work(self) -> None:
        try:
            while True:
                job = self._next()
                if job is None:
                    return
                try:
                    self._render(job)
                    job.finish("done", images=[{"file": i["file"]} for i in job.images])
                except Cancelled:
                    job.finish("cancelled")
                except Exception as e:  # any failure fails this job only; the worker goes on
                    message = str(e) if isinstance(e, EXPECTED) else f"internal error ({type(e).__name__}: {e})"
                    log.error("job %s failed: %s", job.id, message)
                    job.finish("failed", error=message)
                    self._reset_model()
                except BaseException as e:  # the thread itself ends: this job fails first
                    job.finish("failed", error=f"the render worker stopped ({type(e).__name__}: {e})")
                    raise
                finally:
                    with self.lock:
                        self.running = None
        except BaseException as e:
            self._fail_all(f"{type(e).__name__}: {e}")
            raise

    def _reset_model(self) -> None:
        """After a failed job: undo its LoRAs (a failure may come half-way through applying them),
        so the next job starts from the plain model."""
        try:
            switch_loras(self.engine, ())
        except Exception as e:  # the model's state is unknown: refuse further work
            self._fail_all(f"the model could not be reset after a failure ({type(e).__name__}: {e})")
            raise

    def _fail_all(self, why: str) -> None:
        """The worker is ending abnormally: every open job fails now rather than waiting forever."""
        with self.lock:
            self.stopped = self.stopped or why  # the first cause, not the exception it ended with
            open_jobs = list(self.waiting) + ([self.running] if self.running is not None else [])
            self.waiting = deque()
        log.error("the render worker stopped: %s", why)
        for job in open_jobs:
            job.finish("failed", error=f"the render worker stopped ({why})")

    def _render(self, job: Job) -> None:
        with job.changed:
            if job.finished:  # cancelled (a shutdown) between being taken and starting
                raise Cancelled()
            job.state = "running"
        # Exactly this job's LoRAs: the previous job's are undone first (a no-op when they match).
        switch_loras(self.engine, job.spec.loras)
        requests = job.spec.requests
        for number, request in enumerate(requests):
            steps = request.run_steps  # from an image, only the last int(steps * strength) run
            every = preview_interval(steps)
            job.emit("started", image=number, images=len(requests), steps=steps, width=request.width,
                     height=request.height, seed=request.seed)
            times: list[float] = []

            def on_step(step, seconds, number=number, request=request):
                if job.cancel_requested.is_set():
                    raise Cancelled()
                times.append(seconds)
                done = step.index + 1
                rate = float(np.median(times))
                remaining = (step.total - done + (len(requests) - number - 1) * step.total) * rate
                data = {"image": number, "step": done, "steps": step.total, "seconds_per_step": round(rate, 4),
                        "eta_seconds": round(remaining, 2)}
                # The flash sampler's last HiDream-I1 step calls no model, so it has no x0 preview.
                if done % every == 0 and done < step.total and step.preview is not None:
                    data["preview"] = jpeg_data_url(self.engine.preview_image(step, request))
                job.emit("progress", **data)

            if job.cancel_requested.is_set():
                raise Cancelled()
            result = self.engine.run(request, on_step)
            # The same record the CLI writes, so an image from either re-runs the same way.
            metadata = {**result.metadata, **self.recorded_bits()}
            with self.writing:
                if job.cancel_requested.is_set():  # stopped while the last step ran: write nothing
                    raise Cancelled()
                path = self._save(result.image, metadata)
            job.images.append({"file": path.name, "metadata": metadata})
            job.emit("image", image=number, file=path.name, metadata=metadata,
                     seconds_per_step=round(result.seconds_per_step, 4), total_seconds=round(result.total_time, 3),
                     preview=jpeg_data_url(result.image))

    def recorded_bits(self) -> dict:
        """What the server adds to each image's record: ``-q``, as the CLI records it."""
        return {"quantize_bits": self.quantize_bits} if self.quantize_bits else {}

    def _save(self, image: np.ndarray, metadata: dict) -> Path:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = self.output_dir / f"{stamp}-{next(self.counter):04d}{secrets.token_hex(2)}-seed{metadata['seed']}.png"
        return save_image(image, path, metadata)
