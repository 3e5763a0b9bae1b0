"""Streaming conversion of an official checkpoint into a quantized folder that loads with no flags.

Memory stays near one source tensor plus one output shard: each source shard is opened with
``mx.load`` (lazy: a tensor is read only when evaluated), each tensor is quantized or cast to
bf16 and evaluated on its own, its float source is dropped, and output shards are flushed at a
size limit. Everything is written into a temporary folder beside the output and renamed into
place at the end; any failure (including Ctrl-C or a full disk) removes the temporary folder.

The source is reached through ``ModelSource`` (an official folder, a repo id or a single-file
release); where the output may go and how it lands is ``quant.output``'s.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Optional, Sequence

import mlx.core as mx

from hidream_mlx import __version__
from hidream_mlx.memory import ComponentSize
from hidream_mlx.weights.loading import (
    SKIPPED_PREFIXES,
    TensorInfo,
    is_vision,
    iter_checkpoint,
    module_name,
    open_shard,
)
from hidream_mlx.weights.lora import checkpoint_targets, merged_weight, updates_for_checkpoint
from hidream_mlx.families.o1.source import CONVERTED, SINGLE_FILE, ModelSource
from hidream_mlx.quant.output import TOKENIZER_FILES, check_output, clean_leftovers, make_temp, move_into_place
from hidream_mlx.quant.plans import QuantPlan, resolve_plan
from hidream_mlx.quant.recipes import QuantRecipe
from hidream_mlx.quant.writer import DEFAULT_SHARD_BYTES, Conversion, ShardWriter, converted_tensor
from hidream_mlx.families.o1.recipes import recipe_for_model
from hidream_mlx.weights.source import recorded_name

COMPONENTS = ("decoder", "embed_tokens", "pixel heads", "vision tower")


def component_of(path: str) -> str:
    """Which part of the model a module path belongs to, for the size summary."""
    if path.startswith("language_model.embed_tokens"):
        return "embed_tokens"
    if path.startswith("language_model."):
        return "decoder"
    if path.startswith("visual."):
        return "vision tower"
    return "pixel heads"


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
    local = Path(source_arg).expanduser()
    from_folder = local.exists()
    variant = stored.get("variant") or (local.resolve().stem if local.is_file() else
                                        source_dir.resolve().name if from_folder else source_arg.split("/")[-1])
    block = {
        "variant": variant,
        "recipe": recipe_for_model(variant, stored),
        # The source by name (a repo id, or the folder's or file's own name): a converted folder is shared,
        # and the path it was made from is nobody else's business.
        "source": recorded_name(str(local.resolve())) if from_folder else source_arg,
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


def _as_bf16(array: mx.array) -> mx.array:
    """O1 folders store every unquantized float tensor in bf16."""
    return array.astype(mx.bfloat16) if mx.issubdtype(array.dtype, mx.floating) else array


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
            size.parameters += source.size
            if leaf == "weight" and lora_updates and module in lora_updates:
                source = merged_weight(source, lora_updates[module])  # float32, before quantizing
            setting = plan.layers.get(module) if leaf == "weight" else None
            outputs = converted_tensor(name, source, setting, _as_bf16)
            del source
            writer.add_counted(outputs, size)
            del outputs
        del arrays
        mx.clear_cache()
    on_progress(len(files), len(files), "")
    return writer.finish()


def convert(source: str | ModelSource, output: Path | str, recipe: QuantRecipe, bits: Optional[int] = None,
            group_size: Optional[int] = None, include_vision: bool = True, overwrite: bool = False,
            shard_bytes: int = DEFAULT_SHARD_BYTES, on_notice: Callable[[str], None] = lambda _: None,
            on_progress: Callable[[int, int, str], None] = lambda done, total, name: None,
            loras: Sequence = ()) -> Conversion:
    """Convert ``source`` (repo id, folder or single-file release, or its resolved ``ModelSource``;
    float32 or bf16) into ``output``.

    ``loras`` (LoRASpec) are merged into the float weights first, then quantized, and recorded in
    the config's hidream block (``Conversion.loras`` holds their summaries).

    ``on_progress(done, total, file)`` is called before each input shard and once at the end.
    """
    output = Path(output).expanduser()
    if not output.parent.is_dir():
        raise FileNotFoundError(f"{output.parent}: output folder's parent does not exist")
    if shard_bytes <= 0:
        raise ValueError(f"shard size must be positive, got {shard_bytes}")
    model = ModelSource.resolve(source)
    source, source_dir = model.arg, model.path
    check_output(output, Path(source).expanduser() if model.layout == SINGLE_FILE else source_dir, overwrite)
    clean_leftovers(output)
    config = model.config
    if model.layout == CONVERTED:
        raise ValueError(f"{source_dir}: already quantized ({config.quantization.get('bits')} bits); "
                         f"convert from the original float checkpoint")
    infos = model.index
    plan = resolve_plan(recipe, source_matrices(infos), config.text.num_hidden_layers,
                        bits, group_size)
    notices = plan.notices()
    for line in notices:
        on_notice(line)
    lora_updates, lora_summaries = updates_for_checkpoint(loras, checkpoint_targets(infos))

    tmp = make_temp(output, "partial")
    try:
        sizes: dict[str, ComponentSize] = {}
        shards, weight_map = _convert_into(tmp, infos, plan, include_vision, shard_bytes, sizes, on_progress,
                                           lora_updates)
        index = {"metadata": {"total_size": sum(s.nbytes for s in sizes.values())},
                 "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        new_config = config.replace(
            quantization=plan.description(),
            hidream={**hidream_block(source, source_dir, config.hidream, recipe, include_vision),
                     **({"loras": [s.to_dict() for s in lora_summaries]} if lora_summaries else {})},
        ).to_dict()
        (tmp / "config.json").write_text(json.dumps(new_config, indent=2))
        side_files = model.tokenizer_dir or source_dir
        for name in TOKENIZER_FILES:
            if (side_files / name).is_file():
                shutil.copyfile(side_files / name, tmp / name)
        move_into_place(tmp, output, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Conversion(output, plan, new_config, shards,
                      {k: sizes[k] for k in COMPONENTS if k in sizes}, notices, lora_summaries)
