"""``python -m quantize.convert ...`` (or ``python quantize/convert.py ...``): the same command
as ``hidream-mlx quantize``, with the same one-line errors."""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: make the repository root importable like ``python -m`` would.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import click  # noqa: E402

from hidream_mlx.cli import USER_ERRORS  # noqa: E402
from hidream_mlx.cli.quantize import quantize  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    try:
        code = quantize.main(args=argv, prog_name="python -m quantize.convert", standalone_mode=False)
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except (KeyboardInterrupt, click.Abort):
        click.echo("\ninterrupted", err=True)
        return 130
    except USER_ERRORS as e:
        click.echo(f"error: {e.args[0] if isinstance(e, KeyError) and e.args else e}", err=True)
        return 1
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
