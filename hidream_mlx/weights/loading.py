"""Loading safetensors into our modules, strictly and one tensor at a time (every family's loader).

Only safetensors are read (never pickle) and nothing from the folder is executed. Each shard's
header is checked before any tensor is touched, so a truncated download names its file rather
than failing deep inside a matmul.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from hidream_mlx.files import read_json_file
from hidream_mlx.quant.plans import LoadPlan
from hidream_mlx.quant.quantization import quantize_tensor

# Never loaded: image generation has no use for the language-model head.
SKIPPED_PREFIXES = ("lm_head.",)
VISION_PREFIX = "visual."
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# MLX's buffer cache while loading: room to reuse a layer's float buffers for the next layer
# (allocating fresh pages each time is slow) without holding more than this beyond the weights.
LOAD_CACHE_BYTES = 256 * 2**20
_ST_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U32": 4,
                   "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1}


class ModelLoadError(RuntimeError):
    """A model folder that cannot be loaded; the message names the file or tensor."""


@dataclass(frozen=True)
class TensorInfo:
    name: str  # checkpoint name, e.g. model.language_model.norm.weight
    file: Path
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        n = _ST_DTYPE_BYTES.get(self.dtype, 4)
        for d in self.shape:
            n *= d
        return n


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor names, shapes and dtypes of one file, after checking it is whole."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ModelLoadError(f"{path.name}: not a safetensors file (too short)")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > min(size - 8, 100_000_000):
                raise ModelLoadError(f"{path.name}: corrupt or truncated safetensors header")
            header = json.loads(f.read(header_len))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        if isinstance(e, ModelLoadError):
            raise
        raise ModelLoadError(f"{path.name}: cannot read safetensors header ({e})") from None
    infos, end = {}, 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        infos[name] = TensorInfo(name, path, tuple(meta["shape"]), meta["dtype"])
        end = max(end, meta["data_offsets"][1])
    if 8 + header_len + end > size:
        raise ModelLoadError(
            f"{path.name}: truncated ({size} bytes, the header says {8 + header_len + end}); re-download it"
        )
    return infos


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a folder: from the shard index if there is one."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = read_json_file(index, "shard index")["weight_map"]
        except (OSError, ValueError) as e:
            raise ModelLoadError(str(e)) from None
        except (KeyError, TypeError):
            raise ModelLoadError(f"{index}: not a valid shard index (no weight_map)") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (model_dir / f).is_file()]
        if missing:
            raise ModelLoadError(f"{model_dir}: missing shard {missing[0]} (listed in {index.name})"
                                 + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
        return [model_dir / f for f in files]
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelLoadError(
            f"{model_dir}: only {pickles[0]} found; hidream-mlx loads safetensors only (pickle files are never opened)"
        )
    raise ModelLoadError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")


def checkpoint_index(model_dir: Path) -> dict[str, TensorInfo]:
    """Every tensor of the folder, by checkpoint name, with headers checked."""
    infos: dict[str, TensorInfo] = {}
    for path in weight_files(model_dir):
        infos.update(read_safetensors_header(path))
    return infos


def module_name(checkpoint_name: str) -> str:
    """Checkpoint name -> our module path: only the ``model.`` prefix goes."""
    return checkpoint_name[len("model."):] if checkpoint_name.startswith("model.") else checkpoint_name


def select_tensors(infos: dict[str, TensorInfo], want: Callable[[str], bool]) -> dict[str, TensorInfo]:
    return {module_name(k): v for k, v in infos.items()
            if not module_name(k).startswith(SKIPPED_PREFIXES) and want(module_name(k))}


def check_against(module: nn.Module, tensors: dict[str, TensorInfo], where: Path, prefix: str = "model.") -> None:
    """Strict: every parameter present with its shape, nothing unexpected.

    ``prefix`` is what ``module_name`` stripped, so messages name the checkpoint's own tensor.
    """
    expected = dict(tree_flatten(module.parameters()))
    for name, param in expected.items():
        info = tensors.get(name)
        if info is None:
            raise ModelLoadError(f"{where}: missing tensor {prefix}{name} (expected shape {tuple(param.shape)})")
        if tuple(info.shape) != tuple(param.shape):
            raise ModelLoadError(
                f"{info.file.name}: tensor {info.name} has shape {tuple(info.shape)}, expected {tuple(param.shape)}"
            )
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise ModelLoadError(f"{tensors[extra[0]].file.name}: unexpected tensor {tensors[extra[0]].name}"
                             + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))


def open_shard(path: Path) -> dict[str, mx.array]:
    """All tensors of one safetensors file, mapped lazily (read only when evaluated)."""
    try:
        return mx.load(str(path))
    except (RuntimeError, ValueError) as e:
        raise ModelLoadError(f"{path.name}: cannot be read as safetensors ({e})") from None


def load_tensors(tensors: dict[str, TensorInfo], dtype: mx.Dtype) -> dict[str, mx.array]:
    """Read the named tensors file by file; float tensors are cast to ``dtype``, others kept.

    ``mx.load`` maps lazily, so only the tensors asked for are ever materialized.
    """
    out = {}
    for path, names in iter_checkpoint(tensors):
        arrays = open_shard(path)
        for name in names:
            a = arrays[tensors[name].name]
            out[name] = a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating) else a
    return out


def assign(module: nn.Module, weights: dict[str, mx.array], lazy: bool = False) -> None:
    module.load_weights(list(weights.items()), strict=True)
    if not lazy:
        mx.eval(module.parameters())


def iter_checkpoint(infos: dict[str, TensorInfo]) -> Iterable[tuple[Path, list[str]]]:
    """The keys of ``infos`` grouped by file, in file order: one shard open at a time."""
    by_file: dict[Path, list[str]] = {}
    for name, info in infos.items():
        by_file.setdefault(info.file, []).append(name)
    return sorted(by_file.items())


def is_vision(name: str) -> bool:
    return name.startswith(VISION_PREFIX)


def stream_into(module: nn.Module, tensors: dict[str, TensorInfo], dtype: mx.Dtype,
                plan: Optional[LoadPlan] = None, lazy: bool = False) -> None:
    """Read, convert and assign ``tensors`` one at a time, so a load costs its weights alone.

    Each tensor is read (float tensors cast to ``dtype``; with an in-memory ``plan`` a planned
    linear's weight quantized at once), evaluated and assigned before the next is touched, and its
    float copy is freed right away (MLX's buffer cache is capped meanwhile). Largest first: the one
    transient float copy is biggest while little else is resident. ``lazy`` assigns unevaluated.
    """
    quantize_here = plan is not None and not plan.stored
    shards: dict[Path, dict[str, mx.array]] = {}
    previous_limit = mx.set_cache_limit(LOAD_CACHE_BYTES)
    try:
        for name in sorted(tensors, key=lambda n: (-tensors[n].nbytes, n)):
            info = tensors[name]
            if info.file not in shards:
                shards[info.file] = open_shard(info.file)
            source = shards[info.file].pop(info.name)  # the shard dict must not keep it alive
            path, _, leaf = name.rpartition(".")
            setting = plan.layers.get(path) if quantize_here and leaf == "weight" else None
            if setting is not None:
                items = quantize_tensor(path, source, setting, dtype)
            else:
                items = [(name, source.astype(dtype) if mx.issubdtype(source.dtype, mx.floating) else source)]
            module.load_weights(items, strict=False)
            if not lazy:
                mx.eval([a for _, a in items])
            del source, items
    finally:
        mx.set_cache_limit(previous_limit)
        mx.clear_cache()
