"""Memory, the machine side: what weights take from their shapes alone, and what this machine can give.

All sizes are bytes; printed sizes use GiB/MiB (powers of two) and say so. The size rule
(``component_sizes``) serves every family; each family models its own working set and phases
(``families/<name>/memory.py``) and refuses a run through :func:`refuse_beyond_machine`.
"""

from __future__ import annotations

import contextlib
import math
import resource
import sys
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import mlx.core as mx
import mlx.nn as nn
import psutil
from mlx.utils import tree_flatten

from hidream_mlx.weights.loading import LOAD_CACHE_BYTES
from hidream_mlx.quant.recipes import DEFAULT_GROUP_SIZE, LayerSetting

GiB = 1 << 30
MiB = 1 << 20
# Python, MLX and numpy themselves, measured as RSS before any array exists (~40 MiB on Linux),
# plus MLX's buffer-cache slack that RSS shows beyond its own active-memory peak.
RUNTIME_BYTES = 64 * MiB


def format_bytes(n: float) -> str:
    if abs(n) >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / MiB:.1f} MiB"


def parameter_bytes(module: nn.Module) -> int:
    return sum(a.nbytes for _, a in tree_flatten(module.parameters()))


def parameter_count(module: nn.Module) -> int:
    return sum(a.size for _, a in tree_flatten(module.parameters()))


def component_of(name: str) -> str:
    """Reporting group of a parameter (module path, ``model.`` already stripped)."""
    parts = name.split(".")
    if parts[0] == "language_model" and len(parts) > 1:
        return "language_model." + parts[1]
    return parts[0]


# ---------------------------------------------------------------------------------------------
# Weights from shapes alone (safetensors headers or a lazy skeleton): nothing is loaded.


@dataclass
class ComponentSize:
    parameters: int = 0
    nbytes: int = 0

    def add(self, parameters: int, nbytes: int) -> None:
        self.parameters += parameters
        self.nbytes += nbytes

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.parameters if self.parameters else 0.0


def quantized_bytes(count: int, bits: int, scale_bytes: int = 2, group_size: int = DEFAULT_GROUP_SIZE) -> int:
    """``count`` weights at ``bits`` each, plus one scale and one bias per group."""
    return count * bits // 8 + (count // group_size) * 2 * scale_bytes


# (tensor name, shape) -> the quantization of that tensor, or None when it stays float.
SettingOf = Callable[[str, tuple], Optional[LayerSetting]]


def component_sizes(shapes: Iterable[tuple[str, tuple[int, ...]]], dtype_bytes: int,
                    setting_of: SettingOf = lambda name, shape: None,
                    group_of: Callable[[str], str] = None) -> dict[str, ComponentSize]:
    """Parameters and bytes per reporting group of float tensors loaded at ``dtype_bytes``.

    The one size rule of both families: a tensor ``setting_of`` quantizes takes
    ``quantized_bytes`` (scales and biases in the load dtype), every other one its elements
    times ``dtype_bytes``. ``group_of`` names the group (default: ``component_of``).
    """
    group_of = group_of or component_of
    out: dict[str, ComponentSize] = {}
    for name, shape in shapes:
        count = math.prod(shape)
        setting = setting_of(name, tuple(shape))
        size = (quantized_bytes(count, setting.bits, dtype_bytes, setting.group_size) if setting is not None
                else count * dtype_bytes)
        out.setdefault(group_of(name), ComponentSize()).add(count, size)
    return out


def plan_weight_sizes(shapes: Iterable[tuple[str, tuple[int, ...]]], layers: dict, dtype_bytes: int = 2
                      ) -> dict[str, ComponentSize]:
    """``component_sizes`` under a quantization plan (module path -> setting with ``bits`` and
    ``group_size``, or None): any width, per-layer overrides and a quantized embed_tokens."""
    def setting_of(name, shape):
        return layers.get(name[: -len(".weight")]) if name.endswith(".weight") else None

    return component_sizes(shapes, dtype_bytes, setting_of)


def stored_sizes(index: dict, dtype_bytes: int, setting_of: SettingOf, group_of: Callable[[str], str],
                 quantization: Optional[dict] = None, rename: Callable[[str], str] = lambda n: n
                 ) -> dict[str, ComponentSize]:
    """Component sizes of a header index (checkpoint name -> TensorInfo) as it loads.

    Float tensors follow ``component_sizes``. A folder quantized beforehand (``quantization``:
    its config's block) keeps its packed weights as stored, counted as the elements they
    pack; its scales and biases load in the load dtype.
    """
    group = int((quantization or {}).get("group_size", DEFAULT_GROUP_SIZE))
    out: dict[str, ComponentSize] = {}
    floats = []
    for ckpt_name, info in index.items():
        name = rename(ckpt_name)
        count = math.prod(info.shape)
        if quantization and info.dtype in ("U32", "I32", "U8"):
            scales = index.get(ckpt_name[: -len("weight")] + "scales")
            params = math.prod(scales.shape) * group if scales is not None else count
            out.setdefault(group_of(name), ComponentSize()).add(params, info.nbytes)
        elif quantization and name.endswith((".scales", ".biases")):
            out.setdefault(group_of(name), ComponentSize()).add(0, count * dtype_bytes)
        else:
            floats.append((name, info.shape))
    for key, size in component_sizes(floats, dtype_bytes, setting_of, group_of).items():
        out.setdefault(key, ComponentSize()).add(size.parameters, size.nbytes)
    return out


# ---------------------------------------------------------------------------------------------
# This machine.


def uses_fused_attention() -> bool:
    """Metal's attention kernel never materializes the score matrix; the CPU fallback does."""
    return mx.metal.is_available()


def predict_load_peak_bytes(weight_bytes: int) -> int:
    """Peak RSS of loading: the loader streams tensor by tensor (``weights.loading.stream_into``), so
    beyond the weights only the runtime and MLX's capped buffer cache (``LOAD_CACHE_BYTES``)."""
    return weight_bytes + RUNTIME_BYTES + LOAD_CACHE_BYTES


# ---------------------------------------------------------------------------------------------
# This machine.


def metal_device_info() -> Optional[dict]:
    """Metal's device description, or None where Metal is not available (Linux, CPU-only)."""
    if not mx.metal.is_available():
        return None
    info = getattr(mx, "device_info", None) or mx.metal.device_info
    return dict(info())


def machine_memory() -> int:
    """What MLX may use here: Metal's recommended working set on a Mac, else physical RAM."""
    info = metal_device_info()
    if info is not None and "max_recommended_working_set_size" in info:
        return int(info["max_recommended_working_set_size"])
    return int(psutil.virtual_memory().total)


def refuse_beyond_machine(need: int, advice: str = "try a lower-bit model (-q 6 or -q 4), a smaller size "
                                                   "(--preset quick), or --force", what: str = "") -> None:
    have = machine_memory()
    if need > have:
        raise MemoryError(f"this run needs about {format_bytes(need)}{what} but this machine offers "
                          f"{format_bytes(have)}; {advice}")


@contextlib.contextmanager
def wired_limit(model: nn.Module) -> Iterator[None]:
    """Keep the model's memory wired on Metal for the duration (as mlx-lm's generate does).

    Raises the wired limit to the device's recommended working set, warns when the weights
    alone exceed it (the system will page and generation crawls), and restores the old limit
    after synchronizing. Does nothing without Metal.
    """
    info = metal_device_info()
    if info is None:
        yield
        return
    recommended = int(info["max_recommended_working_set_size"])
    weights = parameter_bytes(model)
    if weights > 0.9 * recommended:
        warnings.warn(
            f"the model takes {format_bytes(weights)}, close to or above the {format_bytes(recommended)} "
            "Metal recommends for this machine; generation may be very slow. Try -q 6 or -q 4.",
            stacklevel=3,
        )
    previous = mx.set_wired_limit(recommended)
    try:
        yield
    finally:
        mx.synchronize()
        mx.set_wired_limit(previous)


def size_table(sizes: dict[str, ComponentSize], order: list[str] = ()) -> list[str]:
    """One line per component (``order`` first, the rest by name): parameters and bytes."""
    rank = {name: i for i, name in enumerate(order)}
    items = sorted(sizes.items(), key=lambda item: (rank.get(item[0], len(rank)), item[0]))
    width = max(len(name) for name in sizes)
    return [f"  {name:<{width}}  {size.parameters:>15,} params  {format_bytes(size.nbytes):>10}"
            for name, size in items]


def verdict_line(need: int) -> str:
    have = machine_memory()
    where = "Metal recommended working set" if uses_fused_attention() else "physical RAM"
    verdict = "fits" if need <= have else "does NOT fit (try -q 6 or -q 4, or a smaller size)"
    return f"machine: {format_bytes(have)} ({where}); this request {verdict}"


# ---------------------------------------------------------------------------------------------
# Peak resident memory of this process while one image is made. Two sources, because each misses
# something: a thread samples psutil's RSS every few milliseconds (portable, but can miss a short
# spike), and the kernel's high-water mark from getrusage (exact, but process-wide). On Linux the
# high-water mark can be reset per image (/proc/self/clear_refs), which makes it exact per image;
# on macOS it cannot, so there the per-image figure is the sampled one and ``process_max`` is the
# high-water mark since start.


_CLEAR_REFS = Path("/proc/self/clear_refs")
_RESET_HIGH_WATER = "5"  # Linux: "reset the peak resident set size" (proc(5))


def ru_maxrss_bytes() -> int:
    """The process high-water mark; ``ru_maxrss`` is KiB on Linux and bytes on macOS."""
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss if sys.platform == "darwin" else maxrss * 1024)


def reset_high_water() -> bool:
    """Reset the kernel's peak RSS if this system allows it; say whether it did."""
    try:
        _CLEAR_REFS.write_text(_RESET_HIGH_WATER)
    except OSError:  # not Linux, or a sandbox that forbids it: fall back to sampling
        return False
    return True


class PeakRss:
    """``with rss.measure(): ...`` then read ``rss.peak`` (bytes, this block) and ``rss.process_max``."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.process = psutil.Process()
        self.peak = 0
        self.process_max = 0
        self.exact = False  # True when the kernel high-water mark was reset for this block

    def _sample(self, stop: threading.Event) -> None:
        while not stop.wait(self.interval):
            self.peak = max(self.peak, self.process.memory_info().rss)

    @contextmanager
    def measure(self) -> Iterator["PeakRss"]:
        self.exact = reset_high_water()
        self.peak = self.process.memory_info().rss
        stop = threading.Event()
        sampler = threading.Thread(target=self._sample, args=(stop,), daemon=True)
        sampler.start()
        try:
            yield self
        finally:
            stop.set()
            sampler.join()
            self.process_max = ru_maxrss_bytes()
            self.peak = max(self.peak, self.process.memory_info().rss)
            if self.exact:
                self.peak = max(self.peak, self.process_max)
