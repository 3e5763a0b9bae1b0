"""Streaming conversion of an official checkpoint into a quantized folder that loads with no flags.

Memory stays near one source tensor plus one output shard: each source shard is opened with
``mx.load`` (lazy: a tensor is read only when evaluated), each tensor is quantized or cast to
bf16 and evaluated on its own, its float source is dropped, and output shards are flushed at a
size limit. Everything is written into a temporary folder beside the output and renamed into
place at the end; any failure (including Ctrl-C or a full disk) removes the temporary folder.

Nothing of the user's is ever deleted: the output may not be, contain or lie inside the
source, and ``overwrite`` replaces only a folder a previous conversion wrote (its config.json
says so and it holds nothing else), after the new one is complete. Temporary folders left by a
killed run carry a marker file and are removed by the next run on the same target.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import mlx.core as mx

from hidream_mlx import __version__
from hidream_mlx.models.loading import (
    SKIPPED_PREFIXES,
    TensorInfo,
    checkpoint_index,
    is_vision,
    iter_checkpoint,
    module_name,
    open_shard,
    read_config,
    resolve_model_path,
)
from hidream_mlx.models.lora import checkpoint_targets, merged_weight, updates_for_checkpoint
from hidream_mlx.quant.quantization import QuantPlan, QuantRecipe, quantize_weight, resolve_plan
from hidream_mlx.recipes import recipe_for_model

DEFAULT_SHARD_BYTES = 5 * 10**9  # 5 GB (decimal), like the hub's own shards
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "added_tokens.json",
                   "special_tokens_map.json", "chat_template.jinja", "chat_template.json",
                   "preprocessor_config.json", "video_preprocessor_config.json")
COMPONENTS = ("decoder", "embed_tokens", "pixel heads", "vision tower")
PARTIAL_MARKER = ".hidream-quantize-partial"  # inside a temporary folder: safe to delete
REPORT_FILE = "quantization_report.md"


def component_of(path: str) -> str:
    """Which part of the model a module path belongs to, for the size summary."""
    if path.startswith("language_model.embed_tokens"):
        return "embed_tokens"
    if path.startswith("language_model."):
        return "decoder"
    if path.startswith("visual."):
        return "vision tower"
    return "pixel heads"


@dataclass
class ComponentSize:
    params: int = 0  # source elements, norms and biases included
    bytes: int = 0  # bytes written

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes / self.params if self.params else 0.0


@dataclass
class Conversion:
    output: Path
    plan: QuantPlan
    config: dict
    shards: list[str]
    sizes: dict[str, ComponentSize] = field(default_factory=dict)
    notices: list[str] = field(default_factory=list)
    loras: list = field(default_factory=list)  # LoRASummary of each LoRA baked in

    @property
    def total(self) -> ComponentSize:
        return ComponentSize(sum(s.params for s in self.sizes.values()), sum(s.bytes for s in self.sizes.values()))


class ShardWriter:
    """Collects converted tensors and writes a shard whenever ``limit`` bytes are pending."""

    def __init__(self, folder: Path, limit: int):
        self.folder, self.limit = folder, limit
        self.pending: dict[str, mx.array] = {}
        self.pending_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []

    def add(self, name: str, array: mx.array) -> None:
        self.pending[name] = array
        self.pending_bytes += array.nbytes
        if self.pending_bytes >= self.limit:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        path = self.folder / f"part-{len(self.written) + 1:05d}.safetensors"
        mx.save_safetensors(str(path), self.pending, metadata={"format": "mlx"})
        self.written.append((path, sorted(self.pending)))
        self.pending, self.pending_bytes = {}, 0
        mx.clear_cache()

    def finish(self) -> tuple[list[str], dict[str, str]]:
        """Rename the parts to ``model-0000X-of-0000Y.safetensors``; returns names and weight map."""
        self.flush()
        count, names, weight_map = len(self.written), [], {}
        for i, (path, tensors) in enumerate(self.written, start=1):
            name = f"model-{i:05d}-of-{count:05d}.safetensors"
            path.rename(self.folder / name)
            names.append(name)
            weight_map.update({t: name for t in tensors})
        return names, weight_map


def source_matrices(infos: dict[str, TensorInfo]) -> dict[str, int]:
    """Module path -> input width for every 2-D ``.weight`` of the transformer (the vision tower
    is never quantized, so it stays out of the plan and of config.json's quantization block)."""
    out = {}
    for name, info in infos.items():
        path = module_name(name)
        if (name.endswith(".weight") and len(info.shape) == 2 and not path.startswith(SKIPPED_PREFIXES)
                and not is_vision(path)):
            out[path[: -len(".weight")]] = info.shape[1]
    return out


def hidream_block(source_arg: str, source_dir: Path, stored: Optional[dict], recipe: QuantRecipe,
                  include_vision: bool) -> dict:
    """What the folder says about where it came from and how to sample it."""
    stored = stored or {}
    from_folder = Path(source_arg).expanduser().is_dir()
    variant = stored.get("variant") or (source_dir.resolve().name if from_folder else source_arg.split("/")[-1])
    block = {
        "variant": variant,
        "recipe": recipe_for_model(variant, stored),
        "source": str(source_dir.resolve()) if from_folder else source_arg,
        "tool_version": __version__,
        "quantize_recipe": recipe.name,
        "vision_tower": include_vision,
    }
    # A hub download lives in .../snapshots/<commit>; that commit is the revision.
    if source_dir.parent.name == "snapshots":
        block["revision"] = source_dir.name
    elif stored.get("revision"):
        block["revision"] = stored["revision"]
    return block


def _convert_into(tmp: Path, infos: dict[str, TensorInfo], plan: QuantPlan, include_vision: bool,
                  shard_bytes: int, sizes: dict[str, ComponentSize],
                  on_progress: Callable[[int, int, str], None],
                  lora_updates: Optional[dict] = None) -> tuple[list[str], dict[str, str]]:
    writer = ShardWriter(tmp, shard_bytes)
    files = list(iter_checkpoint(infos))
    for done, (path, names) in enumerate(files):
        on_progress(done, len(files), path.name)
        arrays = open_shard(path)
        for name in sorted(names):
            source = arrays.pop(name)
            mpath = module_name(name)
            if mpath.startswith(SKIPPED_PREFIXES) or (is_vision(mpath) and not include_vision):
                continue
            module, _, leaf = mpath.rpartition(".")
            size = sizes.setdefault(component_of(mpath), ComponentSize())
            size.params += source.size
            if leaf == "weight" and lora_updates and module in lora_updates:
                source = merged_weight(source, lora_updates[module])  # float32, before quantizing
            setting = plan.layers.get(module) if leaf == "weight" else None
            if setting is not None:
                packed, scales, biases = quantize_weight(source, setting)
                outputs = {name: packed, f"{name[:-len('weight')]}scales": scales,
                           f"{name[:-len('weight')]}biases": biases}
            else:
                outputs = {name: source.astype(mx.bfloat16) if mx.issubdtype(source.dtype, mx.floating)
                           else source}
            mx.eval(*outputs.values())
            del source
            for out_name, array in outputs.items():
                size.bytes += array.nbytes
                writer.add(out_name, array)
            del outputs
        del arrays
        mx.clear_cache()
    on_progress(len(files), len(files), "")
    return writer.finish()


def convert(source: str, output: Path | str, recipe: QuantRecipe, bits: Optional[int] = None,
            group_size: Optional[int] = None, include_vision: bool = True, overwrite: bool = False,
            shard_bytes: int = DEFAULT_SHARD_BYTES, on_notice: Callable[[str], None] = lambda _: None,
            on_progress: Callable[[int, int, str], None] = lambda done, total, name: None,
            loras: Sequence = ()) -> Conversion:
    """Convert ``source`` (repo id or folder, float32 or bf16 shards) into ``output``.

    ``loras`` (LoRASpec) are merged into the float weights first, then quantized, and recorded in
    the config's hidream block (``Conversion.loras`` holds their summaries).

    ``on_progress(done, total, file)`` is called before each input shard and once at the end.
    """
    output = Path(output).expanduser()
    if not output.parent.is_dir():
        raise FileNotFoundError(f"{output.parent}: output folder's parent does not exist")
    if shard_bytes <= 0:
        raise ValueError(f"shard size must be positive, got {shard_bytes}")
    source_dir = resolve_model_path(source)
    check_output(output, source_dir, overwrite)
    clean_leftovers(output)
    config = read_config(source_dir)
    if config.quantization:
        raise ValueError(f"{source_dir}: already quantized ({config.quantization.get('bits')} bits); "
                         f"convert from the original float checkpoint")
    infos = checkpoint_index(source_dir)
    plan = resolve_plan(recipe, source_matrices(infos), config.text.num_hidden_layers,
                        bits, group_size)
    notices = plan.notices()
    for line in notices:
        on_notice(line)
    lora_updates, lora_summaries = updates_for_checkpoint(loras, checkpoint_targets(infos))

    tmp = _make_temp(output, "partial")
    try:
        sizes: dict[str, ComponentSize] = {}
        shards, weight_map = _convert_into(tmp, infos, plan, include_vision, shard_bytes, sizes, on_progress,
                                           lora_updates)
        index = {"metadata": {"total_size": sum(s.bytes for s in sizes.values())},
                 "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        new_config = config.replace(
            quantization=plan.description(),
            hidream={**hidream_block(source, source_dir, config.hidream, recipe, include_vision),
                     **({"loras": [s.to_dict() for s in lora_summaries]} if lora_summaries else {})},
        ).to_dict()
        (tmp / "config.json").write_text(json.dumps(new_config, indent=2))
        for name in TOKENIZER_FILES:
            if (source_dir / name).is_file():
                shutil.copyfile(source_dir / name, tmp / name)
        _move_into_place(tmp, output, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Conversion(output, plan, new_config, shards,
                      {k: sizes[k] for k in COMPONENTS if k in sizes}, notices, lora_summaries)


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def is_conversion_output(folder: Path) -> bool:
    """True for a folder this converter wrote and nobody added to: its config.json carries our
    ``quantization`` and ``hidream.quantize_recipe`` entries, and every entry is a file we write."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not (isinstance(config, dict) and isinstance(config.get("quantization"), dict)
            and isinstance(config.get("hidream"), dict) and "quantize_recipe" in config["hidream"]):
        return False
    ours = {"config.json", "model.safetensors.index.json", REPORT_FILE, PARTIAL_MARKER, *TOKENIZER_FILES}
    for entry in folder.iterdir():
        if entry.is_symlink() or not entry.is_file():
            return False
        if entry.name not in ours and not (entry.name.startswith("model-") and entry.name.endswith(".safetensors")):
            return False
    return True


def check_output(output: Path, source_dir: Path, overwrite: bool) -> None:
    """Refuse an output that would touch the source or replace anything but a previous conversion."""
    out, src = output.resolve(), source_dir.resolve()
    if _within(out, src) or _within(src, out):
        raise ValueError(f"{output}: the output may not be, contain or lie inside the source model ({src})")
    if not (output.exists() or output.is_symlink()):
        return
    if not overwrite:
        raise FileExistsError(f"{output}: already exists (use --overwrite to replace a folder that "
                              f"hidream-mlx quantize wrote)")
    if not is_conversion_output(output):
        raise FileExistsError(f"{output}: --overwrite replaces only a folder written by hidream-mlx quantize; "
                              f"this one is not (or holds other files), so nothing was touched")


def _make_temp(output: Path, kind: str) -> Path:
    """A sibling ``.NAME.XXXX.partial`` folder with the marker inside, created with the umask's
    ordinary permissions (mkdtemp's 0700 would become the output's mode after the rename)."""
    tmp = output.parent / f".{output.name}.{secrets.token_hex(4)}.{kind}"
    os.mkdir(tmp)
    (tmp / PARTIAL_MARKER).write_text("a hidream-mlx quantize run in progress or killed\n")
    return tmp


def clean_leftovers(output: Path) -> list[Path]:
    """Remove temporary folders a killed run on ``output`` left behind (recognised by the marker)."""
    removed = []
    for entry in output.parent.glob(f".{output.name}.*.partial"):
        if entry.is_dir() and not entry.is_symlink() and ((entry / PARTIAL_MARKER).is_file()
                                                          or is_conversion_output(entry)):
            shutil.rmtree(entry)
            removed.append(entry)
    return removed


def _move_into_place(tmp: Path, output: Path, overwrite: bool) -> None:
    if not (output.exists() or output.is_symlink()):
        tmp.rename(output)
        (output / PARTIAL_MARKER).unlink()
        return
    if not overwrite or not is_conversion_output(output):
        raise FileExistsError(f"{output}: appeared while converting; not replaced")
    # The old folder moves aside (marked, so a kill here leaves nothing unrecognised) and is
    # removed only once the new one is in place.
    old = output.parent / f".{output.name}.{secrets.token_hex(4)}.partial"
    output.rename(old)
    try:
        (old / PARTIAL_MARKER).write_text("the folder being replaced\n")
        tmp.rename(output)
    except BaseException:
        (old / PARTIAL_MARKER).unlink(missing_ok=True)
        old.rename(output)
        raise
    (output / PARTIAL_MARKER).unlink()
    shutil.rmtree(old)
