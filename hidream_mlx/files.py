"""Writing outputs safely: never half-written, never silently overwritten."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def check_output_path(path: Path | str, overwrite: bool = False) -> Path:
    """Fail early (before any expensive work) if ``path`` cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder, expected a file path")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists (use --overwrite to replace it)")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"{parent}: output folder does not exist")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"{parent}: output folder is not writable")
    return path


@contextmanager
def atomic_output(path: Path | str, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds."""
    path = check_output_path(path, overwrite)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent or ".")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path}: appeared while writing (use --overwrite to replace it)")
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
