"""Writing a converted checkpoint: shards of a bounded size, each tensor quantized or kept by the
family's rule, and the summary of what was written (every family's converter writes through this).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx

from hidream_mlx.memory import ComponentSize
from hidream_mlx.quant.plans import QuantPlan
from hidream_mlx.quant.quantization import quantize_tensor
from hidream_mlx.quant.recipes import LayerSetting

DEFAULT_SHARD_BYTES = 5 * 10**9  # 5 GB (decimal), like the hub's own shards


@dataclass
class Conversion:
    output: Path
    plan: QuantPlan
    config: dict
    shards: list[str]
    sizes: dict[str, ComponentSize] = field(default_factory=dict)
    notices: list[str] = field(default_factory=list)
    loras: list = field(default_factory=list)  # LoRASummary of each LoRA baked in
    report: Optional[object] = None  # a family's fidelity report, when one was asked for

    @property
    def total(self) -> ComponentSize:
        return ComponentSize(sum(s.parameters for s in self.sizes.values()), sum(s.nbytes for s in self.sizes.values()))


class ShardWriter:
    """Collects converted tensors and writes a shard whenever ``limit`` bytes are pending."""

    def __init__(self, folder: Path, limit: int, stem: str = "model"):
        self.folder, self.limit, self.stem = folder, limit, stem
        self.pending: dict[str, mx.array] = {}
        self.pending_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []

    def add(self, name: str, array: mx.array) -> None:
        self.pending[name] = array
        self.pending_bytes += array.nbytes
        if self.pending_bytes >= self.limit:
            self.flush()

    def add_counted(self, outputs: dict[str, mx.array], size: ComponentSize) -> None:
        """Add a converted tensor's arrays, counting their bytes into its component's ``size``."""
        for name, array in outputs.items():
            size.nbytes += array.nbytes
            self.add(name, array)

    def flush(self) -> None:
        if not self.pending:
            return
        path = self.folder / f"part-{len(self.written) + 1:05d}.safetensors"
        mx.save_safetensors(str(path), self.pending, metadata={"format": "mlx"})
        self.written.append((path, sorted(self.pending)))
        self.pending, self.pending_bytes = {}, 0
        mx.clear_cache()

    def finish(self) -> tuple[list[str], dict[str, str]]:
        """Rename the parts to ``STEM-0000X-of-0000Y.safetensors``; returns names and weight map."""
        self.flush()
        count, names, weight_map = len(self.written), [], {}
        for i, (path, tensors) in enumerate(self.written, start=1):
            name = f"{self.stem}-{i:05d}-of-{count:05d}.safetensors"
            path.rename(self.folder / name)
            names.append(name)
            weight_map.update({t: name for t in tensors})
        return names, weight_map


def converted_tensor(name: str, source: mx.array, setting: Optional[LayerSetting],
                     keep: Callable[[mx.array], mx.array]) -> dict[str, mx.array]:
    """The arrays a checkpoint tensor ``name`` becomes, evaluated: a planned weight quantized
    (``quantize_tensor``: packed weight, bf16 scales and biases named after it), anything else
    through ``keep`` (each family's rule for unquantized tensors)."""
    if setting is not None:
        outputs = dict(quantize_tensor(name[: -len(".weight")], source, setting, mx.bfloat16))
    else:
        outputs = {name: keep(source)}
    mx.eval(*outputs.values())
    return outputs
