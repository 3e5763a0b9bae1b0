"""Writing outputs safely: never half-written, never silently overwritten, nothing but a file replaced.

Every output goes to a temporary file beside the target (``.NAME.PID.partial``) and is renamed
into place only when complete. A run killed with SIGKILL cannot clean up, so the next run of the
same target removes the partial files that dead processes left for it.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

PARTIAL_MARK = ".partial"


def check_output_path(path: Path | str, overwrite: bool = False) -> Path:
    """Fail early (before any expensive work) if ``path`` cannot or must not be written.

    Any existing directory entry counts as existing (a dangling symlink too), and only a
    regular file is ever replaced, whatever ``overwrite`` says.
    """
    path = Path(path)
    if os.path.lexists(path):
        mode = os.lstat(path).st_mode
        if stat.S_ISDIR(mode) or (stat.S_ISLNK(mode) and path.is_dir()):
            raise IsADirectoryError(f"{path}: is a folder, expected a file path")
        if not stat.S_ISREG(mode):
            kind = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file"
            raise FileExistsError(f"{path}: exists and is {kind}; only a regular file can be replaced")
        if not overwrite:
            raise FileExistsError(f"{path}: already exists (use --overwrite to replace it)")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"{parent}: output folder does not exist")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"{parent}: output folder is not writable")
    check_name_length(path, parent)
    return path


def check_name_length(path: Path, parent: Path, temporary: str | None = None,
                      how: str = f"the temporary suffix .NAME.PID{PARTIAL_MARK}") -> None:
    """Refuse a name (or a whole path) the file system cannot hold once the temporary name a
    write goes through is used (``temporary``, default :func:`partial_path`'s, described by
    ``how``): the write would fail only at the end, after all the work."""
    temporary = temporary or partial_path(path, 2**22).name  # the longest pid Linux gives
    folder = existing_folder(parent)
    limit = _pathconf(folder, "PC_NAME_MAX", 255)  # no pathconf (Windows) or no answer: the usual limits
    needed = len(os.fsencode(temporary))
    if needed > limit:
        raise ValueError(f"{path}: the file name is too long for this file system ({needed} bytes with {how}; "
                         f"at most {limit}); choose a shorter name")
    whole = len(os.fsencode(os.path.abspath(parent / temporary)))
    path_limit = _pathconf(folder, "PC_PATH_MAX", 1024)
    if whole >= path_limit:
        raise ValueError(f"{path}: the path is too long for this file system ({whole} bytes with {how}; "
                         f"under {path_limit}); choose a shorter name or folder")


def existing_folder(path: Path) -> Path:
    """``path``, or its nearest ancestor that exists (what a file system limit is asked of)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _pathconf(folder: Path, name: str, default: int) -> int:
    try:
        return os.pathconf(folder, name)
    except (OSError, ValueError, AttributeError):
        return default


def partial_path(path: Path, pid: int | None = None) -> Path:
    """The temporary name a write to ``path`` uses; it keeps the suffix so encoders see it."""
    return path.with_name(f".{path.name}.{os.getpid() if pid is None else pid}{PARTIAL_MARK}{path.suffix}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(path: Path) -> list[Path]:
    """Delete the partial files of ``path`` left by processes that no longer run."""
    removed = []
    prefix, tail = f".{path.name}.", f"{PARTIAL_MARK}{path.suffix}"
    parent = path.parent if str(path.parent) else Path(".")
    for candidate in parent.glob(f".{path.name}.*{tail}"):
        pid_text = candidate.name[len(prefix):-len(tail)]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and not _pid_alive(int(pid_text)):
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of a file's content, read in 1 MiB blocks (images, references, LoRAs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: Path | str) -> dict:
    """How an image records an input file (a reference, a LoRA, an init image): its name and
    content hash, never the folder it was in."""
    return {"name": Path(path).name, "sha256": sha256_file(path)}


def check_regular_file(path: Path | str, what: str = "file") -> Path:
    """``path`` if it names a regular file (through symlinks). A FIFO, socket or device is refused
    before it is opened: reading one can block forever or never end (``/dev/zero``)."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such {what}") from None
    except PermissionError:
        raise PermissionError(f"{path}: {what} is not readable (permission denied)") from None
    except OSError as e:
        raise OSError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(f"{path}: is a folder, expected a {what}")
    if not stat.S_ISREG(mode):
        raise ValueError(f"{path}: {what} is not a regular file (a pipe, socket or device); give a file")
    return path


def parse_json(text: str | bytes, where: str, what: str = "JSON"):
    """``text``'s JSON value; a syntax error or nesting deeper than Python's parser can follow is
    one ValueError saying ``where: what ...`` (``where``: a file or ``FILE:LINE``; may be empty)."""
    head = f"{where}: {what}" if where else what
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{head} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{head} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except RecursionError:
        raise ValueError(f"{head} is nested too deeply to read") from None


def read_text_file(path: Path | str, what: str = "file") -> str:
    """A UTF-8 text file's content; every way reading it can fail is one line naming the file.
    Only regular files are read (:func:`check_regular_file`)."""
    path = check_regular_file(path, what)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such {what}") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"{path}: is a folder, expected a {what}") from None
    except PermissionError:
        raise PermissionError(f"{path}: {what} is not readable (permission denied)") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: {what} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise OSError(f"{path}: cannot read {what} ({e.strerror or e})") from None


def read_json_file(path: Path | str, what: str = "JSON file"):
    """A JSON file's value, with :func:`read_text_file`'s errors and the place of a syntax error."""
    return parse_json(read_text_file(path, what), str(path), what)


def default_file_mode() -> int:
    """The permissions a plain ``open()`` gives a new file under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_output(path: Path | str, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds."""
    path = check_output_path(path, overwrite)
    remove_stale_partials(path)
    tmp_path = partial_path(path)
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, default_file_mode())
    os.close(fd)
    try:
        yield tmp_path
        # The target may have appeared (or changed kind) while we worked: check again.
        check_output_path(path, overwrite)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def open_case(case: Path | str):
    """A recorded case file's arrays (an ``NpzFile``, no pickled objects), or one error naming it."""
    try:
        return np.load(case, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{case}: not a readable .npz file ({e})") from None
