"""The ``hidream-mlx`` command: a thin click layer over the library.

Every expected failure (bad input, a broken model folder, an existing output) becomes one
``error: ...`` line on stderr and exit code 1, and so does an unexpected one (``internal
error (...)``, to report); Ctrl-C exits 130. No tracebacks for users.
"""

from __future__ import annotations

import os
import signal
import sys

import click

from hidream_mlx import __version__
from hidream_mlx.weights.loading import ModelLoadError
from hidream_mlx.cli.bench import bench
from hidream_mlx.cli.eval import eval_group
from hidream_mlx.cli.generate import generate
from hidream_mlx.cli.info import info
from hidream_mlx.cli.quantize import quantize
from hidream_mlx.cli.replay import replay
from hidream_mlx.cli.serve import serve

USER_ERRORS = (ModelLoadError, ValueError, FileExistsError, FileNotFoundError,
               IsADirectoryError, PermissionError, KeyError, OSError, MemoryError)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C so every ``finally`` cleans up the same way."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _terminate(signum, frame):
    raise Terminated(signum)


def install_signal_handlers() -> None:
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _terminate)


def _silence_stdout() -> None:
    """After a reader closed our stdout (``... | head -1``): drop what is left to print."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


class FriendlyGroup(click.Group):
    """Turns our exceptions into one clear line instead of a traceback."""

    def invoke(self, ctx):
        install_signal_handlers()
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as e:
            signum = getattr(e, "signum", signal.SIGINT)
            click.echo("\ninterrupted" if signum == signal.SIGINT else f"\nstopped by {signal.Signals(signum).name}",
                       err=True)
            sys.exit(128 + signum)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise  # click's own: --help, usage errors; click.main prints them
        except BrokenPipeError:
            # Results are written before anything late is printed, so a closed stdout loses nothing.
            _silence_stdout()
            sys.exit(0)
        except USER_ERRORS as e:
            message = e.args[0] if isinstance(e, KeyError) and e.args else e
            _fail(str(message))
        except RuntimeError as e:
            # Metal reports running out of memory as a RuntimeError from deep inside MLX.
            if "memory" in str(e).lower():
                _fail(f"out of memory ({e}); try -q 6 or -q 4, or a smaller size")
            _fail(f"internal error ({type(e).__name__}: {e}); please report it")
        except Exception as e:  # a bug of ours: still one line for the user, never a traceback
            _fail(f"internal error ({type(e).__name__}: {e}); please report it")


def _fail(message: str) -> None:
    """One ``error:`` line and exit 1: a message that spans lines (a library's) is joined."""
    click.echo("error: " + " ".join(line.strip() for line in message.splitlines() if line.strip()), err=True)
    sys.exit(1)


@click.group(cls=FriendlyGroup)
@click.version_option(__version__, prog_name="hidream-mlx")
def main():
    """HiDream image models (O1, I1, E1 editing) in native MLX: generate, edit, quantize, evaluate."""


def _register_commands() -> None:
    main.add_command(generate)
    main.add_command(quantize)
    main.add_command(eval_group)
    main.add_command(info)
    main.add_command(bench)
    main.add_command(replay)
    main.add_command(serve)


_register_commands()
