"""The HTTP face of a loaded :class:`Engine`: OpenAI-shaped image routes, jobs with SSE progress, a studio page.

Routes (all but ``/`` and ``/static`` need ``Authorization: Bearer TOKEN`` when a token is set):

- ``POST /v1/images/generations`` and ``/v1/images/edits``: wait for the images (OpenAI shape).
  ``/v1/images/edits`` takes multipart uploads as the OpenAI edits endpoint names them: ``image``
  (or ``image[]``), ``mask`` and ``strength``. An ``image`` is the init image that sampling starts
  from (image-to-image, inpainting with ``mask``) when the form has a ``strength`` or a ``mask``, or
  when the served family takes no reference images; otherwise it is a reference: HiDream-O1's (editing,
  subject-driven generation) or HiDream-E1's source to edit. An ``init_image`` upload is always the
  init image.
- ``POST /v1/jobs`` (same body): queue and return at once; ``GET /v1/jobs/{id}`` its state,
  ``GET /v1/jobs/{id}/events`` its progress as server-sent events, ``DELETE /v1/jobs/{id}`` cancels.
- ``GET /v1/files/{name}``: an image this server saved; ``GET /v1/models``; ``GET /health``
  (503 with ``status`` ``stopped`` or ``stuck`` when the render worker has ended or shows no
  progress for ``ServerConfig.stuck_after`` seconds).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import mlx.core as mx
import psutil
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from hidream_mlx.families import family_named
from hidream_mlx.server.fields import CLI_FIELDS, START_IMAGES, BadRequest, Limits, build_spec, decode_reference, \
    parse_json, served_names
from hidream_mlx.server.jobs import Job, JobQueue
from hidream_mlx.weights.lora import LoRAError, lora_memory as estimate
from hidream_mlx.workflow.metadata import check_image_metadata

STATIC = Path(__file__).parent / "static"
FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}\.png$")
PUBLIC = ("/", "/static/")
POLL_SECONDS = 0.05
KEEPALIVE_SECONDS = 10.0
SHUTDOWN_GRACE_SECONDS = 5.0


@dataclass
class ServerConfig:
    output_dir: Path
    token: Optional[str] = None
    quantize_bits: Optional[int] = None
    lora_dir: Optional[Path] = None
    limits: Limits = field(default_factory=Limits)
    # A running job with no progress event for this long makes /health say "stuck": longer than
    # any one step, or loading a HiDream-I1 phase, takes on a machine that can hold the model.
    stuck_after: float = 900.0


def error(message: str, status: int = 400, code: str = "invalid_request") -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    # A message may quote what the client sent, lone surrogates ("\ud800") included: keep it encodable.
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return JSONResponse({"error": {"message": message, "type": kind, "code": code}}, status_code=status)


class Guard:
    """ASGI wrapper: bearer token and body-size bound, answered before any route runs."""

    def __init__(self, app, config: ServerConfig):
        self.app = app
        self.config = config

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = None
        public = path == "/" or path.startswith("/static/")
        if self.config.token and not public:
            given = headers.get("authorization", "")
            expected = f"Bearer {self.config.token}"
            if not secrets.compare_digest(given.encode(), expected.encode()):
                refusal = error("missing or wrong bearer token", 401, "invalid_api_key")
        if refusal is None and scope["method"] in ("POST", "PUT"):
            length = headers.get("content-length")
            if length is None or not length.isdigit():
                refusal = error("a request body needs a Content-Length", 411, "length_required")
            elif int(length) > self.config.limits.max_body_bytes:
                refusal = error(f"the body is {length} bytes; this server accepts at most "
                                f"{self.config.limits.max_body_bytes}", 413, "body_too_large")
        if refusal is not None:
            return await refusal(scope, receive, send)
        return await self.app(scope, receive, send)


class Studio:
    """Routes over one engine and its job queue."""

    def __init__(self, engine, config: ServerConfig):
        self.engine = engine
        self.config = config
        config.output_dir.mkdir(parents=True, exist_ok=True)
        self.queue = JobQueue(engine, config.output_dir, config.quantize_bits)
        self.started = time.time()

    # ------------------------------------------------------------------ bodies -> jobs

    def spec(self, body: dict, uploads=None, start_uploads=None):
        spec = build_spec(self.engine, body, self.config.limits, self.config.output_dir / "references",
                          self.config.lora_dir, uploads, start_uploads)
        if spec.loras:
            try:
                self.engine.check_loras(spec.loras)
            except LoRAError as e:
                raise BadRequest(str(e).replace(str(self.config.lora_dir), "--lora-dir")) from None
        source = getattr(self.engine, "source", None)
        if source is not None:  # an engine built in memory has no checkpoint to size
            family = family_named(self.engine.family)
            bits = self.config.quantize_bits
            load = {"dtype": self.engine.dtype, "bits": bits,
                    **{name: getattr(self.engine, name, None) for name in family.load_options}}
            extra = lora_memory(spec.loras, bits is not None or source.quantization is not None) if spec.loras else 0
            try:  # a phase-by-phase family predicts its largest phase
                family.check_fits(source, spec.requests[:1], load, extra_bytes=extra)
            except MemoryError as e:
                raise BadRequest(str(e), 400, "insufficient_memory") from None
        self.check_record(spec)
        return spec

    def check_record(self, spec) -> None:
        """What each image will record passes the schema ``info`` and ``--from-image`` read with, before
        any work: an image this server writes always re-runs. A refusal here is a bug of ours (500)."""
        described = {**self.engine.describe(), **self.queue.recorded_bits()}
        for request in spec.requests:
            try:
                check_image_metadata({**request.metadata(), **described}, "the image's record")
            except ValueError as e:
                raise BadRequest(f"internal error: {e}; please report it", 500, "server_error") from None

    async def body_spec(self, request: HttpRequest, edits: bool = False):
        kind = request.headers.get("content-type", "")
        if edits and kind.startswith("multipart/form-data"):
            body, uploads, start = await self.form_body(request)
            return self.spec(body, uploads, start)
        return self.spec(parse_json(await request.body()))

    def takes_references(self) -> bool:
        return "refs" in family_named(self.engine.family).own_options

    async def form_body(self, request: HttpRequest):
        """(fields, reference uploads, {"init_image", "mask"} uploads) of a multipart edits form."""
        limits = self.config.limits
        form = await request.form(max_files=limits.max_references + len(START_IMAGES), max_fields=64)
        body, images, start = {}, [], {}
        for key, value in form.multi_items():
            if hasattr(value, "read"):
                name = f" {value.filename!r}" if getattr(value, "filename", None) else ""
                if key in ("image", "image[]"):
                    images.append(decode_reference(await value.read(), limits, f"{key} upload {len(images)}{name}"))
                elif key in START_IMAGES:
                    if key in start:
                        raise BadRequest(f"more than one {START_IMAGES[key]} upload ({key})")
                    start[key] = decode_reference(await value.read(), limits, f"{key} upload{name}")
                else:
                    raise BadRequest(f"unexpected file field {key!r}; send the init image or references as image "
                                     "(image[]), the mask as mask")
            else:
                body[key] = form_value(key, value)
        starts = "strength" in body or "mask" in start or body.get("mask") is not None or not self.takes_references()
        if images and starts:
            if len(images) > 1 or "init_image" in start:
                raise BadRequest("one image to start from: with strength or mask, image is the init image "
                                 f"(got {len(images) + ('init_image' in start)}); references need neither")
            start["init_image"] = images.pop()
        return body, images, start

    def submit(self, spec) -> Job:
        try:
            return self.queue.submit(spec)
        except RuntimeError as e:
            raise BadRequest(str(e), 503, "shutting_down") from None

    # ------------------------------------------------------------------ routes

    async def index(self, request: HttpRequest):
        # The page hides what the served family cannot use (HiDream-I1: references); the API refuses it anyway.
        family = self.engine.family
        page = (STATIC / "index.html").read_text(encoding="utf-8")
        return HTMLResponse(page.replace("<body>", f'<body data-family="{family}">', 1))

    async def generations(self, request: HttpRequest):
        return await self._wait(request, edits=False)

    async def edits(self, request: HttpRequest):
        return await self._wait(request, edits=True)

    async def _wait(self, request: HttpRequest, edits: bool):
        spec = await self.body_spec(request, edits)
        job = self.submit(spec)
        while not job.finished:  # the worker ends every job it takes, even when it stops itself
            await asyncio.sleep(POLL_SECONDS)
        if job.state == "cancelled":
            return error("the job was cancelled", 409, "cancelled")
        if job.state == "failed":
            return error(job.error or "generation failed", 500, "generation_failed")
        return JSONResponse({"created": int(job.created), "data": [self.image_entry(request, job, i)
                                                                    for i in range(len(job.images))]})

    def image_entry(self, request: HttpRequest, job: Job, i: int) -> dict:
        image = job.images[i]
        entry = {"revised_prompt": None, "seed": image["metadata"]["seed"], "file": image["file"]}
        if job.spec.response_format == "url":
            entry["url"] = str(request.url_for("file", name=image["file"]))
        else:
            # Read back from the saved file: finished jobs keep no pixels in memory.
            entry["b64_json"] = base64.b64encode((self.config.output_dir / image["file"]).read_bytes()).decode()
        return entry

    async def create_job(self, request: HttpRequest):
        edits = request.headers.get("content-type", "").startswith("multipart/form-data")
        job = self.submit(await self.body_spec(request, edits))
        return JSONResponse(job.summary(self.queue.position(job)), status_code=202)

    def job_or_404(self, request: HttpRequest) -> Job:
        job = self.queue.get(request.path_params["job_id"])
        if job is None:
            raise BadRequest("no such job", 404, "not_found")
        return job

    async def job(self, request: HttpRequest):
        job = self.job_or_404(request)
        summary = job.summary(self.queue.position(job))
        summary["data"] = [self.image_entry(request, job, i) for i in range(len(job.images))]
        return JSONResponse(summary)

    async def cancel(self, request: HttpRequest):
        job = self.job_or_404(request)
        if not job.finished:
            self.queue.cancel(job)
        return JSONResponse(job.summary(self.queue.position(job)), status_code=202)

    async def events(self, request: HttpRequest):
        job = self.job_or_404(request)

        async def stream():
            sent, quiet = 0, 0.0
            while True:
                events = job.events[sent:]
                for event in events:
                    yield f"event: {event['event']}\ndata: {json.dumps(event)}\n\n"
                sent += len(events)
                if job.finished and sent == len(job.events):
                    return
                quiet = 0.0 if events else quiet + POLL_SECONDS
                if quiet >= KEEPALIVE_SECONDS:
                    quiet = 0.0
                    yield ": keepalive\n\n"
                await asyncio.sleep(POLL_SECONDS)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def file(self, request: HttpRequest):
        name = request.path_params["name"]
        path = self.config.output_dir / name
        if not FILE_NAME.match(name) or not path.is_file():
            return error("no such image", 404, "not_found")
        return FileResponse(path, media_type="image/png")

    async def models(self, request: HttpRequest):
        # One model is served; its other accepted names (served_names) are aliases, not models.
        return JSONResponse({"object": "list", "data": [
            {"id": served_names(self.engine)[0], "object": "model", "created": int(self.started),
             "owned_by": "hidream-mlx"}]})

    async def health(self, request: HttpRequest):
        described = self.engine.describe()
        status, problem = self.queue.health(self.config.stuck_after)
        with self.queue.lock:
            waiting, running = len(self.queue.waiting), self.queue.running is not None
        return JSONResponse({
            "status": status, **({"error": problem} if problem else {}),
            "model": served_names(self.engine)[0], "dtype": described["dtype"],
            "quantization": described["quantization"], "tool_version": described["tool_version"],
            "default_recipe": self.engine.default_recipe,
            "memory": {"mlx_active_bytes": int(mx.get_active_memory()), "mlx_peak_bytes": int(mx.get_peak_memory()),
                       "process_rss_bytes": int(psutil.Process().memory_info().rss)},
            "queue": {"running": running, "waiting": waiting},
            "limits": vars(self.config.limits),
        }, status_code=200 if status == "ok" else 503)


def form_value(key: str, text: str):
    """A multipart text field as the JSON value it stands for (forms carry only strings)."""
    kinds = CLI_FIELDS.get(key) or {"n": (int,)}.get(key, (str,))
    try:
        if bool in kinds:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "1")
        if kinds == (int,):
            return int(text)
        if float in kinds:
            number = float(text)
            return int(number) if number.is_integer() and "." not in text else number
        if dict in kinds or list in kinds:
            return text
    except ValueError:
        raise BadRequest(f"{key} must be {'/'.join(k.__name__ for k in kinds)}, got {text!r}") from None
    return text


def lora_memory(specs, quantized: bool) -> int:
    return estimate(specs, quantized)


async def bad_request(request: HttpRequest, exc: BadRequest) -> Response:
    return error(str(exc), exc.status, exc.code)


async def internal_error(request: HttpRequest, exc: Exception) -> Response:
    """A bug of ours in a route: still a JSON error (the server logs the traceback)."""
    return error(f"internal error ({type(exc).__name__}: {exc})", 500, "internal_error")


def create_app(engine, config: ServerConfig):
    """The ASGI app; ``app.state.studio.queue`` is the job queue (stop it with ``queue.close()``)."""
    studio = Studio(engine, config)
    routes = [
        Route("/", studio.index),
        Route("/health", studio.health),
        Route("/v1/models", studio.models),
        Route("/v1/images/generations", studio.generations, methods=["POST"]),
        Route("/v1/images/edits", studio.edits, methods=["POST"]),
        Route("/v1/jobs", studio.create_job, methods=["POST"]),
        Route("/v1/jobs/{job_id}", studio.job, methods=["GET"]),
        Route("/v1/jobs/{job_id}", studio.cancel, methods=["DELETE"]),
        Route("/v1/jobs/{job_id}/events", studio.events),
        Route("/v1/files/{name}", studio.file, name="file"),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        # Jobs are cancelled at once; a render inside one device call gets a short grace only
        # (``serve`` then ends the process, see JobQueue.quiesce).
        await asyncio.to_thread(studio.queue.close, SHUTDOWN_GRACE_SECONDS)

    app = Starlette(routes=routes, exception_handlers={BadRequest: bad_request, Exception: internal_error},
                    lifespan=lifespan)
    app.state.studio = studio
    return Guard(app, config), studio
