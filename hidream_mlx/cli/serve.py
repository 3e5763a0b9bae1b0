"""``hidream-mlx serve``: load the model once and serve images over HTTP (API + web studio).

The server stack is an optional extra (``pip install -e ".[serve]"``), imported only here.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import sys
from pathlib import Path

import click

from hidream_mlx.cli.generate import DEFAULT_MODEL
from hidream_mlx.cli.render import resolve_source
from hidream_mlx.families import option_choices
from hidream_mlx.files import existing_folder
from hidream_mlx.requests import limits_help
from hidream_mlx.weights.precision import PRECISIONS

LOOPBACK = ("localhost",)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, token, insecure: bool) -> None:
    """A server reachable from other machines needs a token, unless the user says otherwise."""
    if not is_loopback(host) and not token and not insecure:
        raise click.UsageError(f"--host {host} makes the server reachable from other machines; give --token T "
                               "(clients send 'Authorization: Bearer T') or, on a trusted network, --insecure")


def import_server():
    try:
        import uvicorn  # lazy: optional extra

        from hidream_mlx.server.app import ServerConfig, create_app  # lazy: optional extra
    except ImportError as e:
        raise click.ClickException(f"the server needs the optional extra: pip install 'hidream-mlx[serve]' "
                                   f"(missing: {e.name})") from None
    return uvicorn, ServerConfig, create_app


SERVE_HELP = ("Load the model once and serve the OpenAI-shaped images API and a web studio.\n\n"
              f"Requests get the CLI's checks (prompts: {limits_help()}) and the server's bounds. /health answers "
              "503 when the render worker has stopped or is stuck; SIGTERM ends the process within seconds, "
              "cancelling the running job.")


@click.command("serve", help=SERVE_HELP)
@click.option("--model", "model_arg", default=DEFAULT_MODEL, show_default=True,
              help="Hugging Face repo id or local folder (official or quantized layout).")
@click.option("--dtype", type=click.Choice(list(PRECISIONS)), default="bfloat16", show_default=True)
@click.option("-q", "--quantize", "quantize_bits", type=click.Choice(["2", "3", "4", "5", "6", "8"]), default=None,
              help="Quantize the decoder in memory at load time.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (other than loopback needs --token).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--token", default=None, envvar="HIDREAM_MLX_TOKEN", help="Bearer token clients must send (env HIDREAM_MLX_TOKEN).")
@click.option("--insecure", is_flag=True, help="Allow a non-loopback --host without a token.")
@click.option("--lora-dir", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help="Folder of LoRA .safetensors files requests may choose by name.")
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("outputs"),
              show_default=True, help="Where every image is saved, with its metadata.")
@click.option("--base", default=None, metavar="PATH_OR_ID",
              help="HiDream-E1: the HiDream-I1-Full pipeline the E1 model edits on (as generate's --base) "
                   "[default: HiDream-ai/HiDream-I1-Full]. An edit's source is the image upload (or a references list of one).")
@click.option("--llama", default=None, metavar="PATH_OR_ID",
              help="HiDream-I1 and E1: the Llama folder or repo id when the pipeline has no text_encoder_4/.")
@click.option("--encoder-bits", type=click.Choice([str(b) for b in option_choices("encoder_bits")]), default=None,
              help="HiDream-I1 and E1: quantize the T5 and Llama text encoders in memory.")
@click.option("--keep-loaded", is_flag=True,
              help="HiDream-I1 and E1: keep the text encoders and the transformer resident (a new prompt needs no "
                   "reload; the peak is then about their sum, not the largest phase).")
def serve(model_arg, dtype, quantize_bits, host, port, token, insecure, lora_dir, output_dir, llama=None,
          encoder_bits=None, keep_loaded=False, base=None):
    """Load the model once and serve the OpenAI-shaped images API and a web studio (see SERVE_HELP)."""
    check_exposure(host, token, insecure)
    uvicorn, ServerConfig, create_app = import_server()
    bits = int(quantize_bits) if quantize_bits else None
    # Everything that needs no weights is refused before they load: where images go, the address,
    # the model and its load options.
    check_output_dir(output_dir)
    check_address(host, port)
    params = {"model_arg": model_arg, "llama": llama, "encoder_bits": encoder_bits, "keep_loaded": keep_loaded,
              "base": base}
    family, source = resolve_source(params)
    load = {"dtype": dtype, "bits": bits, **{name: params[name] for name in family.load_options if name in params}}
    family.check_load(source, load)
    engine = family.load_engine(source, load)
    # A family that loads phase by phase (HiDream-I1) has loaded nothing yet: its first request does.
    loaded = (f"model loaded in {engine.load_time:.1f} s" if engine.load_time else
              f"{family.title} ready (weights load phase by phase on the first request)")
    config = ServerConfig(output_dir=output_dir, token=token, quantize_bits=bits, lora_dir=lora_dir)
    app, studio = create_app(engine, config)
    click.echo(f"{loaded}; serving http://{host}:{port}/ (images saved to {output_dir})", err=True)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # Cancel work first so open progress streams and waiting requests end promptly.
            studio.queue.stop()
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=10))
    code = 0
    try:
        server.run()
    except KeyboardInterrupt as e:  # uvicorn re-raises the stop signal once it has shut down
        code = 128 + getattr(e, "signum", signal.SIGINT)
        raise
    finally:
        # The app's shutdown already gave the render its grace (SHUTDOWN_GRACE_SECONDS); check once more.
        if not studio.queue.close(1.0):
            end_without_worker(studio.queue, code or 1)


def check_output_dir(folder: Path) -> None:
    """``--output-dir`` is a folder this user may write in, or one that can be made (the server
    makes it, and its ``references/``, once the model is loaded)."""
    for path in (folder, folder / "references"):
        if os.path.lexists(path) and not path.is_dir():
            raise ValueError(f"{path}: exists and is not a folder; --output-dir needs a folder for the images")
    there = existing_folder(folder)
    if not there.is_dir():
        raise ValueError(f"{there}: is not a folder, so --output-dir {folder} cannot be made")
    if not os.access(there, os.W_OK | os.X_OK):
        raise PermissionError(f"{there}: not writable (--output-dir {folder})")


def check_address(host: str, port: int) -> None:
    """The server can listen on ``host``:``port`` (bound and released at once, as uvicorn binds it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as e:  # gaierror (an unknown host name) is an OSError too
        raise OSError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None


def end_without_worker(queue, code: int) -> None:
    """The render thread is inside one long device call that no step boundary will interrupt soon:
    end the process now (its memory goes with it) instead of waiting, once no file is mid-write."""
    queue.quiesce()
    click.echo(f"\nstopped{f' by {signal.Signals(code - 128).name}' if code > 128 else ''}: the running render "
               "was cancelled inside the device; nothing of it was written", err=True)
    sys.stderr.flush()
    os._exit(code)
