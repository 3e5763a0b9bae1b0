"""A real server (uvicorn on a free 127.0.0.1 port, in a thread) over the tiny fixture model."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import uvicorn

from hidream_mlx.families.o1.engine import Engine
from hidream_mlx.families import family_of
from hidream_mlx.families.i1.source import I1
from hidream_mlx.families.i1.e1.engine import E1Engine
from hidream_mlx.families.i1.engine import I1Engine
from hidream_mlx.server.app import ServerConfig, create_app

# Small and quick: a second or two per image on a CPU.
QUICK = {"size": "256x256", "no_snap": True, "steps": 4, "seed": 7}


def browser_tools():
    """(chromium's path, ``playwright.sync_api``) for the web page tests; skips the calling test
    module where either is missing (CI installs both)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium installed (apt-get install chromium); the web page test needs a real browser",
                    allow_module_level=True)
    return chromium, pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(model_dir: Path, output_dir: Path, base: Path = None, **config):
    """``base``: the I1-Full pipeline of a HiDream-E1 ``model_dir``."""
    family = family_of(model_dir).name
    if family == "e1":
        engine = E1Engine.load(model_dir, base=base, dtype="float32")
    else:
        engine = (I1Engine if family == I1 else Engine).load(model_dir, dtype="float32")
    app, studio = create_app(engine, ServerConfig(output_dir=output_dir, **config))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", studio
    finally:
        server.should_exit = True
        thread.join(30)
