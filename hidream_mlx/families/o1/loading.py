"""Loading a HiDream-O1 checkpoint into :class:`HiDreamO1` (``ModelSource`` finds the folder).

``lm_head`` is never loaded (image generation has no use for it); the vision tower loads only
for reference images (``vision.load_vision_tower``). A folder whose config.json carries a
quantization block loads quantized with no flags; ``bits`` quantizes a float folder as it is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import mlx.core as mx

from hidream_mlx.families.o1.config import ModelConfig
from hidream_mlx.families.o1.transformer import HiDreamO1
from hidream_mlx.quant.plans import load_plan
from hidream_mlx.quant.quantization import apply_plan
from hidream_mlx.quant.recipes import DEFAULT_GROUP_SIZE
from hidream_mlx.weights.loading import (ModelLoadError, TensorInfo, check_against, checkpoint_index, is_vision,
                                         select_tensors, stream_into)


def read_config(model_dir: Path) -> ModelConfig:
    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(f"{model_dir}: no config.json (not a HiDream-O1 model folder)")
    return ModelConfig.from_file(model_dir / "config.json")



def load_model_planned(model_dir: Path | str, dtype: mx.Dtype = mx.bfloat16, lazy: bool = False,
                       bits: Optional[int] = None, group_size: int = DEFAULT_GROUP_SIZE, *,
                       config: Optional[ModelConfig] = None, index: Optional[dict[str, TensorInfo]] = None):
    """``load_model`` that also returns the quantization plan the model runs with (or None).

    ``config`` and ``index`` are a ``ModelSource``'s, when it has them: a single-file release has
    no config.json to read, and a resolved source need not parse or scan anything twice."""
    model_dir = Path(model_dir)
    config = config if config is not None else read_config(model_dir)
    model = HiDreamO1(config)
    plan = load_plan(model, config.quantization, bits, group_size)
    index = index if index is not None else checkpoint_index(model_dir)
    tensors = select_tensors(index, lambda n: not is_vision(n))
    if plan is not None and not plan.stored:
        check_against(model, tensors, model_dir)  # the float names and shapes the folder holds
    if plan is not None:
        apply_plan(model, plan.layers)  # quantized layers in the skeleton, before any weight is read
    if plan is None or plan.stored:
        check_against(model, tensors, model_dir)
    stream_into(model, tensors, dtype, plan, lazy)
    return model, plan


def load_model(model_dir: Path | str, dtype: mx.Dtype = mx.bfloat16, lazy: bool = False,
               bits: Optional[int] = None, group_size: int = DEFAULT_GROUP_SIZE):
    """Build the transformer from a folder and load its weights (vision tower left out).

    A folder whose config.json carries a quantization block loads quantized without asking;
    ``bits`` quantizes a float folder's decoder linears as they are read (``-q BITS``).
    """
    return load_model_planned(model_dir, dtype, lazy, bits, group_size)[0]
