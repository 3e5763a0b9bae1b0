"""Strict loading of HiDream-I1 diffusers component folders (transformer, VAE)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import mlx.core as mx

from hidream_mlx.families.i1.config import TransformerConfig, VAEConfig, read_json
from hidream_mlx.families.i1.transformer import HiDreamImageTransformer
from hidream_mlx.weights.loading import (ModelLoadError, TensorInfo, check_against, open_shard,
                                        read_safetensors_header, stream_into)
from hidream_mlx.quant.plans import I1_LAYERS, load_plan
from hidream_mlx.quant.quantization import apply_plan
from hidream_mlx.quant.recipes import DEFAULT_GROUP_SIZE
from hidream_mlx.families.i1.vae import AutoencoderKL, torch_to_mlx

INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


def component_files(folder: Path) -> list[Path]:
    """The safetensors files of one component: the index's shards, else every ``*.safetensors``."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError, AttributeError) as e:
            raise ModelLoadError(f"{index}: not a safetensors index ({e})") from None
        files = [folder / n for n in names]
        for f in files:
            if not f.exists():
                raise ModelLoadError(f"{index}: shard {f.name} is missing")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder}: no *.safetensors weights")
    return files


def component_index(folder: Path) -> dict[str, TensorInfo]:
    infos: dict[str, TensorInfo] = {}
    for path in component_files(folder):
        infos.update(read_safetensors_header(path))
    return infos


def expert_widths(infos: dict[str, TensorInfo], where: Path) -> tuple:
    """(routed expert, shared expert, text FFN) widths read from the first block's weights."""
    prefix = "double_stream_blocks.0.block." if any(k.startswith("double_stream_blocks.0.") for k in infos) \
        else "single_stream_blocks.0.block."
    names = (prefix + "ff_i.experts.0.w1.weight", prefix + "ff_i.shared_experts.w1.weight",
             "double_stream_blocks.0.block.ff_t.w1.weight")
    widths = []
    for name in names:
        info = infos.get(name)
        if info is None and name.endswith("ff_t.w1.weight"):
            widths.append(widths[0])
            continue
        if info is None:
            raise ModelLoadError(f"{where}: missing tensor {name}")
        widths.append(int(info.shape[0]))
    return tuple(widths)


def _assign(module, infos: dict[str, TensorInfo], dtype, convert=None, lazy: bool = True):
    """Load every tensor (cast to ``dtype``) into ``module``; arrays stay lazy views of
    the mapped files until evaluated. ``convert(name, array)`` adapts layouts (conv weights)."""
    weights = []
    by_file: dict[Path, list[str]] = {}
    for name, info in infos.items():
        by_file.setdefault(info.file, []).append(name)
    for path, names in by_file.items():
        arrays = open_shard(path)
        for name in names:
            a = arrays[infos[name].name]
            if mx.issubdtype(a.dtype, mx.floating):
                a = a.astype(dtype)
            weights.append((name, convert(name, a) if convert else a))
    module.load_weights(weights, strict=True)
    if not lazy:
        mx.eval(module.parameters())


def load_transformer_planned(folder: Path | str, dtype: mx.Dtype = mx.float32, lazy: bool = True,
                             bits: Optional[int] = None, group_size: int = DEFAULT_GROUP_SIZE,
                             infos: Optional[dict[str, TensorInfo]] = None):
    """``load_transformer`` that also returns the quantization plan it runs with (or None).
    ``infos`` (name -> where the tensor is) replaces the folder's own tensors, e.g. the base's
    with some taken from another file (HiDream-E1-Full's partial tensors)."""
    folder = Path(folder)
    raw = read_json(folder / "config.json")
    cfg = TransformerConfig.from_dict(raw, folder / "config.json")
    infos = component_index(folder) if infos is None else infos
    model = HiDreamImageTransformer(cfg, expert_widths(infos, folder))
    try:
        plan = load_plan(model, raw.get("quantization"), bits, group_size, scheme=I1_LAYERS)
    except ValueError as e:
        raise ModelLoadError(f"{folder}: {e}") from None
    if plan is not None and not plan.stored:
        check_against(model, infos, folder, prefix="")  # the float names and shapes the folder holds
    if plan is not None:
        apply_plan(model, plan.layers)  # quantized layers in the skeleton, before any weight is read
    if plan is None or plan.stored:
        check_against(model, infos, folder, prefix="")
    # Quantizing at load evaluates each layer as it is read: a lazy graph would keep every float
    # source alive until the first evaluation, which is the whole float checkpoint.
    stream_into(model, infos, dtype, plan, lazy=lazy and (plan is None or plan.stored))
    return model, plan


def load_transformer(folder: Path | str, dtype: mx.Dtype = mx.float32, lazy: bool = True,
                     bits: Optional[int] = None, group_size: int = DEFAULT_GROUP_SIZE):
    """``HiDreamImageTransformer`` from a diffusers ``transformer/`` folder, strictly.

    A folder whose config.json carries a ``quantization`` block (``hidream-mlx quantize``) loads
    quantized with no flags; ``bits`` quantizes a float folder's block linears as they are read
    (``-q BITS``, the flat plan of ``quant.plans.I1_LAYERS``), so the peak stays near the
    quantized size. Without ``bits``, ``lazy`` leaves the weights mapped until first use.
    """
    return load_transformer_planned(folder, dtype, lazy, bits, group_size)[0]


def load_vae(folder: Path | str, dtype: mx.Dtype = mx.float32, lazy: bool = True):
    """``AutoencoderKL`` (encoder and decoder) from a diffusers ``vae/`` folder, strictly."""
    folder = Path(folder)
    cfg = VAEConfig.load(folder)
    infos = component_index(folder)
    model = AutoencoderKL(cfg)
    shaped = {k: TensorInfo(**{**v.__dict__, "shape": tuple(torch_to_mlx(k, v.shape))}) for k, v in infos.items()}
    check_against(model, shaped, folder, prefix="")
    _assign(model, infos, dtype, convert=lambda n, a: a.transpose(0, 2, 3, 1) if a.ndim == 4 else a, lazy=lazy)
    return model
