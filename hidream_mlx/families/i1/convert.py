"""``hidream-mlx quantize`` for a HiDream-I1 pipeline folder: the transformer quantized, the rest
carried over, in a folder that loads with no flags.

The output is a diffusers-layout pipeline folder again: ``model_index.json`` and every other
component (VAE, text encoders, tokenizers, schedulers) carried over unchanged, as hard links
where the filesystem allows and plain copies otherwise (never symlinks, so the output stands
alone), and ``transformer/`` replaced by MLX safetensors (quantized layers packed with bf16
scales and biases, every other tensor at the source's precision, bf16 in the released repos) whose ``config.json`` keeps the
diffusers config and adds a ``quantization`` block (as O1 folders do) and a ``hidream`` block
(source, recipe, tool version and the list of files the conversion wrote, which is how
``--overwrite`` recognises the folder as ours). Tensors stream one at a time, as in the O1
converter, and the same output rules apply (``quant.output``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx

from hidream_mlx import __version__

from hidream_mlx.families.i1.source import I1, i1_variant, is_i1_pipeline
from hidream_mlx.families.i1.source import PIPELINE_PATTERNS
from hidream_mlx.families.i1.weights import INDEX_NAME, component_index
from hidream_mlx.weights.loading import ModelLoadError, TensorInfo, iter_checkpoint, open_shard
from hidream_mlx.weights.source import is_repo_id, resolve_model_path
from hidream_mlx.memory import ComponentSize
from hidream_mlx.quant.writer import DEFAULT_SHARD_BYTES, Conversion, ShardWriter, converted_tensor
from hidream_mlx.quant.output import PIPELINE_INDEX, check_output, clean_leftovers, make_temp, move_into_place
from hidream_mlx.quant.plans import I1_LAYERS, QuantPlan, index_matrices, resolve_plan
from hidream_mlx.quant.recipes import QuantRecipe

TRANSFORMER = "transformer"
SHARD_STEM = "diffusion_pytorch_model"
# What a carried-over component may hold: configs, weights, tokenizer files. Pickled weights
# are left behind (never opened, never copied), with a notice.
CARRIED_SUFFIXES = (".json", ".safetensors", ".txt", ".model", ".jinja")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
COMPONENTS = ("double blocks", "single blocks", "caption projections", "embedders and final layer")
_BLOCK = re.compile(r"(double|single)_stream_blocks\.")


def component_of(name: str) -> str:
    """Reporting group of an I1 transformer tensor, for the size summary."""
    m = _BLOCK.match(name)
    if m:
        return f"{m.group(1)} blocks"
    if name.startswith("caption_projection."):
        return "caption projections"
    return "embedders and final layer"


def transformer_plan(infos: dict[str, TensorInfo], recipe: QuantRecipe, bits: Optional[int],
                     group_size: Optional[int]) -> QuantPlan:
    """The plan for an I1 transformer's header index (the layers ``quant.plans.I1_LAYERS`` names)."""
    return resolve_plan(recipe, index_matrices(infos), None, bits, group_size, I1_LAYERS)


def _carry(src: Path, dst: Path) -> None:
    """``dst`` as a hard link to ``src``'s content (a hub symlink is followed), else a copy."""
    real = src.resolve()
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(real, dst)
    except OSError:  # another filesystem, or links not allowed: copy instead
        shutil.copyfile(real, dst)


def carry_components(source_dir: Path, tmp: Path, on_notice: Callable[[str], None]) -> list[str]:
    """Copy ``model_index.json`` and every component but the transformer; returns relative paths."""
    written = []
    shutil.copyfile(source_dir / PIPELINE_INDEX, tmp / PIPELINE_INDEX)
    written.append(PIPELINE_INDEX)
    for folder in sorted(p for p in source_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if folder.name == TRANSFORMER:
            continue
        for root, dirs, names in os.walk(folder, followlinks=False):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(names):
                src = Path(root) / name
                rel = src.relative_to(source_dir).as_posix()
                if name.startswith("."):
                    continue
                if src.suffix in PICKLE_SUFFIXES:
                    on_notice(f"{rel}: pickle file left behind (hidream-mlx reads safetensors only)")
                    continue
                if src.suffix not in CARRIED_SUFFIXES:
                    continue
                _carry(src, tmp / rel)
                written.append(rel)
    return written


def _convert_transformer(infos: dict[str, TensorInfo], plan: QuantPlan, out: Path, shard_bytes: int,
                         sizes: dict[str, ComponentSize], on_progress: Callable[[int, int, str], None]):
    writer = ShardWriter(out, shard_bytes, stem=SHARD_STEM)
    files = list(iter_checkpoint(infos))
    for done, (path, names) in enumerate(files):
        on_progress(done, len(files), path.name)
        arrays = open_shard(path)
        for name in sorted(names):
            source = arrays.pop(infos[name].name)
            module, _, leaf = name.rpartition(".")
            size = sizes.setdefault(component_of(name), ComponentSize())
            size.parameters += source.size
            setting = plan.layers.get(module) if leaf == "weight" else None
            # Unquantized tensors keep the source's precision (bf16 in the released repos).
            outputs = converted_tensor(name, source, setting, keep=lambda array: array)
            del source
            writer.add_counted(outputs, size)
            del outputs
        del arrays
        mx.clear_cache()
    on_progress(len(files), len(files), "")
    return writer.finish()


def convert_i1(source: str, output: Path | str, recipe: QuantRecipe, bits: Optional[int] = None,
               group_size: Optional[int] = None, overwrite: bool = False,
               shard_bytes: int = DEFAULT_SHARD_BYTES, on_notice: Callable[[str], None] = lambda _: None,
               on_progress: Callable[[int, int, str], None] = lambda done, total, name: None) -> Conversion:
    """Convert the I1 pipeline ``source`` (folder or repo id) into ``output``.

    ``on_progress(done, total, file)`` is called before each transformer shard and once at the end.
    """
    output = Path(output).expanduser()
    if not output.parent.is_dir():
        raise FileNotFoundError(f"{output.parent}: output folder's parent does not exist")
    if shard_bytes <= 0:
        raise ValueError(f"shard size must be positive, got {shard_bytes}")
    source_dir = resolve_model_path(source, patterns=PIPELINE_PATTERNS)
    if not is_i1_pipeline(source_dir):
        raise ModelLoadError(f"{source_dir}: not a HiDream-I1 pipeline folder (its {PIPELINE_INDEX} "
                             f"does not name HiDreamImagePipeline)")
    transformer_dir = source_dir / TRANSFORMER
    if not (transformer_dir / "config.json").is_file():
        raise ModelLoadError(f"{transformer_dir}: no config.json (the pipeline has no transformer component)")
    check_output(output, source_dir, overwrite)
    clean_leftovers(output)
    config = json.loads((transformer_dir / "config.json").read_text())
    if isinstance(config.get("quantization"), dict):
        raise ValueError(f"{source_dir}: already quantized ({config['quantization'].get('bits')} bits); "
                         f"convert from the original checkpoint")
    infos = component_index(transformer_dir)
    plan = transformer_plan(infos, recipe, bits, group_size)
    notices = plan.notices()
    for line in notices:
        on_notice(line)

    tmp = make_temp(output, "partial")
    try:
        written = carry_components(source_dir, tmp, lambda line: (notices.append(line), on_notice(line)))
        (tmp / TRANSFORMER).mkdir()
        sizes: dict[str, ComponentSize] = {}
        shards, weight_map = _convert_transformer(infos, plan, tmp / TRANSFORMER, shard_bytes, sizes, on_progress)
        index = {"metadata": {"total_size": sum(s.nbytes for s in sizes.values())},
                 "weight_map": dict(sorted(weight_map.items()))}
        (tmp / TRANSFORMER / INDEX_NAME).write_text(json.dumps(index, indent=2))
        written += [f"{TRANSFORMER}/{name}" for name in (*shards, INDEX_NAME, "config.json")]
        name = source if is_repo_id(source) else source_dir.resolve().name
        block = {"family": I1, "variant": i1_variant(name),
                 "source": name,  # a repo id, or the folder's own name: never the path it was made from
                 "tool_version": __version__, "quantize_recipe": recipe.name}
        if source_dir.parent.name == "snapshots":  # a hub download: the snapshot folder is the revision
            block["revision"] = source_dir.name
        block["files"] = sorted(written)
        new_config = {**config, "quantization": plan.description(), "hidream": block}
        (tmp / TRANSFORMER / "config.json").write_text(json.dumps(new_config, indent=2))
        move_into_place(tmp, output, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Conversion(output, plan, new_config, shards, {k: sizes[k] for k in COMPONENTS if k in sizes}, notices)
