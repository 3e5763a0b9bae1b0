"""Where a model's files are: a local folder or file as given, or a Hugging Face repo id
fetched into the local cache (a cached model works offline), with its name and fingerprint.

Each family's source (``families/<name>/source.py``) builds on these to say what the files hold.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

from hidream_mlx.weights.loading import ModelLoadError, TensorInfo

HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja"]


def hub_download(repo_id: str, patterns: list[str], allow_download: bool) -> Path:
    """A repo's files from the local cache, else (when allowed) downloaded: a cached model works offline."""
    from huggingface_hub import snapshot_download  # lazy: hub

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    # Hub errors are OSError subclasses (missing entries, HTTP), or ValueError for a malformed id.
    except (OSError, ValueError) as cached_error:
        if not allow_download or os.environ.get("HF_HUB_OFFLINE"):
            raise ModelLoadError(f"{repo_id}: not in the local Hugging Face cache and downloads are off") \
                from cached_error
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except (OSError, ValueError) as e:
        # The hub's messages run over several lines; the first says what happened.
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), "no detail")
        raise ModelLoadError(f"{repo_id}: could not download from Hugging Face ({type(e).__name__}: {first})") \
            from None


def is_repo_id(arg: str) -> bool:
    return arg.count("/") == 1 and not arg.startswith((".", "/", "~")) and not Path(arg).expanduser().exists()


def resolve_model_path(name_or_path: str, allow_download: bool = True, patterns: Optional[list[str]] = None) -> Path:
    """A local folder or file as given, or a Hugging Face repo id fetched into the local cache
    (``patterns``: the files to fetch, default :data:`HUB_PATTERNS`)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if path.is_file() and path.suffix != ".safetensors":
            raise ModelLoadError(f"{path}: is a file; --model takes a folder, a .safetensors file "
                                 "or a Hugging Face repo id")
        return path
    if not is_repo_id(name_or_path):
        raise ModelLoadError(f"{name_or_path}: no such folder (and not a Hugging Face repo id like owner/name)")
    return hub_download(name_or_path, patterns or HUB_PATTERNS, allow_download)


def model_name(name_or_path: str) -> str:
    """The model's own name: a repo id's or a folder's last component (never its parents); for
    ``.`` or ``..`` the name of the folder they stand for."""
    name = str(name_or_path).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return Path(os.path.abspath(name_or_path)).name if name in ("", ".", "..") else name


def fingerprint(path: Path, config_bytes: bytes, index: dict[str, TensorInfo]) -> str:
    """``hub:<revision>`` for a hub snapshot, else a hash of the config and the tensor index
    (names, shapes, dtypes, files): what says two runs used the same weights, without a path."""
    if path.parent.name == "snapshots":
        return f"hub:{path.name}"  # the hub cache names a snapshot folder by its revision
    digest = hashlib.sha256(config_bytes)
    for name in sorted(index):
        info = index[name]
        digest.update(f"{name}|{info.shape}|{info.dtype}|{info.file.name}".encode())
    return "sha256:" + digest.hexdigest()[:16]


def recorded_name(arg: str) -> str:
    """How an image names a model (or a Llama, a base) it was made with: a repo id as it is, a local
    folder or file by its own name only (never the folders above it: an image keeps no local path)."""
    text = str(arg)
    return text if is_repo_id(text) else model_name(text)


def model_identity(source) -> dict:
    """What an image records about the model that made it: ``model``, its own name (a repo id, or
    the folder's name; never a path), the same under ``model_name``, and its fingerprint (with the
    hub revision when it came from the hub)."""
    identity = {"model": source.name, "model_name": source.name, "model_fingerprint": source.fingerprint}
    if source.fingerprint.startswith("hub:"):
        identity["model_revision"] = source.fingerprint[len("hub:"):]
    return identity
